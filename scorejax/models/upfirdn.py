"""FIR resampling of NHWC images (StyleGAN2's upfirdn2d), in JAX.

`upfirdn2d` zero-inserts (`up`), zero-pads (negative pads crop), convolves with a FIR
filter and keeps every `down`-th sample, along H and W. The resamplers of NCSN++ are
built on it: `upsample_2d` / `downsample_2d` (parameter-free FIR up/down-sampling) and
the fused `upsample_conv_2d` / `conv_downsample_2d` (a 3x3 conv with FIR resampling,
StyleGAN2's "optimal" up/down-sampling convolutions).

Filters are static numpy arrays: they are normalized once, in float32, when the graph
is traced, never recomputed per call. A 1-D filter `k` stands for the separable 2-D
filter `outer(k, k) / sum(k)^2` and is applied as two 1-D passes of shifted slices,
which XLA fuses into elementwise loops (no depthwise convolution).

References:
  Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"
  (StyleGAN2), Appendix B; Song et al. 2021, Appendix H (NCSN++ uses FIR resampling).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from scorejax.models.conv import conv2d

Array = jax.Array

# NHWC spatial axes.
_H, _W = 1, 2


def setup_kernel(k: Sequence[float] | np.ndarray) -> np.ndarray:
  """Normalizes a FIR filter to unit sum, as float32.

  Args:
    k: a 1-D (separable) or 2-D filter.

  Returns:
    The filter divided by its sum; a 1-D `k` stays 1-D (its separable 2-D form is
    `outer(k, k)`, whose sum is the square of the 1-D sum, so normalizing per axis
    gives the same filter).

  Raises:
    ValueError: for filters that are not 1-D or square 2-D, or sum to zero.
  """
  k = np.asarray(k, dtype=np.float32)
  if k.ndim not in (1, 2) or (k.ndim == 2 and k.shape[0] != k.shape[1]) or k.size == 0:
    raise ValueError(f'FIR filter must be 1-D or square 2-D, got shape {k.shape}')
  total = np.sum(k, dtype=np.float32)
  if total == 0:
    raise ValueError('FIR filter sums to zero and cannot be normalized')
  return k / total


def _fir_axis(x: Array, taps: np.ndarray, up: int, down: int, pad: tuple[int, int],
              axis: int) -> Array:
  """1-D upfirdn along `axis`; `taps` are the (already flipped) correlation weights."""
  pad0, pad1 = pad
  # Zero insertion (up - 1 zeros after every sample) and padding in one lax.pad;
  # negative padding crops.
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (pad0, pad1 + up - 1, up - 1)
  x = lax.pad(x, jnp.zeros((), x.dtype), config)
  num_out = (x.shape[axis] - len(taps)) // down + 1
  if num_out <= 0:
    raise ValueError(f'FIR filter of {len(taps)} taps is longer than the padded signal')
  out = None
  for j, tap in enumerate(taps):
    if tap == 0:
      continue
    window = lax.slice_in_dim(x, j, j + (num_out - 1) * down + 1, stride=down, axis=axis)
    term = window * tap
    out = term if out is None else out + term
  return out if out is not None else jnp.zeros_like(
      lax.slice_in_dim(x, 0, (num_out - 1) * down + 1, stride=down, axis=axis))


def upfirdn2d(x: Array, k: np.ndarray, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> Array:
  """Upsample, pad, FIR-filter (true convolution) and downsample `x [B, H, W, C]`.

  Args:
    x: images `[B, H, W, C]`.
    k: a 1-D separable or a 2-D filter, used as given (not normalized).
    up: zero-insertion factor.
    down: decimation factor.
    pad: `(before, after)` padding of both spatial axes after zero insertion.

  Returns:
    `[B, H', W', C]` with `H' = (H up + pad0 + pad1 - len(k)) // down + 1`.
  """
  k = np.asarray(k, dtype=np.float32)
  if k.ndim == 1:
    taps = k[::-1]
    x = _fir_axis(x, taps, up, down, pad, _H)
    return _fir_axis(x, taps, up, down, pad, _W)
  # General 2-D filter: zero-insert and pad both axes, then sum shifted windows.
  config = [(0, 0, 0)] * x.ndim
  for axis in (_H, _W):
    config[axis] = (pad[0], pad[1] + up - 1, up - 1)
  x = lax.pad(x, jnp.zeros((), x.dtype), config)
  taps = k[::-1, ::-1]
  out_h = (x.shape[_H] - taps.shape[0]) // down + 1
  out_w = (x.shape[_W] - taps.shape[1]) // down + 1
  out = jnp.zeros(x.shape[:1] + (out_h, out_w) + x.shape[3:], x.dtype)
  for i in range(taps.shape[0]):
    for j in range(taps.shape[1]):
      if taps[i, j] == 0:
        continue
      window = lax.slice(x, (0, i, j, 0),
                         (x.shape[0], i + (out_h - 1) * down + 1, j + (out_w - 1) * down + 1,
                          x.shape[3]), (1, down, down, 1))
      out = out + window * taps[i, j]
  return out


@functools.lru_cache(maxsize=64)
def _scaled_cached(k: tuple, gain: float, factor: int) -> np.ndarray:
  k = setup_kernel(np.asarray(k, np.float32))
  if k.ndim == 1:
    return (k * np.float32(factor * np.sqrt(gain))).astype(np.float32)
  return (k * np.float32(gain * factor**2)).astype(np.float32)


def _scaled(k: Sequence[float], gain: float, factor: int) -> np.ndarray:
  """Normalized filter with DC gain `gain * factor^2` spread over the two axes (computed
  once per filter, gain and factor)."""
  k = np.asarray(k, np.float32)
  key = tuple(map(tuple, k)) if k.ndim == 2 else tuple(k.tolist())
  return _scaled_cached(key, float(gain), int(factor))


def upsample_2d(x: Array, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2,
                gain: float = 1.0) -> Array:
  """FIR upsampling `[B, H, W, C] -> [B, H factor, W factor, C]` (constant images keep
  their value times `gain`)."""
  k = _scaled(k, gain, factor)
  p = k.shape[0] - factor
  return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Array, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2,
                  gain: float = 1.0) -> Array:
  """FIR downsampling `[B, H, W, C] -> [B, H / factor, W / factor, C]`."""
  k = _scaled(k, gain, 1)
  p = k.shape[0] - factor
  return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def conv_downsample_2d(x: Array, w: Array, k: Sequence[float] = (1, 3, 3, 1),
                       factor: int = 2, gain: float = 1.0) -> Array:
  """Fused FIR blur + strided convolution (`conv2d` then `downsample_2d`, padded once).

  Args:
    x: `[B, H, W, C_in]`.
    w: kernel `[kh, kw, C_in, C_out]` (HWIO), `kh == kw` odd.
    k: FIR filter.
    factor: downsampling factor.
    gain: DC gain of the filter.

  Returns:
    `[B, H / factor, W / factor, C_out]`.
  """
  conv_size = w.shape[0]
  k = _scaled(k, gain, 1)
  p = (k.shape[0] - factor) + (conv_size - 1)
  x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
  return conv2d(x, w, (factor, factor), ((0, 0), (0, 0)))


def upsample_conv_2d(x: Array, w: Array, k: Sequence[float] = (1, 3, 3, 1),
                     factor: int = 2, gain: float = 1.0) -> Array:
  """Fused transposed convolution + FIR blur (`upsample_2d` then `conv2d`, padded once).

  Follows the JAX original of score_sde (TF `conv2d_transpose`, 'VALID'): a correlation
  of the zero-inserted input with `w`, padded by `kw - 1`, then the FIR filter.

  Args:
    x: `[B, H, W, C_in]`.
    w: kernel `[kh, kw, C_in, C_out]` (HWIO), `kh == kw` odd.
    k: FIR filter.
    factor: upsampling factor.
    gain: DC gain of the filter.

  Returns:
    `[B, H factor, W factor, C_out]`.
  """
  conv_size = w.shape[0]
  k = _scaled(k, gain, factor)
  p = (k.shape[0] - factor) - (conv_size - 1)
  # Zero insertion, then a 'full' correlation (TF's conv2d_transpose, VALID).
  x = lax.pad(x, jnp.zeros((), x.dtype),
              [(0, 0, 0), (0, 0, factor - 1), (0, 0, factor - 1), (0, 0, 0)])
  pad = conv_size - 1
  x = conv2d(x, w, (1, 1), ((pad, pad), (pad, pad)))
  return upfirdn2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
  """Nearest-neighbour upsampling `[B, H, W, C] -> [B, H factor, W factor, C]`."""
  B, H, W, C = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (B, H, factor, W, factor, C))
  return x.reshape(B, H * factor, W * factor, C)


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
  """Average pooling over `factor x factor` blocks."""
  B, H, W, C = x.shape
  return jnp.mean(x.reshape(B, H // factor, factor, W // factor, factor, C), axis=(2, 4))
