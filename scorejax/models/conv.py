"""2-D convolution whose gradient stays fast inside XLA:CPU loops.

XLA:CPU computes the kernel gradient of a convolution with a fast (Eigen) routine only
outside loops: inside a `while` body (a `lax.scan` of fused training steps, an
in-graph ODE solver) the backward-filter convolution falls back to a generic loop nest,
about 20x slower (jax-ml/jax#12868; measured here: 3.5 ms -> 89 ms for a 3x3, 64->64
conv on 8x16x16). This made score_sde's JAX training step 4-5x slower than PyTorch on
CPU. `conv2d` keeps XLA's forward convolution and gives it a custom gradient:

* input gradient: stride 1: the transposed convolution written as a *forward*
  convolution of `dy` with the flipped kernel; other strides: XLA's own;
* kernel gradient: `sum_{b,h,w} x[b, s h + i, s w + j, :]^T dy[b, h, w, :]` as one
  matrix product per kernel tap (9 for 3x3), which XLA runs as GEMMs anywhere.

On other platforms (GPU / TPU) the gradient is XLA's native one (`lax.platform_dependent`).
Forward values are XLA's convolution, unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Padding = tuple[tuple[int, int], tuple[int, int]]
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def _conv(x: Array, kernel: Array, strides: tuple[int, int], padding: Padding) -> Array:
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=_DIMENSION_NUMBERS)


def _kernel_grad(x: Array, dy: Array, kernel_shape: tuple[int, ...], strides: tuple[int, int],
                 padding: Padding) -> Array:
  kh, kw, c_in, c_out = kernel_shape
  (p0, p1), (q0, q1) = padding
  xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (p0, p1, 0), (q0, q1, 0), (0, 0, 0)])
  batch, out_h, out_w, _ = dy.shape
  sh, sw = strides
  dy_flat = dy.reshape(-1, c_out)
  taps = []
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(xp, (0, i, j, 0),
                         (batch, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, c_in),
                         (1, sh, sw, 1))
      taps.append(jnp.dot(window.reshape(-1, c_in).T, dy_flat))
  return jnp.stack(taps).reshape(kh, kw, c_in, c_out)


def _input_grad(dy: Array, kernel: Array, x_shape: tuple[int, ...], strides: tuple[int, int],
                padding: Padding) -> Array:
  kh, kw = kernel.shape[:2]
  (p0, p1), (q0, q1) = padding
  expected_h = x_shape[1] + p0 + p1 - kh + 1
  expected_w = x_shape[2] + q0 + q1 - kw + 1
  if strides != (1, 1) or dy.shape[1:3] != (expected_h, expected_w):
    _, vjp = jax.vjp(lambda x: _conv(x, kernel, strides, padding),
                     jnp.zeros(x_shape, dy.dtype))
    return vjp(dy)[0]
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
  return _conv(dy, flipped, (1, 1), ((kh - 1 - p0, kh - 1 - p1), (kw - 1 - q0, kw - 1 - q1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: Array, kernel: Array, strides: tuple[int, int] = (1, 1),
           padding: Padding = ((0, 0), (0, 0))) -> Array:
  """NHWC / HWIO convolution with explicit padding and a loop-friendly gradient.

  Args:
    x: `[B, H, W, C_in]`.
    kernel: `[kh, kw, C_in, C_out]`.
    strides: `(sh, sw)`.
    padding: `((top, bottom), (left, right))`, non-negative.

  Returns:
    `[B, H', W', C_out]`, exactly `lax.conv_general_dilated`'s value.
  """
  return _conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def loop_friendly_grads(x: Array, kernel: Array, dy: Array, strides: tuple[int, int],
                        padding: Padding) -> tuple[Array, Array]:
  """`(dx, dkernel)` by a forward convolution and per-tap GEMMs (the CPU gradient)."""
  return (_input_grad(dy, kernel, x.shape, strides, padding),
          _kernel_grad(x, dy, kernel.shape, strides, padding))


def native_grads(x: Array, kernel: Array, dy: Array, strides: tuple[int, int],
                 padding: Padding) -> tuple[Array, Array]:
  """`(dx, dkernel)` as XLA differentiates its convolution (the GPU / TPU gradient)."""
  _, vjp = jax.vjp(lambda x, kernel: _conv(x, kernel, strides, padding), x, kernel)
  return vjp(dy)


def _conv2d_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  return lax.platform_dependent(
      x, kernel, dy,
      cpu=lambda *args: loop_friendly_grads(*args, strides, padding),
      default=lambda *args: native_grads(*args, strides, padding))


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def resolve_padding(padding: str | Sequence[tuple[int, int]], in_hw: tuple[int, int],
                    kernel_hw: tuple[int, int], strides: tuple[int, int]) -> Padding:
  """Explicit `((top, bottom), (left, right))` for 'SAME' / 'VALID' or explicit pads."""
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(in_hw, kernel_hw, strides, padding)
  else:
    pads = padding
  return tuple((int(a), int(b)) for a, b in pads)


class Conv(nn.Module):
  """`nn.Conv` for NHWC images (parameters `kernel [kh, kw, C_in, C_out]`, `bias`) on
  `conv2d`. Named `Conv`, so Flax names its instances `Conv_<k>` as it does `nn.Conv`."""

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: str | Sequence[tuple[int, int]] = 'SAME'
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features))
    padding = resolve_padding(self.padding, x.shape[1:3], self.kernel_size, self.strides)
    y = conv2d(x, kernel, tuple(self.strides), padding)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,))
    return y
