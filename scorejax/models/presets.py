"""Full-size network settings of the score_sde paper, as `config.model` sections.

Each function returns the `model` ConfigDict of one reference config (the keys and
values of score_sde's `configs/default_*_configs.py` plus the named config file), for
the experiment configs under `configs/` to reuse. The matching `data` settings are in
the docstrings (image size, centering); `make_model` needs both sections.

Parameter counts (the Fourier `W` included), as the reference reports them:
`ncsnpp_cifar10` 62,758,915; `ncsnpp_deep_cifar10` 107,587,075; `ddpmpp_cifar10`
61,804,419; `ddpmpp_deep_cifar10` 106,632,579; `ncsnpp_celebahq256` 65,574,549;
`ddpm_cifar10` 35,218,947 (score_sde's DDPM port puts one attention block per
up-sampling level where Ho et al.'s U-Net, 35.7M, has one after every block).
"""

from __future__ import annotations

import ml_collections


def _common(**overrides) -> ml_collections.ConfigDict:
  """The `model` keys of `default_cifar10_configs.py`, updated with `overrides`."""
  model = dict(sigma_min=0.01, sigma_max=50.0, num_scales=1000, beta_min=0.1, beta_max=20.0,
               dropout=0.1, embedding_type='fourier')
  model.update(overrides)
  return ml_collections.ConfigDict(model)


def _ncsnpp(**overrides) -> ml_collections.ConfigDict:
  """NCSN++ / DDPM++ knobs shared by the CIFAR-10 configs."""
  knobs = dict(name='ncsnpp', normalization='GroupNorm', nonlinearity='swish', nf=128,
               ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
               resamp_with_conv=True, conditional=True, fir_kernel=(1, 3, 3, 1),
               skip_rescale=True, resblock_type='biggan', progressive_combine='sum',
               attention_type='ddpm', init_scale=0.0, fourier_scale=16, conv_size=3)
  knobs.update(overrides)
  return _common(**knobs)


def ncsnpp_cifar10() -> ml_collections.ConfigDict:
  """`configs/ve/cifar10_ncsnpp_continuous.py` (VE, 32x32, data in [0, 1])."""
  return _ncsnpp(scale_by_sigma=True, ema_rate=0.999, fir=True, progressive='none',
                 progressive_input='residual', embedding_type='fourier')


def ncsnpp_deep_cifar10() -> ml_collections.ConfigDict:
  """`configs/ve/cifar10_ncsnpp_deep_continuous.py` (VE, 8 blocks per level)."""
  config = ncsnpp_cifar10()
  config.num_res_blocks = 8
  return config


def ddpmpp_cifar10() -> ml_collections.ConfigDict:
  """`configs/vp/cifar10_ddpmpp_continuous.py` (VP / sub-VP, 32x32, centered data)."""
  return _ncsnpp(scale_by_sigma=False, ema_rate=0.9999, fir=False, progressive='none',
                 progressive_input='none', embedding_type='positional')


def ddpmpp_deep_cifar10() -> ml_collections.ConfigDict:
  """`configs/vp/cifar10_ddpmpp_deep_continuous.py` (VP, 8 blocks per level)."""
  config = ddpmpp_cifar10()
  config.num_res_blocks = 8
  return config


def ncsnpp_celebahq256() -> ml_collections.ConfigDict:
  """`configs/ve/celebahq_256_ncsnpp_continuous.py` (VE, 256x256, data in [0, 1]).

  Its defaults come from `default_lsun_configs.py`: sigma_max 348 (overridden from
  378), 2000 scales, no dropout.
  """
  return _ncsnpp(sigma_max=348.0, num_scales=2000, dropout=0.0, scale_by_sigma=True,
                 ema_rate=0.999, ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, fir=True,
                 progressive='output_skip', progressive_input='input_skip',
                 embedding_type='fourier')


def ddpm_cifar10() -> ml_collections.ConfigDict:
  """`configs/vp/ddpm/cifar10.py` (the original DDPM, discrete VP, centered data)."""
  return _common(name='ddpm', scale_by_sigma=False, ema_rate=0.9999, normalization='GroupNorm',
                 nonlinearity='swish', nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), resamp_with_conv=True, conditional=True)


PRESETS = {
    'ncsnpp_cifar10': ncsnpp_cifar10,
    'ncsnpp_deep_cifar10': ncsnpp_deep_cifar10,
    'ddpmpp_cifar10': ddpmpp_cifar10,
    'ddpmpp_deep_cifar10': ddpmpp_deep_cifar10,
    'ncsnpp_celebahq256': ncsnpp_celebahq256,
    'ddpm_cifar10': ddpm_cifar10,
}
