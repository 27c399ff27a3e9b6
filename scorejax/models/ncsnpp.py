"""NCSN++ / DDPM++: the U-Net score network of Song et al. (2021), one configurable module.

NCSN++ (VE, Fourier time embedding, FIR resampling, progressive growing of the input /
output pyramids) and DDPM++ (VP, sinusoidal embedding, BigGAN blocks) are the same
network with different knobs. Inputs are NHWC; `labels` are the noise levels sigma
(Fourier embedding of `log sigma`) or the time / step indices (sinusoidal embedding).

Parameter names are Flax's automatic names in call order (`Conv_0`,
`ResnetBlockBigGANpp_3`, `AttnBlockpp_0`, `GroupNorm_1`, ...), identical to score_sde's
JAX `NCSNpp`, so its checkpoints load without renaming (`scorejax.convert`).

References:
  Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
  Equations", ICLR, Appendix H (architecture search: FIR, skip rescaling, BigGAN
  blocks, progressive growing, Fourier features).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scorejax.models import blocks
from scorejax.models.layers import (
    GaussianFourierProjection,
    add_class_embedding,
    check_class_labels,
    conv3x3,
    default_init,
    group_norm,
    positional_embedding,
)

Array = jax.Array

RESBLOCK_TYPES = ('ddpm', 'biggan')
PROGRESSIVE = ('none', 'output_skip', 'residual')
PROGRESSIVE_INPUT = ('none', 'input_skip', 'residual')
PROGRESSIVE_COMBINE = ('sum', 'cat')
EMBEDDING_TYPES = ('fourier', 'positional')


def smld_sigmas(sigma_min: float, sigma_max: float, num_scales: int) -> np.ndarray:
  """The *descending* table of SMLD noise levels, `sigmas[0] = sigma_max`, float32."""
  return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales)).astype(np.float32)


class NCSNpp(nn.Module):
  """NCSN++ / DDPM++ score network, `[B, H, W, C], [B] -> [B, H, W, C]`.

  Attributes (score_sde's `config.model` knobs):
    nf: base channel count.
    ch_mult: channel multiplier per resolution level.
    num_res_blocks: residual blocks per level.
    attn_resolutions: resolutions (side length) with self-attention.
    dropout: dropout rate inside residual blocks (train only).
    resamp_with_conv: ddpm blocks: convolve when resampling.
    conditional: condition on the noise level.
    fir: FIR resampling (else nearest / mean).
    fir_kernel: the FIR filter taps.
    skip_rescale: divide residual sums by sqrt(2).
    resblock_type: 'ddpm' | 'biggan'.
    progressive: output pyramid, 'none' | 'output_skip' | 'residual'.
    progressive_input: input pyramid, 'none' | 'input_skip' | 'residual'.
    progressive_combine: how `input_skip` merges, 'sum' | 'cat'.
    embedding_type: 'fourier' (labels are sigma) | 'positional' (labels are times).
    fourier_scale: std of the Fourier frequencies at initialization.
    init_scale: scale of the last layer of each residual / attention block.
    scale_by_sigma: divide the output by sigma (VE).
    centered: inputs are in [-1, 1] (else [0, 1], mapped to [-1, 1]).
    act: activation.
    sigma_min, sigma_max, num_scales: the SMLD sigma table, read only with positional
      embedding and `scale_by_sigma` (labels are then indices into it).
    num_classes: classes of a class-conditional network (a `class_embedding` added to the
      time embedding; needs `conditional`); 0: unconditional, the reference's network.
  """

  nf: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  conditional: bool = True
  fir: bool = True
  fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
  skip_rescale: bool = True
  resblock_type: str = 'biggan'
  progressive: str = 'none'
  progressive_input: str = 'residual'
  progressive_combine: str = 'sum'
  embedding_type: str = 'fourier'
  fourier_scale: float = 16.0
  init_scale: float = 0.0
  scale_by_sigma: bool = True
  centered: bool = False
  act: Callable[[Array], Array] = nn.swish
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  num_scales: int = 1000
  num_classes: int = 0

  def _resnet_block(self, **kwargs) -> nn.Module:
    common = dict(act=self.act, dropout=self.dropout, init_scale=self.init_scale,
                  skip_rescale=self.skip_rescale)
    if self.resblock_type == 'ddpm':
      return blocks.ResnetBlockDDPMpp(**common, **kwargs)
    return blocks.ResnetBlockBigGANpp(**common, fir=self.fir, fir_kernel=self.fir_kernel,
                                      **kwargs)

  def _attn_block(self) -> nn.Module:
    return blocks.AttnBlockpp(init_scale=self.init_scale, skip_rescale=self.skip_rescale)

  def _rescaled_sum(self, a: Array, b: Array) -> Array:
    return (a + b) / np.sqrt(2.0) if self.skip_rescale else a + b

  def _output_conv(self, h: Array, out_ch: int, init_scale: float | None = None) -> Array:
    h = self.act(group_norm(h.shape[-1])(h))
    return conv3x3(h, out_ch, init_scale=self.init_scale if init_scale is None else init_scale)

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False,
               class_labels: Array | None = None) -> Array:
    """Args: x `[B, H, W, C]`; labels `[B]`; train enables dropout; class_labels `[B]`
    (class-conditional networks, `num_classes > 0`; None: no class). Returns `[B, H, W, C]`."""
    check_class_labels(self.num_classes, class_labels)
    channels = x.shape[-1]
    num_resolutions = len(self.ch_mult)

    if self.embedding_type == 'fourier':
      used_sigmas = labels
      temb = GaussianFourierProjection(embedding_size=self.nf, scale=self.fourier_scale)(
          jnp.log(used_sigmas))
    else:
      temb = positional_embedding(labels, self.nf)
      if self.scale_by_sigma:
        sigmas = jnp.asarray(smld_sigmas(self.sigma_min, self.sigma_max, self.num_scales))
        used_sigmas = sigmas[labels.astype(jnp.int32)]
    if self.conditional:
      temb = nn.Dense(self.nf * 4, kernel_init=default_init())(temb)
      temb = nn.Dense(self.nf * 4, kernel_init=default_init())(self.act(temb))
      if self.num_classes:
        temb = add_class_embedding(temb, class_labels, self.num_classes)
    else:
      temb = None

    if not self.centered:
      x = 2 * x - 1.0

    # Downsampling path.
    input_pyramid = x if self.progressive_input != 'none' else None
    hs = [conv3x3(x, self.nf)]
    for i_level in range(num_resolutions):
      for _ in range(self.num_res_blocks):
        h = self._resnet_block(out_ch=self.nf * self.ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = self._attn_block()(h)
        hs.append(h)

      if i_level != num_resolutions - 1:
        if self.resblock_type == 'ddpm':
          h = blocks.Downsample(with_conv=self.resamp_with_conv, fir=self.fir,
                                fir_kernel=self.fir_kernel)(hs[-1])
        else:
          h = self._resnet_block(down=True)(hs[-1], temb, train)

        if self.progressive_input == 'input_skip':
          input_pyramid = blocks.Downsample(fir=self.fir, fir_kernel=self.fir_kernel)(
              input_pyramid)
          h = blocks.Combine(method=self.progressive_combine)(input_pyramid, h)
        elif self.progressive_input == 'residual':
          input_pyramid = blocks.Downsample(out_ch=h.shape[-1], with_conv=True, fir=self.fir,
                                            fir_kernel=self.fir_kernel)(input_pyramid)
          input_pyramid = self._rescaled_sum(input_pyramid, h)
          h = input_pyramid
        hs.append(h)

    h = hs[-1]
    h = self._resnet_block()(h, temb, train)
    h = self._attn_block()(h)
    h = self._resnet_block()(h, temb, train)

    # Upsampling path.
    pyramid = None
    for i_level in reversed(range(num_resolutions)):
      for _ in range(self.num_res_blocks + 1):
        h = self._resnet_block(out_ch=self.nf * self.ch_mult[i_level])(
            jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = self._attn_block()(h)

      if self.progressive != 'none':
        if i_level == num_resolutions - 1:
          if self.progressive == 'output_skip':
            pyramid = self._output_conv(h, channels)
          else:
            pyramid = self._output_conv(h, h.shape[-1], init_scale=1.0)
        elif self.progressive == 'output_skip':
          pyramid = blocks.Upsample(fir=self.fir, fir_kernel=self.fir_kernel)(pyramid)
          pyramid = pyramid + self._output_conv(h, channels)
        else:
          pyramid = blocks.Upsample(out_ch=h.shape[-1], with_conv=True, fir=self.fir,
                                    fir_kernel=self.fir_kernel)(pyramid)
          pyramid = self._rescaled_sum(pyramid, h)
          h = pyramid

      if i_level != 0:
        if self.resblock_type == 'ddpm':
          h = blocks.Upsample(with_conv=self.resamp_with_conv, fir=self.fir,
                              fir_kernel=self.fir_kernel)(h)
        else:
          h = self._resnet_block(up=True)(h, temb, train)

    if hs:
      raise AssertionError('unconsumed skip connections')
    h = pyramid if self.progressive == 'output_skip' else self._output_conv(h, channels)

    if self.scale_by_sigma:
      h = h / used_sigmas.reshape((-1, 1, 1, 1))
    return h
