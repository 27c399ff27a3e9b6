"""Dropout with the masks of `flax.linen.Dropout`, generated in one fused pass on CPU.

`jax.random.bits` hashes a counter with Threefry-2x32 (Salmon et al. 2011, 20 rounds). On
CPU JAX lowers that hash as a `while` loop over its five 4-round blocks, so each block
reads and writes the whole `[B, H, W, C]` counter array, and XLA cannot fuse the hash into
the code that uses it; in a CIFAR-10 DDPM++ train step the dropout masks cost ~0.15 s of
op time. `threefry_bits` writes the same 20 rounds as straight-line `jnp` integer ops,
which XLA fuses with the counter `iota` and the mask comparison into one elementwise
loop. The bits are identical to `jax.random.bits(key, shape)` (JAX's partitionable
Threefry, the default), so `Dropout` draws exactly the masks `nn.Dropout` draws for the
same key, and a batch split over devices still gets the masks of the whole batch.

References:
  Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as 1, 2, 3" (SC'11).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def _rotate_left(x: Array, bits: int) -> Array:
  return (x << jnp.uint32(bits)) | (x >> jnp.uint32(32 - bits))


def threefry_2x32(key: tuple[Array, Array], counts: tuple[Array, Array]) -> tuple[Array, Array]:
  """The Threefry-2x32 block function (20 rounds) of two uint32 words `counts` under the
  two-word `key`, unrolled."""
  k0, k1 = key
  schedule = (k0, k1, k0 ^ k1 ^ jnp.uint32(_PARITY))
  x0, x1 = counts[0] + k0, counts[1] + k1
  for block in range(5):
    for rotation in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, rotation) ^ x0
    x0 = x0 + schedule[(block + 1) % 3]
    x1 = x1 + schedule[(block + 2) % 3] + jnp.uint32(block + 1)
  return x0, x1


def _is_threefry(key: Array) -> bool:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return 'threefry' in str(jax.random.key_impl(key))
  return key.dtype == jnp.uint32 and key.shape == (2,)  # a raw threefry key


def threefry_bits(key: Array, shape: tuple[int, ...]) -> Array:
  """`uint32[shape]` equal to `jax.random.bits(key, shape)` for a threefry `key`.

  Raises:
    ValueError: for a non-threefry key or more than 2^32 values.
  """
  if not _is_threefry(key):
    raise ValueError(f'threefry_bits needs a threefry2x32 key, got {key.dtype}')
  size = math.prod(shape)
  if size >= 2**32:
    raise ValueError(f'threefry_bits supports fewer than 2^32 values, got shape {shape}')
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  # JAX's counter for element i of the flattened array is the 64-bit i as (high, low) words.
  low = lax.iota(jnp.uint32, size).reshape(shape)
  bits_high, bits_low = threefry_2x32((data[0], data[1]), (jnp.zeros_like(low), low))
  return bits_high ^ bits_low


def bernoulli_mask(key: Array, keep_prob: float, shape: tuple[int, ...]) -> Array:
  """`bool[shape]`, equal to `jax.random.bernoulli(key, keep_prob, shape)` (float32)."""
  if not _is_threefry(key):
    return jax.random.bernoulli(key, keep_prob, shape)
  mantissa = threefry_bits(key, shape) >> jnp.uint32(9)
  uniform = lax.bitcast_convert_type(mantissa | jnp.uint32(0x3F800000), jnp.float32) - 1.0
  return uniform < jnp.float32(keep_prob)


class Dropout(nn.Module):
  """`nn.Dropout(rate)` (same masks for the same `'dropout'` key) with fused mask bits.

  Attributes:
    rate: probability of zeroing an activation.
  """

  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep_prob = 1.0 - self.rate
    mask = bernoulli_mask(self.make_rng('dropout'), keep_prob, x.shape)
    return lax.select(mask, x / keep_prob, jnp.zeros_like(x))
