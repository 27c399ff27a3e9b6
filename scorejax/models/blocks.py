"""Residual, attention and resampling blocks of NCSN++ / DDPM++ and DDPM (NHWC).

Class names and the order in which each block creates its submodules follow
score_sde's JAX layers (`layerspp.py`, `layers.py`, `up_or_down_sampling.py`): Flax
names a submodule `<Class>_<k>`, so a block's parameters are `GroupNorm_0`,
`Conv_0`, `Dense_0`, `NIN_0`, `Conv2d_0`, ... exactly as in the reference's JAX
checkpoints and its PyTorch `state_dict` (which kept those names).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scorejax.models import upfirdn
from scorejax.models.conv import conv2d
from scorejax.models.dropout import Dropout
from scorejax.models.layers import NIN, conv1x1, conv3x3, default_init, group_norm

Array = jax.Array
_SQRT2 = np.sqrt(2.0)


def _nearest_upsample(x: Array) -> Array:
  return upfirdn.naive_upsample_2d(x, 2)


def _residual(x: Array, h: Array, skip_rescale: bool) -> Array:
  return (x + h) / _SQRT2 if skip_rescale else x + h


class Conv2d(nn.Module):
  """Convolution with optional FIR up/down-sampling fused in (StyleGAN2).

  Parameters `weight [k, k, C_in, fmaps]` (HWIO) and `bias [fmaps]`, named as in the
  reference.
  """

  fmaps: int
  kernel: int = 3
  up: bool = False
  down: bool = False
  resample_kernel: tuple[int, ...] = (1, 3, 3, 1)
  use_bias: bool = True
  kernel_init: Callable = default_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.up and self.down:
      raise ValueError('Conv2d: up and down are exclusive')
    w = self.param('weight', self.kernel_init, (self.kernel, self.kernel, x.shape[-1], self.fmaps))
    if self.up:
      x = upfirdn.upsample_conv_2d(x, w, k=self.resample_kernel)
    elif self.down:
      x = upfirdn.conv_downsample_2d(x, w, k=self.resample_kernel)
    else:
      pad = self.kernel // 2
      x = conv2d(x, w, (1, 1), ((pad, pad), (pad, pad)))
    if self.use_bias:
      x = x + self.param('bias', nn.initializers.zeros, (self.fmaps,))
    return x


class Combine(nn.Module):
  """Merges the input pyramid into the feature map: `Conv_0(pyramid) + h` or a concat."""

  method: str = 'sum'

  @nn.compact
  def __call__(self, pyramid: Array, h: Array) -> Array:
    y = conv1x1(pyramid, h.shape[-1])
    if self.method == 'sum':
      return y + h
    if self.method == 'cat':
      return jnp.concatenate([y, h], axis=-1)
    raise ValueError(f"unknown progressive_combine {self.method!r}; valid: ['cat', 'sum']")


class AttnBlockpp(nn.Module):
  """Self-attention over all `H W` positions, one head, with a residual connection.

  References:
    Ho et al. 2020 (DDPM), Appendix B; Song et al. 2021, Appendix H.
  """

  skip_rescale: bool = False
  init_scale: float = 0.0
  num_groups: int | None = None  # None: min(C // 4, 32)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    B, H, W, C = x.shape
    h = group_norm(C, self.num_groups)(x)
    q = NIN(C)(h).reshape(B, H * W, C)
    k = NIN(C)(h).reshape(B, H * W, C)
    v = NIN(C)(h).reshape(B, H * W, C)
    w = jnp.einsum('bic,bjc->bij', q, k) * (int(C) ** (-0.5))
    w = jax.nn.softmax(w, axis=-1)
    h = jnp.einsum('bij,bjc->bic', w, v).reshape(B, H, W, C)
    h = NIN(C, init_scale=self.init_scale)(h)
    return _residual(x, h, self.skip_rescale)


class AttnBlock(AttnBlockpp):
  """DDPM's attention block: 32 groups, no rescaled skip."""

  skip_rescale: bool = False
  init_scale: float = 0.0
  num_groups: int | None = 32


class Upsample(nn.Module):
  """x2 upsampling: nearest (+ 3x3 `Conv_0`), or FIR (+ fused `Conv2d_0`)."""

  out_ch: int | None = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: tuple[int, ...] = (1, 3, 3, 1)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_ch = self.out_ch or x.shape[-1]
    if not self.fir:
      h = _nearest_upsample(x)
      return conv3x3(h, out_ch) if self.with_conv else h
    if not self.with_conv:
      return upfirdn.upsample_2d(x, self.fir_kernel, factor=2)
    return Conv2d(out_ch, kernel=3, up=True, resample_kernel=self.fir_kernel)(x)


class Downsample(nn.Module):
  """/2 downsampling: strided 3x3 `Conv_0` or 2x2 mean, or FIR (+ fused `Conv2d_0`)."""

  out_ch: int | None = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: tuple[int, ...] = (1, 3, 3, 1)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_ch = self.out_ch or x.shape[-1]
    if not self.fir:
      if self.with_conv:
        # TF 'SAME' for a stride-2 3x3 conv on an even size: one row / column after.
        return conv3x3(x, out_ch, stride=2, padding=((0, 1), (0, 1)))
      return upfirdn.naive_downsample_2d(x, 2)
    if not self.with_conv:
      return upfirdn.downsample_2d(x, self.fir_kernel, factor=2)
    return Conv2d(out_ch, kernel=3, down=True, resample_kernel=self.fir_kernel)(x)


class ResnetBlockDDPMpp(nn.Module):
  """DDPM residual block: `GN, act, conv, + Dense(act(temb)), GN, act, dropout, conv`.

  The shortcut is `NIN_0` (or a 3x3 `Conv_2` with `conv_shortcut`) when channels change.
  """

  act: Callable[[Array], Array]
  out_ch: int | None = None
  conv_shortcut: bool = False
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.0
  num_groups: int | None = None  # None: min(C // 4, 32)

  @nn.compact
  def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
    C = x.shape[-1]
    out_ch = self.out_ch or C
    h = self.act(group_norm(C, self.num_groups)(x))
    h = conv3x3(h, out_ch)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init())(self.act(temb))[:, None, None, :]
    h = self.act(group_norm(out_ch, self.num_groups)(h))
    h = Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=self.init_scale)
    if C != out_ch:
      x = conv3x3(x, out_ch) if self.conv_shortcut else NIN(out_ch)(x)
    return _residual(x, h, self.skip_rescale)


class ResnetBlockDDPM(ResnetBlockDDPMpp):
  """The original DDPM block: 32 groups, zero-initialized last conv, plain skip."""

  num_groups: int | None = 32


class ResnetBlockBigGANpp(nn.Module):
  """BigGAN-style residual block that can also resample by 2 (FIR or nearest / mean).

  Both the residual branch (after the first activation) and the skip are resampled;
  the skip gets a 1x1 `Conv_2` when channels change or the block resamples.
  """

  act: Callable[[Array], Array]
  out_ch: int | None = None
  up: bool = False
  down: bool = False
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.0

  def _resample(self, x: Array) -> Array:
    if self.up:
      if self.fir:
        return upfirdn.upsample_2d(x, self.fir_kernel, factor=2)
      return _nearest_upsample(x)
    if self.down:
      if self.fir:
        return upfirdn.downsample_2d(x, self.fir_kernel, factor=2)
      return upfirdn.naive_downsample_2d(x, 2)
    return x

  @nn.compact
  def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
    C = x.shape[-1]
    out_ch = self.out_ch or C
    h = self.act(group_norm(C)(x))
    h, x = self._resample(h), self._resample(x)
    h = conv3x3(h, out_ch)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init())(self.act(temb))[:, None, None, :]
    h = self.act(group_norm(out_ch)(h))
    h = Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=self.init_scale)
    if C != out_ch or self.up or self.down:
      x = conv1x1(x, out_ch)
    return _residual(x, h, self.skip_rescale)
