"""Inception-v3 of the FID graph (TF `inception-2015-12-05`), in Flax, and its feature extractor.

This is the network behind every published FID / IS / KID number (TF-GAN, TTUR, score_sde,
pytorch-fid, EDM): torchvision's Inception-v3 layout with the TF graph's differences, as
pytorch-fid's `FIDInceptionA/C/E` describe them:
- BatchNorm eps 1e-3, convolutions without bias, no auxiliary classifier;
- the 3x3 average pools inside the A, C and first E blocks ignore the zero padding
  (`count_include_pad=False`), the last E block (`Mixed_7c`) max-pools instead;
- 1008 classes (the fc sees the 2048-d `pool3` features).

Inputs are images `[B, H, W, C]` with values in the uint8 range [0, 255] (C = 1 or 3),
resized bilinearly to 299x299 and scaled by `(x - 128) / 128` as the FID graph does.
Outputs: `pool3 [B, 2048]` (FID / KID features) and `logits [B, 1008]` (Inception Score).

Parameter paths follow pytorch-fid's module names (`Mixed_5b/branch5x5_1/conv/kernel`), so
the weight conversion (`scorejax.inception_weights`) is a renaming plus a transposition.
Nothing here downloads anything: weights come from a local `.npz` made by
`scripts/convert_inception.py`.

References:
  Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision".
  Heusel et al. 2017 (FID); pytorch-fid `src/pytorch_fid/inception.py` (block patches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

Array = jax.Array
Variables = dict

NUM_CLASSES = 1008
POOL3_DIM = 2048
INPUT_SIZE = 299


# ----------------------------------------------------------------------------------------
# Pre-processing: resize and scale as the FID graph.


def resize_matrix(in_size: int, out_size: int, half_pixel: bool) -> np.ndarray:
  """Bilinear interpolation matrix `[out_size, in_size]` along one axis.

  Args:
    in_size: input length.
    out_size: output length.
    half_pixel: `False` for TF1's legacy `resize_bilinear` (`src = i * in / out`, the op of
      TF1-era FID graphs), `True` for half-pixel centers clamped at 0
      (`src = (i + 0.5) * in / out - 0.5`: PyTorch `align_corners=False` as in pytorch-fid,
      TF2 `tf.image.resize`).

  Returns:
    The float64 matrix `W` such that `resized = W @ signal`.
  """
  scale = in_size / out_size
  out_index = np.arange(out_size, dtype=np.float64)
  src = np.maximum((out_index + 0.5) * scale - 0.5, 0.0) if half_pixel else out_index * scale
  lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = src - lower
  matrix = np.zeros([out_size, in_size], np.float64)
  np.add.at(matrix, (np.arange(out_size), lower), 1.0 - frac)
  np.add.at(matrix, (np.arange(out_size), upper), frac)
  return matrix


RESIZE_METHODS = {'tf1': False, 'half_pixel': True}


def preprocess(images: Array, image_size: int = INPUT_SIZE, resize_method: str = 'tf1') -> Array:
  """Maps images `[B, H, W, C]` in [0, 255] to the network input `[B, S, S, 3]` in [-1, 1).

  Grayscale (C = 1) is repeated to RGB; the bilinear resize runs as two small matrix
  products (exact, and cheap compared to the network).

  Args:
    images: `[B, H, W, 1 or 3]`, uint8 or float in [0, 255].
    image_size: network input size `S` (299 for the FID graph).
    resize_method: one of `RESIZE_METHODS` (`'tf1'`: the TF FID graph; `'half_pixel'`:
      pytorch-fid's `F.interpolate`).

  Returns:
    `[B, S, S, 3]` float32, `(resized - 128) / 128`.

  Raises:
    ValueError: on an unknown `resize_method` or channel count.
  """
  if resize_method not in RESIZE_METHODS:
    raise ValueError(
      f'resize_method={resize_method!r} is unknown; valid choices: {sorted(RESIZE_METHODS)}'
    )
  if images.shape[-1] not in (1, 3):
    raise ValueError(f'Inception expects 1 or 3 channels, got shape {images.shape}')
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  half_pixel = RESIZE_METHODS[resize_method]
  if x.shape[1:3] != (image_size, image_size):
    rows = jnp.asarray(resize_matrix(x.shape[1], image_size, half_pixel), jnp.float32)
    cols = jnp.asarray(resize_matrix(x.shape[2], image_size, half_pixel), jnp.float32)
    x = jnp.einsum('oh,bhwc->bowc', rows, x, precision='highest')
    x = jnp.einsum('pw,bowc->bopc', cols, x, precision='highest')
  return (x - 128.0) / 128.0


# ----------------------------------------------------------------------------------------
# Network.


def _pad(padding: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: int | tuple[int, int] = 0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(
      self.features,
      self.kernel_size,
      strides=self.strides,
      padding=_pad(self.padding),
      use_bias=False,
      name='conv',
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
  # TF's average pool divides by the number of valid (unpadded) inputs.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1), count_include_pad=False)


def _max_pool_3x3(x: Array, stride: int = 1, padding: int = 1) -> Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=_pad(padding))


class InceptionA(nn.Module):
  """35x35 block: 1x1, 5x5, double 3x3 and pooled 1x1 branches (`Mixed_5b..5d`)."""

  pool_features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = BasicConv(64, name='branch1x1')(x)
    b5 = BasicConv(48, name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=2, name='branch5x5_2')(b5)
    b3 = BasicConv(64, name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=1, name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=1, name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17 (`Mixed_6a`)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = BasicConv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = BasicConv(64, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=1, name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorized 7x7 convolutions (`Mixed_6b..6e`)."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c7 = self.channels_7x7
    b1 = BasicConv(192, name='branch1x1')(x)
    b7 = BasicConv(c7, name='branch7x7_1')(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv(c7, name='branch7x7dbl_1')(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8 (`Mixed_7a`)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = BasicConv(192, name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with expanded filter banks (`Mixed_7b` avg-pools, `Mixed_7c` max-pools)."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = BasicConv(320, name='branch1x1')(x)
    b3 = BasicConv(384, name='branch3x3_1')(x)
    b3 = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
      ],
      axis=-1,
    )
    bd = BasicConv(448, name='branch3x3dbl_1')(x)
    bd = BasicConv(384, (3, 3), padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
      ],
      axis=-1,
    )
    pooled = _max_pool_3x3(x) if self.max_pool else _avg_pool_3x3(x)
    bp = BasicConv(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The FID Inception-v3 on pre-processed inputs `[B, S, S, 3]` (S >= 75; 299 for FID).

  Returns a dict with `pool3 [B, 2048]` and `logits [B, 1008]`.
  """

  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x: Array) -> dict[str, Array]:
    x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3(x, 2, 0)
    x = BasicConv(80, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3(x, 2, 0)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(max_pool=False, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, name='fc')(pool3)
    return {'pool3': pool3, 'logits': logits}


def init_variables(key: Array, image_size: int = INPUT_SIZE) -> Variables:
  """Randomly initialized variables (`params`, `batch_stats`); for shapes and tests only."""
  return InceptionV3().init(key, jnp.zeros([1, image_size, image_size, 3]))


# ----------------------------------------------------------------------------------------
# Jitted, data-parallel feature extraction.


def make_feature_fn(
  variables: Variables,
  devices: Sequence[jax.Device] | None = None,
  image_size: int = INPUT_SIZE,
  resize_method: str = 'tf1',
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """Returns `feature_fn(images) -> {'pool3': [B, 2048], 'logits': [B, 1008]}` (host arrays).

  The network runs under one `jax.jit`, the batch sharded over a `('data',)` mesh of
  `devices` (default: all) with `NamedSharding`, the variables replicated. Batches whose
  size is not a multiple of the device count are padded and the padding dropped.

  Args:
    variables: Flax variables (`params`, `batch_stats`), e.g. from
      `inception_weights.load_variables`.
    devices: devices of the data mesh (default `jax.devices()`).
    image_size: network input size (299 for FID; smaller only in tests).
    resize_method: see `preprocess`.

  Returns:
    A host-level function of images `[B, H, W, C]` in [0, 255].
  """
  devices = list(devices) if devices is not None else jax.devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
  data_sharding = NamedSharding(mesh, PartitionSpec('data'))
  replicated = NamedSharding(mesh, PartitionSpec())
  model = InceptionV3()
  variables = jax.device_put(variables, replicated)

  @jax.jit
  def forward(variables, images):
    return model.apply(variables, preprocess(images, image_size, resize_method))

  def feature_fn(images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images)
    num = images.shape[0]
    pad = -num % len(devices)
    if pad:
      images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
    out = forward(variables, jax.device_put(images, data_sharding))
    return {name: np.asarray(value)[:num] for name, value in out.items()}

  return feature_fn
