"""2-D convolution whose gradient stays fast inside XLA:CPU loops.

XLA:CPU runs a convolution through its fast (Eigen) routine only in the canonical
layout (NHWC images, HWIO kernel). Outside loops it transposes the operands of the
gradient convolutions into that layout; inside a `while` body (a `lax.scan` of fused
training steps, an in-graph ODE solver) it does not, and falls back to a generic loop
nest (jax-ml/jax#12868). Measured here, 3x3 conv 128->128 on 8x32x32: kernel gradient
20 ms outside a scan, 1530 ms inside; input gradient 15 ms / 83 ms. This made
score_sde's JAX training step (which scans) 4-5x slower than PyTorch on CPU.

`conv2d` keeps XLA's forward convolution and, on CPU, writes both gradients as forward
convolutions in the canonical layout, with explicit transposes:

* input gradient: `dy` zero-inserted by the stride and padded, convolved with the
  spatially flipped kernel (input / output channels swapped);
* kernel gradient: the images `x^T` `[C_in, H, W, B]` (batch C_in, features B)
  convolved with `dy^T` `[H', W', B, C_out]` as the kernel (dilated by the stride).

They cost what XLA's own gradient costs outside loops and the same inside. On other
platforms (GPU / TPU) the gradient is XLA's native one (`lax.platform_dependent`).
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
  """`dkernel[i, j] = sum_{b,h,w} x_pad[b, s h + i, s w + j]^T dy[b, h, w]`, as a forward
  convolution in canonical layout: images `x^T` `[C_in, H, W, B]` (batch C_in, features
  B) convolved with the kernel `dy` `[H', W', B, C_out]` dilated by the stride."""
  kh, kw = kernel_shape[:2]
  out = lax.conv_general_dilated(
      x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), padding,
      rhs_dilation=strides, dimension_numbers=_DIMENSION_NUMBERS)
  return out[:, :kh, :kw, :].transpose(1, 2, 0, 3)


def _input_grad(dy: Array, kernel: Array, x_shape: tuple[int, ...], strides: tuple[int, int],
                padding: Padding) -> Array:
  """The transposed convolution as a forward one: `dy` zero-inserted by the stride and
  padded, convolved with the spatially flipped kernel (input / output swapped)."""
  kh, kw = kernel.shape[:2]
  (p0, _), (q0, _) = padding
  sh, sw = strides
  out_h, out_w = dy.shape[1:3]
  config = [(0, 0, 0),
            (kh - 1 - p0, x_shape[1] - sh * (out_h - 1) + p0 - 1, sh - 1),
            (kw - 1 - q0, x_shape[2] - sw * (out_w - 1) + q0 - 1, sw - 1),
            (0, 0, 0)]
  dy = lax.pad(dy, jnp.zeros((), dy.dtype), config)
  return _conv(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), (1, 1), ((0, 0), (0, 0)))


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
  """`(dx, dkernel)` by two forward convolutions in canonical layout (the CPU gradient)."""
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
