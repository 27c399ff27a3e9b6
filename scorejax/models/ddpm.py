"""The original DDPM U-Net (Ho et al. 2020), as score_sde's `ddpm` model (NHWC).

Sinusoidal embedding of the integer time step, DDPM residual blocks with 32-group
GroupNorm, attention at `attn_resolutions`, strided-conv / nearest+conv resampling.
Parameter names follow the reference (`Dense_0`, `Conv_0`, `ResnetBlockDDPM_k`,
`AttnBlock_k`, `Downsample_k`, `Upsample_k`, `GroupNorm_0`, `Conv_1`).

References:
  Ho et al. 2020, "Denoising Diffusion Probabilistic Models", NeurIPS, Appendix B.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from scorejax.models import blocks
from scorejax.models.layers import (
    add_class_embedding,
    check_class_labels,
    conv3x3,
    default_init,
    group_norm,
    positional_embedding,
)
from scorejax.models.ncsnpp import smld_sigmas

Array = jax.Array


class DDPM(nn.Module):
  """DDPM U-Net, `[B, H, W, C], [B] -> [B, H, W, C]`.

  Attributes:
    nf: base channel count; ch_mult: per-level multipliers; num_res_blocks: blocks per
    level; attn_resolutions: resolutions with attention; dropout: residual dropout;
    resamp_with_conv: convolve when resampling (the blocks are always conditioned on
    the time embedding, as in the reference, whatever `conditional` says);
    scale_by_sigma: divide by `sigmas[labels]` (SMLD table); centered:
    inputs in [-1, 1]; act: activation; sigma_min / sigma_max / num_scales: the SMLD
    table used by `scale_by_sigma`; num_classes: classes of a class-conditional network
    (a `class_embedding` added to the time embedding; 0: unconditional).
  """

  nf: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  scale_by_sigma: bool = False
  centered: bool = True
  act: Callable[[Array], Array] = nn.swish
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  num_scales: int = 1000
  num_classes: int = 0

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False,
               class_labels: Array | None = None) -> Array:
    """Args: x `[B, H, W, C]`; labels `[B]` time steps; train enables dropout; class_labels
    `[B]` (class-conditional networks, `num_classes > 0`; None: no class)."""
    check_class_labels(self.num_classes, class_labels)
    num_resolutions = len(self.ch_mult)
    temb = positional_embedding(labels, self.nf)
    temb = nn.Dense(self.nf * 4, kernel_init=default_init())(temb)
    temb = nn.Dense(self.nf * 4, kernel_init=default_init())(self.act(temb))
    if self.num_classes:
      temb = add_class_embedding(temb, class_labels, self.num_classes)

    def resnet_block(out_ch=None):
      return blocks.ResnetBlockDDPM(act=self.act, out_ch=out_ch, dropout=self.dropout)

    h = x if self.centered else 2 * x - 1.0
    hs = [conv3x3(h, self.nf)]
    for i_level in range(num_resolutions):
      for _ in range(self.num_res_blocks):
        h = resnet_block(self.nf * self.ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = blocks.AttnBlock()(h)
        hs.append(h)
      if i_level != num_resolutions - 1:
        hs.append(blocks.Downsample(with_conv=self.resamp_with_conv)(hs[-1]))

    h = hs[-1]
    h = resnet_block()(h, temb, train)
    h = blocks.AttnBlock()(h)
    h = resnet_block()(h, temb, train)

    for i_level in reversed(range(num_resolutions)):
      for _ in range(self.num_res_blocks + 1):
        h = resnet_block(self.nf * self.ch_mult[i_level])(
            jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = blocks.AttnBlock()(h)
      if i_level != 0:
        h = blocks.Upsample(with_conv=self.resamp_with_conv)(h)

    if hs:
      raise AssertionError('unconsumed skip connections')
    h = self.act(group_norm(h.shape[-1], 32)(h))
    h = conv3x3(h, x.shape[-1], init_scale=0.0)
    if self.scale_by_sigma:
      sigmas = jnp.asarray(smld_sigmas(self.sigma_min, self.sigma_max, self.num_scales))
      h = h / sigmas[labels.astype(jnp.int32)].reshape((-1, 1, 1, 1))
    return h
