"""A small residual MLP score network for low-dimensional data (2-D toys, tests).

`MLPScoreNet(x [B, D], labels [B]) -> [B, D]`, conditioned on the noise level
through the same time embeddings as NCSN++ / DDPM++ (Fourier features of
`log sigma` for VE, sinusoidal of `999 t` for VP), so `make_score_fn` applies
unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from scorejax.models import layers

Array = jax.Array


class MLPScoreNet(nn.Module):
  """Residual MLP: `h <- h + W2 act(W1 act(h) + D(temb))`, then a linear read-out.

  Attributes:
    hidden: width of every hidden layer.
    num_layers: number of residual blocks.
    embedding_type: 'positional' (labels used as is) or 'fourier' (of `log labels`).
    embedding_dim: width of the time embedding before its two dense layers.
    fourier_scale: std of the Fourier frequencies.
    scale_by_sigma: divide the output by `labels` (VE continuous: labels = sigma).
    act: activation.
    num_classes: classes of a class-conditional network (`class_labels`; 0: none).
  """

  hidden: int = 128
  num_layers: int = 3
  embedding_type: str = 'positional'
  embedding_dim: int = 64
  fourier_scale: float = 16.0
  scale_by_sigma: bool = False
  act: Callable[[Array], Array] = nn.swish
  num_classes: int = 0

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False,
               class_labels: Array | None = None) -> Array:
    del train  # no dropout / batch statistics
    layers.check_class_labels(self.num_classes, class_labels)
    shape = x.shape  # images [B, H, W, C] are modelled as flat vectors [B, H * W * C]
    x = x.reshape(shape[0], -1)
    if self.embedding_type == 'fourier':
      temb = layers.GaussianFourierProjection(
          self.embedding_dim // 2, self.fourier_scale, name='fourier_projection')(jnp.log(labels))
    elif self.embedding_type == 'positional':
      temb = layers.positional_embedding(labels, self.embedding_dim)
    else:
      raise ValueError(f'unknown embedding_type {self.embedding_type!r}; '
                       "valid choices: ['fourier', 'positional']")
    temb = nn.Dense(self.hidden, name='temb_dense_0')(temb)
    temb = nn.Dense(self.hidden, name='temb_dense_1')(self.act(temb))
    if self.num_classes:
      temb = layers.add_class_embedding(temb, class_labels, self.num_classes)
    h = nn.Dense(self.hidden, name='input')(x)
    for i in range(self.num_layers):
      r = nn.Dense(self.hidden, name=f'block_{i}_dense_0')(self.act(h))
      r = r + nn.Dense(self.hidden, name=f'block_{i}_temb')(self.act(temb))
      r = nn.Dense(self.hidden, kernel_init=layers.default_init(0.0),
                   name=f'block_{i}_dense_1')(self.act(r))
      h = h + r
    out = nn.Dense(x.shape[-1], name='output')(self.act(h)).reshape(shape)
    if self.scale_by_sigma:
      out = out / labels.reshape((-1,) + (1,) * (out.ndim - 1))
    return out
