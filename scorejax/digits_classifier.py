"""A small CNN classifier of the 8x8 digits: the feature network of "digits-FID".

Inception-v3 features mean little on 8x8 grayscale digits, and the embedded default
(scikit-learn's digits) must be scored on a CPU in seconds. This module owns a ~40k
parameter CNN trained once, deterministically, by `scripts/train_digits_classifier.py`;
its weights and the reference feature statistics of the real training digits ship in
`scorejax/assets/digits_classifier.npz`. Its 64-d penultimate features give a Fréchet
distance ("digits-FID", the FID recipe on a domain-appropriate network) and its logits an
Inception-Score analogue, classifier confidence and the entropy of the class histogram.

Images are `[B, 8, 8, 1]` in [0, 1] (digits values / 16); sizes 16, 32, ... (the
pixel-repeated digits of `image_sources.digits_images`) are average-pooled back to 8x8.

References:
  Heusel et al. 2017 (FID); Salimans et al. 2016 (Inception Score).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from scorejax import image_sources, metrics

Array = jax.Array
Params = dict

NUM_CLASSES = 10
FEATURE_DIM = 64
ASSET_NAME = 'digits_classifier.npz'


class DigitsClassifier(nn.Module):
  """conv3x3(32) -> conv3x3(64, /2) -> conv3x3(64) -> dense(64) [features] -> dense(10)."""

  @nn.compact
  def __call__(self, x: Array) -> dict[str, Array]:
    """Maps images `[B, 8, 8, 1]` in [0, 1] to `{'features': [B, 64], 'logits': [B, 10]}`."""
    x = 2.0 * x - 1.0
    x = nn.relu(nn.Conv(32, (3, 3), name='conv1')(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2, name='conv2')(x))
    x = nn.relu(nn.Conv(64, (3, 3), name='conv3')(x))
    features = nn.relu(nn.Dense(FEATURE_DIM, name='dense')(x.reshape(x.shape[0], -1)))
    return {'features': features, 'logits': nn.Dense(NUM_CLASSES, name='head')(features)}


def digits_with_labels(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The digits split of `image_sources` as `(images [N, 8, 8, 1] in [0, 1], labels [N])`."""
  images = image_sources.digits_images(split, 8).astype(np.float32) / 16.0
  return images, image_sources.digits_labels(split)


def to_digits_8x8(images: np.ndarray) -> np.ndarray:
  """Checks images `[B, 8k, 8k, 1]` in [0, 1], average-pools them to `[B, 8, 8, 1]`.

  Raises:
    ValueError: for other shapes.
  """
  images = np.asarray(images, np.float32)
  if images.ndim == 3:
    images = images[..., None]
  b, h, w, c = images.shape
  if c != 1 or h != w or h % 8:
    raise ValueError(f'digits samples must be [B, 8k, 8k, 1] in [0, 1], got {images.shape}')
  factor = h // 8
  return images.reshape(b, 8, factor, 8, factor, 1).mean(axis=(2, 4))


def train_classifier(
  key: Array,
  images: np.ndarray,
  labels: np.ndarray,
  num_epochs: int = 40,
  batch_size: int = 100,
  learning_rate: float = 3e-3,
  weight_decay: float = 1e-4,
) -> Params:
  """Mini-batch AdamW training in a fixed order (deterministic for a fixed key).

  Each epoch visits the training set in the permutation drawn from `fold_in(key, epoch)`;
  each image is randomly rotated, scaled and shifted a little (`augment`). The whole loop
  is one `lax.scan`.

  Args:
    key: PRNG key (initialization, epoch orders, shifts).
    images: `[N, 8, 8, 1]` in [0, 1].
    labels: `[N]` integer classes.
    num_epochs: passes over the data.
    batch_size: images per step (the last partial batch of an epoch is dropped).
    learning_rate: peak learning rate of the cosine schedule.
    weight_decay: AdamW decoupled weight decay.

  Returns:
    The classifier params.
  """
  model = DigitsClassifier()
  init_key, order_key, augment_key = jax.random.split(key, 3)
  params = model.init(init_key, jnp.zeros([1, 8, 8, 1]))['params']
  steps_per_epoch = len(images) // batch_size
  num_steps = num_epochs * steps_per_epoch
  schedule = optax.cosine_decay_schedule(learning_rate, num_steps)
  optimizer = optax.adamw(schedule, weight_decay=weight_decay)
  images, labels = jnp.asarray(images), jnp.asarray(labels)

  def augment(key, x):
    # Random rotation (+-12 deg), scale (0.9..1.1) and shift (+-1 px) about the centre,
    # bilinear with zero fill: writer variation that the 297 held-out digits show.
    angle_key, scale_key, shift_key = jax.random.split(key, 3)
    angle = jax.random.uniform(angle_key, (), minval=-0.21, maxval=0.21)
    scale = jax.random.uniform(scale_key, (), minval=0.9, maxval=1.1)
    offset = jax.random.uniform(shift_key, (2,), minval=-1.0, maxval=1.0)
    rows, cols = jnp.meshgrid(jnp.arange(8.0) - 3.5, jnp.arange(8.0) - 3.5, indexing='ij')
    cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
    src_rows = cos * rows - sin * cols + 3.5 + offset[0]
    src_cols = sin * rows + cos * cols + 3.5 + offset[1]
    warped = jax.scipy.ndimage.map_coordinates(x[..., 0], [src_rows, src_cols], order=1)
    return warped[..., None]

  def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x)['logits']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, index):
    params, opt_state = carry
    epoch, position = index // steps_per_epoch, index % steps_per_epoch
    order = jax.random.permutation(jax.random.fold_in(order_key, epoch), len(images))
    rows = jax.lax.dynamic_slice(order, (position * batch_size,), (batch_size,))
    augment_keys = jax.random.split(jax.random.fold_in(augment_key, index), batch_size)
    x = jax.vmap(augment)(augment_keys, images[rows])
    grads = jax.grad(loss_fn)(params, x, labels[rows])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  @jax.jit
  def train(params):
    carry, _ = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(num_steps))
    return carry[0]

  return train(params)


@dataclasses.dataclass(frozen=True)
class DigitsEvaluator:
  """The trained classifier and the reference feature statistics of the real digits."""

  params: Params
  ref_mu: np.ndarray  # [64], features of the 1500 training digits
  ref_sigma: np.ndarray  # [64, 64]

  def apply(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Features `[B, 64]` and logits `[B, 10]` of images `[B, 8k, 8k, 1]` in [0, 1]."""
    out = _apply(self.params, jnp.asarray(to_digits_8x8(images)))
    return {k: np.asarray(v, np.float64) for k, v in out.items()}

  def metrics(self, samples: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """Digits-FID, IS analogue, confidence, class-histogram entropy (and accuracy if labeled).

    Args:
      samples: images `[N, 8k, 8k, 1]` in [0, 1], N >= 2.
      labels: optional true classes `[N]` (real digits, class-conditional samples).

    Returns:
      `digits_fid` (to the training digits), `digits_is` (IS with 10 classes, in [1, 10],
      one split), `confidence` (mean max class probability), `class_entropy` (entropy of
      the predicted-class histogram in nats; log 10 = 2.303 when balanced), `accuracy`.
    """
    out = self.apply(np.clip(samples, 0.0, 1.0))
    stats = metrics.FeatureStats(FEATURE_DIM).update(out['features'])
    mu, sigma = stats.mean_cov()
    logits = out['logits']
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    histogram = np.bincount(probs.argmax(1), minlength=NUM_CLASSES) / len(probs)
    nonzero = histogram[histogram > 0]
    result = {
      'digits_fid': metrics.frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma),
      'digits_is': metrics.inception_score(logits, num_splits=1)[0],
      'confidence': float(probs.max(1).mean()),
      'class_entropy': float(-(nonzero * np.log(nonzero)).sum()),
    }
    if labels is not None:
      result['accuracy'] = float((probs.argmax(1) == np.asarray(labels)).mean())
    return result


@jax.jit
def _apply(params: Params, images: Array) -> dict[str, Array]:
  return DigitsClassifier().apply({'params': params}, images)


def reference_stats(params: Params, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean `[64]` and covariance `[64, 64]` of the classifier features of `images`."""
  feats = np.asarray(_apply(params, jnp.asarray(to_digits_8x8(images)))['features'])
  return metrics.FeatureStats(FEATURE_DIM).update(feats).mean_cov()


def to_arrays(evaluator: DigitsEvaluator, **extra: np.ndarray) -> dict[str, np.ndarray]:
  """Flat `{'params/conv1/kernel': ..., 'ref_mu': ..., 'ref_sigma': ...}` for `np.savez`."""
  flat = {
    f'params/{layer}/{name}': np.asarray(value)
    for layer, tree in evaluator.params.items()
    for name, value in tree.items()
  }
  return {**flat, 'ref_mu': evaluator.ref_mu, 'ref_sigma': evaluator.ref_sigma, **extra}


def load_evaluator(path: str | None = None) -> DigitsEvaluator:
  """Loads the classifier (default: the packaged `scorejax/assets/digits_classifier.npz`)."""
  resource = importlib.resources.files('scorejax') / 'assets' / ASSET_NAME
  with importlib.resources.as_file(resource) if path is None else contextlib.nullcontext(path) as p:
    with np.load(p) as data:
      params: dict = {}
      for key in data.files:
        if key.startswith('params/'):
          _, layer, name = key.split('/')
          params.setdefault(layer, {})[name] = jnp.asarray(data[key])
      return DigitsEvaluator(params, np.asarray(data['ref_mu']), np.asarray(data['ref_sigma']))


def make_feature_fn(evaluator: DigitsEvaluator) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """`images [B, 8k, 8k, 1] -> {'features', 'logits'}`, the `feature_fn` of `quality`."""
  return evaluator.apply
