"""Winograd convolutions for 3x3 / stride-1 / 'SAME' layers on XLA:CPU.

On CPU, XLA runs a convolution through a library kernel (YNNPACK) at ~190-200 GFLOP/s on
the 2-core development machine, while oneDNN (PyTorch) reaches ~230-250 on the same
layers. Winograd's minimal filtering algorithm F(2x2, 3x3) computes a 3x3 convolution
with 16 products per 2x2 output tile instead of 36: the work becomes 16 independent
matrix products `[tiles, C_in] @ [C_in, C_out]` (2.25x fewer FLOPs) between cheap linear
transforms of the input tiles, the kernel and the output tiles.

- `conv3x3(x, w)`: `y = A^T [(G w G^T) * (B^T d B)] A` per 4x4 input tile `d` (stride 2).
- `kernel_grad3x3(x, dy)`: the kernel gradient `dw[i, j] = sum_{b,h,w} x_pad[b, h+i, w+j]
  dy[b, h, w]` is a correlation with a 2x2 'filter' (a tile of `dy`) and a 3x3 output,
  F(3x3, 2x2): `dw = A'^T [sum_tiles (B^T d B) (G' g G'^T)] A'`. The sum over tiles is the
  contraction of the 16 matrix products, so the activations are never transposed to
  `[C, H, W, B]` (which the convolution form of the kernel gradient needs).

Both are exact in exact arithmetic; in float32 they differ from the direct convolution by
~1e-6 of the output's scale (the transforms only use 0, +-1 and +-1/2). The transformed
operands are 4x the activations; the batch is processed in chunks (a `lax.map` /
`lax.scan`) so that they stay in cache, which is worth ~1.5x on 32x32x256 layers here. The 16
transformed operands stay 16 arrays, each with its own matrix product: stacking them into one
batched product costs a copy of all of them, and XLA:CPU ran the batched kernel-gradient
product (a contraction over the tiles) 1.1-2.3x slower than 16 separate ones.
`scorejax.models.conv` uses these on CPU for the layers `supported` accepts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
_HIGHEST = lax.Precision.HIGHEST
# Images per chunk: at most this many tiles x channels (~8 MB per transformed float32 operand).
_CHUNK_ELEMENTS = 1 << 17


def supported(lhs_shape, rhs_shape, strides, padding, rhs_dilation, feature_group_count) -> bool:
  """Whether `conv3x3` / `kernel_grad3x3` compute this convolution (NHWC / HWIO)."""
  _, height, width, _ = lhs_shape
  return (tuple(rhs_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
          and tuple(map(tuple, padding)) == ((1, 1), (1, 1)) and tuple(rhs_dilation) == (1, 1)
          and feature_group_count == 1 and height % 2 == 0 and width % 2 == 0)


def _images_per_chunk(batch: int, tiles_per_image: int, channels: int) -> int:
  limit = max(1, _CHUNK_ELEMENTS // (tiles_per_image * channels))
  return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= limit)


# Transform matrices: each output of a transform is a signed sum of a few strided views of its
# input, written out term by term so that XLA fuses each output into one pass over them.
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))  # B^T, F(2,3) and F(3,2)
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))  # A^T of F(2x2, 3x3)
_GT = ((1, 0), (0.5, 0.5), (0.5, -0.5), (0, 1))  # G' of F(3x3, 2x2), on the 2x2 dy tiles
_AT3 = ((1, 1, 1, 0), (0, 1, -1, 0), (0, 1, 1, -1))  # A'^T of F(3x3, 2x2)
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))  # G of F(2x2, 3x3)


def _combine(left, right, view):
  """`[sum_ij left[p][i] right[q][j] view(i, j) for p, q]`: the 2-D transform `L d R^T`
  of tiles whose element (i, j) is the array `view(i, j)`."""
  out = []
  for lrow in left:
    for rrow in right:
      total = None
      for i, a in enumerate(lrow):
        for j, b in enumerate(rrow):
          if a * b == 0:
            continue
          term = view(i, j)
          term = term if a * b == 1 else (-term if a * b == -1 else term * (a * b))
          total = term if total is None else total + term
      out.append(total)
  return out


def _data_transform(x: Array) -> list[Array]:
  """`[b, H, W, C]` -> `B^T d B` of every 4x4 tile of the padded image: 16 `[b H W / 4, C]`."""
  b, height, width, channels = x.shape
  h, w = height // 2, width // 2
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  blocks = padded.reshape(b, h + 1, 2, w + 1, 2, channels)
  # Tile (ty, tx) element (i, j) is padded[2 ty + i, 2 tx + j]: block (ty + i // 2, tx + j // 2).
  view = lambda i, j: blocks[:, i // 2:i // 2 + h, i % 2, j // 2:j // 2 + w, j % 2]
  return [t.reshape(b * h * w, channels) for t in _combine(_BT, _BT, view)]


def _kernel_transform(kernel: Array) -> Array:
  """`[3, 3, C, O]` -> `G g G^T`, `[16, C, O]` (one small matrix product)."""
  g = jnp.asarray(_G, kernel.dtype)
  gg = jnp.einsum('ai,bj->abij', g, g).reshape(16, 9)
  flat = kernel.reshape(9, -1)
  return jnp.dot(gg, flat, precision=_HIGHEST).reshape(16, *kernel.shape[2:])


def _output_transform(m: list[Array], b: int, h: int, w: int) -> Array:
  """16 `[b h w, O]` -> `A^T m A` per tile, interleaved into `[b, 2h, 2w, O]`."""
  m = [t.reshape(b, h, w, -1) for t in m]
  y = _combine(_AT, _AT, lambda i, j: m[4 * i + j])  # y[2 r + s]: output (r, s) of every tile
  y = jnp.stack([jnp.stack(y[2 * r:2 * r + 2], 3) for r in range(2)], 2)  # [b, h, 2, w, 2, O]
  return y.reshape(b, 2 * h, 2 * w, -1)


def _grad_transform(dy: Array) -> list[Array]:
  """`[b, H, W, O]` -> `G' g G'^T` of every 2x2 tile of `dy`: 16 `[b H W / 4, O]`."""
  b, height, width, channels = dy.shape
  h, w = height // 2, width // 2
  # The views are taken from a padded copy (the padding itself is never read): XLA fuses the
  # producer of `dy` (in a backward pass often a long sum of cotangents) into the pad once.
  # Without it, the producer is fused into each of the 16 transform outputs and evaluated
  # 16 times (~10% of the CIFAR-10 DDPM++ train step on CPU). A `lax.optimization_barrier`
  # on `dy` did not prevent this (it is gone from XLA:CPU's optimized HLO; fusions unchanged).
  padded = jnp.pad(dy, ((0, 0), (0, 2), (0, 2), (0, 0)))
  blocks = padded.reshape(b, h + 1, 2, w + 1, 2, channels)[:, :h, :, :w]
  tiles = _combine(_GT, _GT, lambda i, j: blocks[:, :, i, :, j])
  return [t.reshape(b * h * w, channels) for t in tiles]


def _kernel_output_transform(m: list[Array]) -> Array:
  """16 `[C, O]` -> `A'^T m A'`, `[3, 3, C, O]`."""
  return jnp.stack(_combine(_AT3, _AT3, lambda i, j: m[4 * i + j])).reshape(3, 3, *m[0].shape)


def _split(a: Array, images: int) -> Array:
  """`[B, ...]` -> `[B / images, images, ...]`, chunk `j` = images `j, j + n, j + 2n, ...`
  (n chunks). Strided rather than contiguous chunks: when the batch is sharded over devices,
  the looped axis is then not the sharded one, and every chunk stays split over them."""
  n = a.shape[0] // images
  return jnp.swapaxes(a.reshape(images, n, *a.shape[1:]), 0, 1)


def _chunked(fn, batch_arrays, images: int):
  """`fn` over the batch in chunks of `images` (one call when it fits)."""
  batch = batch_arrays[0].shape[0]
  if images == batch:
    return fn(*batch_arrays)
  out = lax.map(lambda args: fn(*args), tuple(_split(a, images) for a in batch_arrays))
  return jnp.swapaxes(out, 0, 1).reshape(batch, *out.shape[2:])


def conv3x3(x: Array, kernel: Array) -> Array:
  """`lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))` in NHWC / HWIO by
  Winograd F(2x2, 3x3). `x`: `[B, H, W, C]` with even H, W; `kernel`: `[3, 3, C, O]`."""
  batch, height, width, channels = x.shape
  u = _kernel_transform(kernel)
  h, w = height // 2, width // 2

  def chunk(xc):
    m = [jnp.dot(v, u[k], precision=_HIGHEST) for k, v in enumerate(_data_transform(xc))]
    return _output_transform(m, xc.shape[0], h, w)

  images = _images_per_chunk(batch, h * w, max(channels, kernel.shape[3]))
  return _chunked(chunk, (x,), images)


def kernel_grad3x3(x: Array, dy: Array) -> Array:
  """The kernel gradient of `conv3x3(x, kernel)` for output cotangent `dy` `[B, H, W, O]`:
  `[3, 3, C, O]`, by Winograd F(3x3, 2x2), summed over the tiles of every image."""
  batch, height, width, channels = x.shape
  h, w = height // 2, width // 2

  def chunk(xc, dyc):
    return [lax.dot_general(v, g, (((0,), (0,)), ((), ())), precision=_HIGHEST)
            for v, g in zip(_data_transform(xc), _grad_transform(dyc), strict=True)]

  images = _images_per_chunk(batch, h * w, max(channels, dy.shape[3]))
  if images == batch:
    m = chunk(x, dy)
  else:
    xs, dys = _split(x, images), _split(dy, images)
    init = [jnp.zeros((channels, dy.shape[3]), jnp.result_type(x, dy))] * 16
    add = lambda acc, args: ([a + b for a, b in zip(acc, chunk(*args), strict=True)], None)
    m, _ = lax.scan(add, init, (xs, dys))
  return _kernel_output_transform(m)
