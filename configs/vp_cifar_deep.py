"""DDPM++ deep (continuous, VP SDE) on CIFAR-10.

Reproduces score_sde's `configs/vp/cifar10_ddpmpp_deep_continuous.py`. Reported: FID
2.41, IS 9.68 (PC sampler); NLL 3.13 bits/dim and FID 3.08 with the probability-flow
ODE, as reported by Song et al. 2021 (ICLR), Tables 2-3, and the score_sde README (1.3M
steps, batch 128, FID over 50k samples).

  python main.py --config=configs/vp_cifar_deep.py --workdir=runs/vp_cifar_deep
  python main.py --config=configs/vp_cifar_deep.py --workdir=runs/vp_cifar_deep \\
      --mode=eval --config.eval.enable_bpd=True --config.eval.enable_sampling=True \\
      --config.eval.inception_path=inception_fid.npz \\
      --config.eval.fid_stats_path=cifar10_train_stats.npz

Needs a prepared tfds `cifar10` (see `configs/cifar10_common.py`) and accelerators.
"""

from configs import vp_cifar
from configs.cifar10_common import set_model
from scorejax.models import presets


def get_config():
  """`configs/vp_cifar.py` with the deep network."""
  config = vp_cifar.get_config()
  set_model(config, presets.ddpmpp_deep_cifar10())
  return config
