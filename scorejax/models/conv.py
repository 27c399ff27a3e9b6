"""2-D convolution whose gradient stays fast inside XLA:CPU loops, in every autodiff mode.

XLA:CPU runs a convolution through its fast (Eigen) routine only in the canonical
layout (NHWC images, HWIO kernel). Outside loops it transposes the operands of the
gradient convolutions into that layout; inside a `while` body (a `lax.scan` of fused
training steps, an in-graph ODE solver) it does not, and falls back to a generic loop
nest (jax-ml/jax#12868). Measured here, 3x3 conv 128->128 on 8x32x32: kernel gradient
20 ms outside a scan, 1530 ms inside; input gradient 15 ms / 83 ms. This made
score_sde's JAX training step (which scans) 4-5x slower than PyTorch on CPU.

Design: `conv2d` binds `conv_p`, a JAX primitive for the canonical-layout convolution
`conv_p(lhs [N, H, W, C], rhs [kh, kw, C / G, O]; strides, padding, rhs_dilation,
feature_group_count=G)`. Its value and lowering are `lax.conv_general_dilated` with
`('NHWC', 'HWIO', 'NHWC')`. It is bilinear, so

* forward mode (JVP) is `conv_p(dx, w) + conv_p(x, dw)` (`ad.defbilinear`);
* reverse mode transposes it. On CPU both transposes are again `conv_p` in canonical
  layout, wrapped in linear `lax` ops (pad, slice, transpose, reshape, flip):

  - wrt `lhs` (input gradient): `dy` zero-inserted by the stride (interior padding) and
    edge-padded, convolved with the spatially flipped kernel, input / output channels
    swapped within each group, dilated as the forward kernel was;
  - wrt `rhs` (kernel gradient): the images `x^T` `[C / G, H, W, G N]` (batch C / G,
    features G x N) convolved with `dy^T` `[H', W', N, O]` as the kernel (dilated by
    the stride, G groups), then every `rhs_dilation`-th tap sliced out and transposed.

  Because those rules only use `conv_p` and linear ops, the rule set is closed under
  repeated differentiation: jvp, vjp, jvp-of-vjp (forward-over-reverse), vjp-of-jvp
  (sliced score matching training), ... all stay in canonical layout. `rhs_dilation != 1`
  and `feature_group_count != 1` appear only in these derived convolutions (a kernel
  gradient of a strided conv is dilated by the stride; vmap over kernels uses groups).
  On other platforms (GPU / TPU) the transposes are XLA's native ones (`jax.linear_transpose`
  of the plain `lax` convolution), chosen by `lax.platform_dependent` inside the rules;
  `loop_friendly_grads` / `native_grads` expose both for tests.
* vmap: a batched `lhs` alone is folded into `N`; a batched `rhs` alone into the output
  channels (`O -> G x B x O / G`); both batched (per-example kernels, e.g. `vmap` of a
  gradient) become `B x G` feature groups, as `lax`'s own batching rule does.

On CPU, 3x3 / stride-1 / 'SAME' layers big enough to gain (`WINOGRAD_MIN_FLOPS`) are
computed by Winograd's algorithm instead (`scorejax.models.winograd`): the forward and
input-gradient convolutions through `conv_p`'s CPU lowering, the kernel gradient in the
transpose rule (as matrix products, without transposing the activations). Its values
differ from XLA's convolution by ~1e-6 of their scale; `cpu_winograd(None, None)` turns it
off (it applies to functions traced after the change). Elsewhere forward values are XLA's
convolution, unchanged, except 1x1 / stride-1 / unpadded layers, which on CPU are matrix
products over the channels in all three roles (forward, input gradient, kernel gradient:
XLA ran the latter as a convolution with an image-sized window at ~20 GFLOP/s). On CPU the
gradients cost what XLA's own gradient costs outside loops, and the same inside.
Second-order terms of strided convs run dilated-kernel convolutions (still canonical);
feature-grouped ones (vmap with batched kernels) are left to XLA's grouped convolution,
whose CPU speed was not measured here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from scorejax.models import winograd

Array = jax.Array
Pair = tuple[int, int]
Padding = tuple[tuple[int, int], tuple[int, int]]
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
_NO_PADDING: Padding = ((0, 0), (0, 0))


def _lax_conv(lhs: Array, rhs: Array, *, strides: Pair, padding: Padding, rhs_dilation: Pair,
              feature_group_count: int) -> Array:
  return lax.conv_general_dilated(lhs, rhs, strides, padding, rhs_dilation=rhs_dilation,
                                  dimension_numbers=_DIMENSION_NUMBERS,
                                  feature_group_count=feature_group_count)


# -- the primitive ---------------------------------------------------------------------------

conv_p = Primitive('scorejax_conv2d')


def _conv(lhs: Array, rhs: Array, strides: Pair = (1, 1), padding: Padding = _NO_PADDING,
          rhs_dilation: Pair = (1, 1), feature_group_count: int = 1) -> Array:
  """Binds `conv_p` with hashable parameters."""
  return conv_p.bind(lhs, rhs, strides=tuple(map(int, strides)),
                     padding=tuple((int(a), int(b)) for a, b in padding),
                     rhs_dilation=tuple(map(int, rhs_dilation)),
                     feature_group_count=int(feature_group_count))


def _abstract_eval(lhs, rhs, **params):
  """The output shape and dtype are `lax.conv_general_dilated`'s (its checks included)."""
  out = jax.eval_shape(lambda lhs, rhs: _lax_conv(lhs, rhs, **params),
                       jax.ShapeDtypeStruct(lhs.shape, lhs.dtype),
                       jax.ShapeDtypeStruct(rhs.shape, rhs.dtype))
  return jax.core.ShapedArray(out.shape, out.dtype)


# -- Winograd on CPU ----------------------------------------------------------------------------

# Smallest layer (FLOPs of the direct convolution, 2 B H W C_in C_out 9) computed by Winograd
# on CPU, for the forward / input-gradient convolutions and for the kernel gradient; None:
# never. Crossovers measured on the 2-core development machine (batch 8, interleaved A/B):
# from 2^26 FLOPs up, forwards are 1.1-1.6x faster (16x16x96 -> 32: 1.46x; 8x8x128 -> 128
# equal) and kernel gradients 1.1-1.6x; below, 4x4 and 16x16x32 -> 32 layers are slower.
# On the small DDPM++ (16x16, nf=32) this made the forward ~10% faster than at 2^28.
WINOGRAD_MIN_FLOPS = {'forward': 2**26, 'kernel_grad': 2**26}


@contextlib.contextmanager
def cpu_winograd(forward: int | None, kernel_grad: int | None) -> Iterator[None]:
  """Sets `WINOGRAD_MIN_FLOPS` within the block (None: off). It applies to what is traced
  and compiled inside the block: jit a new function there."""
  saved = dict(WINOGRAD_MIN_FLOPS)
  WINOGRAD_MIN_FLOPS.update(forward=forward, kernel_grad=kernel_grad)
  try:
    yield
  finally:
    WINOGRAD_MIN_FLOPS.update(saved)


def _use_winograd(which: str, lhs: Array, kernel_shape: tuple[int, ...], dtype, *,
                  strides: Pair, padding: Padding, rhs_dilation: Pair,
                  feature_group_count: int) -> bool:
  threshold = WINOGRAD_MIN_FLOPS[which]
  if threshold is None or lhs.dtype != jnp.float32 or dtype != jnp.float32:
    return False
  if not winograd.supported(lhs.shape, kernel_shape, strides, padding, rhs_dilation,
                            feature_group_count):
    return False
  batch, height, width, channels = lhs.shape
  return 18 * batch * height * width * channels * kernel_shape[3] >= threshold


def _is_pointwise(kernel_shape: tuple[int, ...], *, strides: Pair, padding: Padding,
                  rhs_dilation: Pair, feature_group_count: int) -> bool:
  """A 1x1 / stride-1 / unpadded convolution: a matrix product over the channels (a 1x1
  kernel's dilation changes nothing)."""
  return (tuple(kernel_shape[:2]) == (1, 1) and tuple(strides) == (1, 1)
          and tuple(map(tuple, padding)) == _NO_PADDING and feature_group_count == 1)


def _cpu_conv(lhs: Array, rhs: Array, **params) -> Array:
  if _is_pointwise(rhs.shape, **params):
    return lax.dot_general(lhs, rhs[0, 0], (((3,), (0,)), ((), ())))
  if _use_winograd('forward', lhs, rhs.shape, rhs.dtype, **params):
    return winograd.conv3x3(lhs, rhs)
  return _lax_conv(lhs, rhs, **params)


conv_p.def_impl(_lax_conv)
conv_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(conv_p, mlir.lower_fun(_lax_conv, multiple_results=False))
mlir.register_lowering(conv_p, mlir.lower_fun(_cpu_conv, multiple_results=False),
                       platform='cpu')


# -- reverse mode: the transposes as canonical-layout convolutions -----------------------------


def _input_grad(dy: Array, kernel: Array, x_shape: tuple[int, ...], strides: Pair,
                padding: Padding, rhs_dilation: Pair = (1, 1),
                feature_group_count: int = 1) -> Array:
  """The transposed convolution as a forward one: `dy` zero-inserted by the stride and
  padded, convolved with the spatially flipped kernel (input / output swapped per group)."""
  kh, kw, c_group, c_out = kernel.shape
  groups = feature_group_count
  config = [(0, 0, 0)]
  for size, k, s, d, (p0, _), out in zip(x_shape[1:3], (kh, kw), strides, rhs_dilation, padding,
                                         dy.shape[1:3], strict=True):
    span = d * (k - 1) + 1  # the dilated kernel's extent
    config.append((span - 1 - p0, size - s * (out - 1) + p0 - 1, s - 1))
  config.append((0, 0, 0))
  flipped = jnp.flip(kernel, (0, 1)).reshape(kh, kw, c_group, groups, c_out // groups)
  flipped = flipped.transpose(0, 1, 4, 3, 2).reshape(kh, kw, c_out // groups, groups * c_group)
  if all(interior == 0 and low >= 0 and high >= 0 for low, high, interior in config):
    # Stride 1: the edge padding is the convolution's own (a 'SAME' layer's input gradient
    # is again a 'SAME' convolution, which the CPU lowering may run by Winograd).
    return _conv(dy, flipped, (1, 1), tuple((low, high) for low, high, _ in config[1:3]),
                 rhs_dilation, groups)
  dy = lax.pad(dy, jnp.zeros((), dy.dtype), config)
  return _conv(dy, flipped, (1, 1), _NO_PADDING, rhs_dilation, groups)


def _kernel_grad(x: Array, dy: Array, kernel_shape: tuple[int, ...], strides: Pair,
                 padding: Padding, rhs_dilation: Pair = (1, 1),
                 feature_group_count: int = 1) -> Array:
  """`dkernel[i, j] = sum_{b,h,w} x_pad[b, s h + d i, s w + d j]^T dy[b, h, w]` (per group),
  as a forward convolution in canonical layout: images `x^T` `[C / G, H, W, G B]` (batch
  C / G, features G x B) convolved with the kernel `dy` `[H', W', B, C_out]` dilated by the
  stride, in G groups; then every d-th tap."""
  kh, kw, c_group, _ = kernel_shape
  batch, h, w, _ = x.shape
  groups = feature_group_count
  images = x.reshape(batch, h, w, groups, c_group).transpose(4, 1, 2, 3, 0)
  images = images.reshape(c_group, h, w, groups * batch)
  out = _conv(images, dy.transpose(1, 2, 0, 3), (1, 1), padding, strides, groups)
  dh, dw = rhs_dilation
  out = lax.slice(out, (0, 0, 0, 0), (c_group, dh * (kh - 1) + 1, dw * (kw - 1) + 1, out.shape[3]),
                  (1, dh, dw, 1))
  return out.transpose(1, 2, 0, 3)


def _native_input_grad(dy: Array, kernel: Array, x_shape: tuple[int, ...], strides: Pair,
                       padding: Padding, rhs_dilation: Pair = (1, 1),
                       feature_group_count: int = 1) -> Array:
  """XLA's own input gradient (transpose of the `lax` convolution; GPU / TPU)."""
  fn = lambda x: _lax_conv(x, kernel, strides=strides, padding=padding,
                           rhs_dilation=rhs_dilation, feature_group_count=feature_group_count)
  return jax.linear_transpose(fn, jax.ShapeDtypeStruct(x_shape, dy.dtype))(dy)[0]


def _native_kernel_grad(x: Array, dy: Array, kernel_shape: tuple[int, ...], strides: Pair,
                        padding: Padding, rhs_dilation: Pair = (1, 1),
                        feature_group_count: int = 1) -> Array:
  """XLA's own kernel gradient (transpose of the `lax` convolution; GPU / TPU)."""
  fn = lambda kernel: _lax_conv(x, kernel, strides=strides, padding=padding,
                                rhs_dilation=rhs_dilation,
                                feature_group_count=feature_group_count)
  return jax.linear_transpose(fn, jax.ShapeDtypeStruct(kernel_shape, dy.dtype))(dy)[0]


def _transpose_lhs(ct, lhs, rhs, **params):
  shape = lhs.aval.shape
  return lax.platform_dependent(
      ct, rhs,
      cpu=lambda ct, rhs: _input_grad(ct, rhs, shape, **params),
      default=lambda ct, rhs: _native_input_grad(ct, rhs, shape, **params))


def _cpu_kernel_grad(x: Array, dy: Array, kernel_shape: tuple[int, ...], **params) -> Array:
  if _is_pointwise(kernel_shape, **params):
    return lax.dot_general(x, dy, (((0, 1, 2), (0, 1, 2)), ((), ())))[None, None]
  if _use_winograd('kernel_grad', x, kernel_shape, dy.dtype, **params):
    return winograd.kernel_grad3x3(x, dy)
  return _kernel_grad(x, dy, kernel_shape, **params)


def _transpose_rhs(ct, lhs, rhs, **params):
  shape = rhs.aval.shape
  return lax.platform_dependent(
      ct, lhs,
      cpu=lambda ct, lhs: _cpu_kernel_grad(lhs, ct, shape, **params),
      default=lambda ct, lhs: _native_kernel_grad(lhs, ct, shape, **params))


ad.defbilinear(conv_p, _transpose_lhs, _transpose_rhs)


# -- vmap ------------------------------------------------------------------------------------


def _batch_rule(args, dims, *, feature_group_count, **params):
  lhs, rhs = args
  lhs_dim, rhs_dim = dims
  groups = feature_group_count
  if rhs_dim is None:  # fold the batch into N
    lhs = jnp.moveaxis(lhs, lhs_dim, 0)
    out = _conv(lhs.reshape(-1, *lhs.shape[2:]), rhs, feature_group_count=groups, **params)
    return out.reshape(lhs.shape[0], -1, *out.shape[1:]), 0
  rhs = jnp.moveaxis(rhs, rhs_dim, 0)
  size, kh, kw, c_group, c_out = rhs.shape
  per_group = c_out // groups
  if lhs_dim is None:  # fold the batch into the output channels of each group
    kernel = rhs.reshape(size, kh, kw, c_group, groups, per_group)
    kernel = kernel.transpose(1, 2, 3, 4, 0, 5).reshape(kh, kw, c_group, size * c_out)
    out = _conv(lhs, kernel, feature_group_count=groups, **params)
    out = out.reshape(*out.shape[:3], groups, size, per_group)
    return out.transpose(4, 0, 1, 2, 3, 5).reshape(size, *out.shape[:3], c_out), 0
  # Both batched: each batch element is `groups` more feature groups.
  lhs = jnp.moveaxis(lhs, lhs_dim, 3)  # [N, H, W, B, C]
  lhs = lhs.reshape(*lhs.shape[:3], -1)
  kernel = rhs.transpose(1, 2, 3, 0, 4).reshape(kh, kw, c_group, size * c_out)
  out = _conv(lhs, kernel, feature_group_count=size * groups, **params)
  return jnp.moveaxis(out.reshape(*out.shape[:3], size, c_out), 3, 0), 0


batching.primitive_batchers[conv_p] = _batch_rule


# -- the public function -----------------------------------------------------------------------


def conv2d(x: Array, kernel: Array, strides: tuple[int, int] = (1, 1),
           padding: Padding = _NO_PADDING) -> Array:
  """NHWC / HWIO convolution with explicit padding and a loop-friendly gradient.

  Differentiable in every mode and order (jvp, vjp and their compositions) and vmappable;
  see the module docstring.

  Args:
    x: `[B, H, W, C_in]`.
    kernel: `[kh, kw, C_in, C_out]`.
    strides: `(sh, sw)`.
    padding: `((top, bottom), (left, right))`, non-negative.

  Returns:
    `[B, H', W', C_out]`, exactly `lax.conv_general_dilated`'s value.
  """
  return _conv(x, kernel, strides, padding)


def loop_friendly_grads(x: Array, kernel: Array, dy: Array, strides: tuple[int, int],
                        padding: Padding, rhs_dilation: Pair = (1, 1),
                        feature_group_count: int = 1) -> tuple[Array, Array]:
  """`(dx, dkernel)` by two forward convolutions in canonical layout (the CPU gradient)."""
  args = (strides, padding, rhs_dilation, feature_group_count)
  return _input_grad(dy, kernel, x.shape, *args), _kernel_grad(x, dy, kernel.shape, *args)


def native_grads(x: Array, kernel: Array, dy: Array, strides: tuple[int, int],
                 padding: Padding, rhs_dilation: Pair = (1, 1),
                 feature_group_count: int = 1) -> tuple[Array, Array]:
  """`(dx, dkernel)` as XLA differentiates its convolution (the GPU / TPU gradient)."""
  args = (strides, padding, rhs_dilation, feature_group_count)
  return (_native_input_grad(dy, kernel, x.shape, *args),
          _native_kernel_grad(x, dy, kernel.shape, *args))


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
