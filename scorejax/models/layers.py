"""Building blocks shared by the score networks: time embeddings, activations, init.

Everything here is NHWC / `[B, D]` and float32-exact with the reference layers of
score_sde (`layers.py`, `layerspp.py`): same formulas, same order of operations.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scorejax.models.conv import Conv

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'swish': nn.swish,
    'silu': nn.swish,
    'elu': nn.elu,
    'relu': nn.relu,
    'lrelu': lambda x: nn.leaky_relu(x, negative_slope=0.2),
}


def get_activation(name: str) -> Callable[[Array], Array]:
  """Activation by the reference's `config.model.nonlinearity` name.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  key = name.lower()
  if key not in ACTIVATIONS:
    raise ValueError(f'unknown nonlinearity {name!r}; valid choices: {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[key]


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """DDPM's initializer: variance scaling, fan-avg, uniform; `scale=0` gives zeros."""
  scale = 1e-10 if scale == 0 else scale
  return nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


@functools.lru_cache(maxsize=32)
def positional_frequencies(embedding_dim: int, max_positions: int = 10000) -> np.ndarray:
  """`[embedding_dim // 2]` frequencies `exp(-k log(max_positions) / (half - 1))`, float32.

  Computed once in numpy, in float32 and in the reference's order of operations.
  """
  half_dim = embedding_dim // 2
  step = np.float32(math.log(max_positions) / (half_dim - 1))
  return np.exp(np.arange(half_dim, dtype=np.float32) * -step)


def positional_embedding(timesteps: Array, embedding_dim: int, max_positions: int = 10000) -> Array:
  """Sinusoidal embedding `[sin(t f), cos(t f)]` of `timesteps [B]` -> `[B, embedding_dim]`.

  References:
    Vaswani et al. 2017, Sec. 3.5; Ho et al. 2020, Appendix B.
  """
  frequencies = jnp.asarray(positional_frequencies(embedding_dim, max_positions))
  args = timesteps.astype(jnp.float32)[:, None] * frequencies[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def add_class_embedding(temb: Array, class_labels: Array | None, num_classes: int) -> Array:
  """`temb + E[y]`: the class embedding of a class-conditional network (call inside a
  compact module; creates its `class_embedding` parameter `[num_classes + 1, D]`).

  Row `num_classes` is "no class": `class_labels=None` selects it for the whole batch, as
  does a label of `num_classes` for one example (classifier-free guidance trains both). The
  table starts at zero, so a new class-conditional network starts as its unconditional self.
  """
  if class_labels is None:
    class_labels = jnp.full((temb.shape[0],), num_classes, jnp.int32)
  table = nn.Embed(num_classes + 1, temb.shape[-1], embedding_init=nn.initializers.zeros,
                   name='class_embedding')
  return temb + table(jnp.asarray(class_labels, jnp.int32))


def check_class_labels(num_classes: int, class_labels: Array | None) -> None:
  """Class labels are only for class-conditional networks (`num_classes > 0`).

  Raises:
    ValueError: labels given to an unconditional network.
  """
  if class_labels is not None and not num_classes:
    raise ValueError('class_labels given to a network without classes (model.num_classes=0)')


class GaussianFourierProjection(nn.Module):
  """Random Fourier features `[sin 2 pi s W, cos 2 pi s W]` of a scalar `s [B]`.

  `W ~ scale * N(0, 1)` is a parameter (so checkpoints carry it) that is never trained:
  the gradient is stopped, as in the reference where it has `requires_grad=False`.

  References:
    Tancik et al. 2020, "Fourier Features Let Networks Learn High Frequency Functions".
  """

  embedding_size: int = 256
  scale: float = 1.0

  @nn.compact
  def __call__(self, s: Array) -> Array:
    W = self.param('W', nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
    W = jax.lax.stop_gradient(W)
    projection = s[:, None] * W[None, :] * (2 * np.pi)
    return jnp.concatenate([jnp.sin(projection), jnp.cos(projection)], axis=-1)


class GroupNorm(nn.Module):
  """Group normalization of NHWC images over `(H, W, channels of the group)`, eps 1e-6.

  Parameters `scale`, `bias` `[C]`, like `nn.GroupNorm` (and named `GroupNorm_<k>` like
  it). Statistics are two-pass (mean, then the mean squared deviation) from per-channel
  sums over `H, W`, which XLA:CPU reduces ~5x faster than `nn.GroupNorm`'s reduction over
  a `[B, H, W, G, C/G]` view (3.2 -> 0.6 ms on 8x32x32x128).

  References:
    Wu & He 2018, "Group Normalization".
  """

  num_groups: int
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    B, _, _, C = x.shape
    groups, size = self.num_groups, C // self.num_groups
    scale = self.param('scale', nn.initializers.ones, (C,))
    bias = self.param('bias', nn.initializers.zeros, (C,))
    count = x.shape[1] * x.shape[2] * size

    def per_group_mean(per_channel_sums: Array) -> Array:  # [B, C] -> [B, C]
      means = jnp.sum(per_channel_sums.reshape(B, groups, size), axis=-1) / count
      return jnp.repeat(means, size, axis=1)

    mean = per_group_mean(jnp.sum(x, axis=(1, 2)))
    centered = x - mean[:, None, None, :]
    var = per_group_mean(jnp.sum(centered * centered, axis=(1, 2)))
    multiplier = jax.lax.rsqrt(var + self.epsilon) * scale
    return centered * multiplier[:, None, None, :] + bias


def group_norm(channels: int, num_groups: int | None = None) -> GroupNorm:
  """The reference's GroupNorm: `min(C // 4, 32)` groups (or `num_groups`), eps 1e-6.

  Raises:
    ValueError: when the group count does not divide the channels.
  """
  groups = min(channels // 4, 32) if num_groups is None else num_groups
  if groups < 1 or channels % groups:
    raise ValueError(f'GroupNorm: {groups} groups cannot split {channels} channels; '
                     'choose nf / ch_mult so every channel count is a multiple of 4 '
                     '(and of 32 above 128)')
  return GroupNorm(num_groups=groups, epsilon=1e-6)


def conv3x3(x: Array, out_ch: int, stride: int = 1, bias: bool = True, init_scale: float = 1.0,
            padding: str | Sequence[tuple[int, int]] = 'SAME') -> Array:
  """3x3 convolution with DDPM initialization (a `Conv_k` of the calling module)."""
  return Conv(out_ch, (3, 3), strides=(stride, stride), padding=padding, use_bias=bias,
              kernel_init=default_init(init_scale))(x)


def conv1x1(x: Array, out_ch: int, bias: bool = True, init_scale: float = 1.0) -> Array:
  """1x1 convolution with DDPM initialization (a `Conv_k` of the calling module)."""
  return Conv(out_ch, (1, 1), use_bias=bias, kernel_init=default_init(init_scale))(x)


class NIN(nn.Module):
  """Network-in-network: a per-pixel linear map of the channels, `x W + b`.

  Parameters `W [C_in, num_units]`, `b [num_units]` (the same layout as the reference).
  """

  num_units: int
  init_scale: float = 0.1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    W = self.param('W', default_init(self.init_scale), (x.shape[-1], self.num_units))
    b = self.param('b', nn.initializers.zeros, (self.num_units,))
    return jnp.dot(x, W) + b
