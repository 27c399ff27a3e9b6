"""A noise-conditional classifier `p_t(y | x_t)` for classifier guidance.

`NoiseConditionalClassifier(x, noise_level) -> logits [B, K]`: images `[B, H, W, C]` go
through a ResNet (per stage `num_res_blocks` residual blocks whose second GroupNorm is
scaled and shifted by the time embedding, then 2x2 average pooling), vectors `[B, D]`
(2-D toys) through a residual MLP with the same time embedding. The time enters as
`noise_level = log(s(t) / m(t))` (`scorejax.classifier_guidance.noise_level`) through
fixed random Fourier features and two dense layers. No batch statistics: each example's
logits depend on that example only, which per-example guidance gradients need.

A small stand-in for the time-conditional Wide-ResNet of Song et al. 2021 (Appendix I.1);
widths and depth are fields, so CIFAR-10-sized versions are a config away. Convolutions
are `scorejax.models.conv.Conv`, whose gradients stay fast inside XLA:CPU loops (a sampler
evaluates the classifier's input gradient at every step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scorejax.models import layers
from scorejax.models.conv import Conv

Array = jax.Array


class NoiseConditionalClassifier(nn.Module):
  """Time-conditional classifier of images (ResNet) or vectors (residual MLP).

  Attributes:
    num_classes: K.
    channels: images: the width of each stage (one 2x2 average pooling between stages).
    num_res_blocks: residual blocks per stage (images) or in total (vectors).
    hidden: vectors: width of the MLP.
    embedding_dim: Fourier features of the noise level (half sines, half cosines).
    fourier_scale: std of the Fourier frequencies (per unit of log noise-to-signal).
    act: activation.
  """

  num_classes: int
  channels: Sequence[int] = (32, 64, 128)
  num_res_blocks: int = 1
  hidden: int = 128
  embedding_dim: int = 64
  fourier_scale: float = 1.0
  act: Callable[[Array], Array] = nn.swish

  @nn.compact
  def __call__(self, x: Array, noise_level: Array) -> Array:
    width = self.hidden if x.ndim == 2 else self.channels[-1]
    temb = layers.GaussianFourierProjection(
        self.embedding_dim // 2, self.fourier_scale, name='fourier_projection')(noise_level)
    temb = nn.Dense(4 * width, name='temb_dense_0')(temb)
    temb = self.act(nn.Dense(4 * width, name='temb_dense_1')(self.act(temb)))
    if x.ndim == 2:
      h = nn.Dense(self.hidden, name='input')(x)
      for i in range(self.num_res_blocks):
        r = nn.Dense(self.hidden, name=f'block_{i}_dense_0')(self.act(h))
        r = r + nn.Dense(self.hidden, name=f'block_{i}_temb')(temb)
        h = h + nn.Dense(self.hidden, name=f'block_{i}_dense_1')(self.act(r))
      return nn.Dense(self.num_classes, name='logits')(self.act(h))
    if x.ndim != 4:
      raise ValueError(f'inputs must be images [B, H, W, C] or vectors [B, D], got {x.shape}')
    h = Conv(self.channels[0], (3, 3), name='input')(x)
    for stage, channels in enumerate(self.channels):
      if stage:
        h = nn.avg_pool(h, (2, 2), strides=(2, 2)) if min(h.shape[1:3]) >= 2 else h
      for block in range(self.num_res_blocks):
        name = f'stage_{stage}_block_{block}'
        r = Conv(channels, (3, 3), name=f'{name}_conv_0')(
            self.act(layers.group_norm(h.shape[-1], _groups(h.shape[-1]))(h)))
        # Scale and shift after the normalization (adaptive GroupNorm): a shift before
        # it would be removed with the group mean.
        scale, shift = jnp.split(nn.Dense(2 * channels, name=f'{name}_temb')(temb), 2, -1)
        r = layers.group_norm(channels, _groups(channels))(r)
        r = r * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
        r = Conv(channels, (3, 3), name=f'{name}_conv_1')(self.act(r))
        if h.shape[-1] != channels:
          h = Conv(channels, (1, 1), name=f'{name}_skip')(h)
        h = h + r
    h = self.act(layers.group_norm(h.shape[-1], _groups(h.shape[-1]))(h))
    return nn.Dense(self.num_classes, name='logits')(jnp.mean(h, axis=(1, 2)))


def _groups(channels: int) -> int:
  """GroupNorm groups: up to 32, dividing `channels`."""
  return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
