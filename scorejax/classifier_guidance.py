"""Class-conditional sampling: classifier guidance and classifier-free guidance.

An unconditional score model samples `p(x | y)` once a classifier of noisy data is known:

  grad_x log p_t(x | y) = grad_x log p_t(x) + grad_x log p_t(y | x),

so any sampler run with `guided_score_fn(score_fn, logits_fn, labels, scale)` draws class
`y`. `p_t(y | x)` is a classifier trained on data perturbed by the forward SDE
(`classifier_loss`: cross-entropy at `x_t = m(t) x_0 + s(t) z`, `t ~ U[eps, T]`). A `scale`
other than 1 follows `grad log p_t(x) + scale * grad log p_t(y | x)` (Dhariwal & Nichol):
above 1 it trades diversity for samples the classifier finds more typical of `y`.

The classifier sees the time through `noise_level(sde, t) = log(s(t) / m(t))` (half the
negative log-SNR), the same number for every SDE at the same signal-to-noise ratio.

`LogitsFn = logits_fn(x [B, ...], t [B]) -> [B, K]` unnormalised class log-probabilities.
Guidance differentiates the sum over the batch of the chosen log-probabilities, which is
each example's own gradient when the classifier treats examples independently (no batch
statistics), as `models.classifier.NoiseConditionalClassifier` does.

Classifier-free guidance needs no classifier: a class-conditional network trained with
labels sometimes dropped to "no class" (`losses.make_loss_fn(..., class_dropout)`) gives
both `s(x, t, y)` and `s(x, t)`, and `classifier_free_score_fn` follows
`(1 + w) s(x, t, y) - w s(x, t)`: the same as classifier guidance at scale `1 + w` with the
implicit classifier `grad log p_t(y | x) = s(x, t, y) - s(x, t)` (tested on exact mixtures).

References:
  Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", NeurIPS workshop.
  Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
  Equations", ICLR, Sec. 5 and Appendix I.1 (class-conditional sampling).
  Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS, Sec. 4.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from scorejax import fast_solvers
from scorejax import sde as sde_lib

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
LogitsFn = Callable[[Array, Array], Array]
Metrics = dict[str, Array]


def noise_level(sde: sde_lib.SDE, t: Array) -> Array:
  """`log(s(t) / m(t)) [B]` of the kernel `x_t = m(t) x_0 + s(t) z`: the classifier's time input.

  Minus `fast_solvers.log_snr` (half the log-SNR). VE: `log sigma(t)`.
  """
  return -fast_solvers.log_snr(sde, t)


def make_logits_fn(apply_fn: Callable[[Array, Array], Array], sde: sde_lib.SDE) -> LogitsFn:
  """`logits_fn(x, t)` of a network `apply_fn(x, noise_level) -> logits [B, K]`."""
  return lambda x, t: apply_fn(x, noise_level(sde, t))


def _check_labels(labels: Array, batch: int) -> Array:
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f'labels must be integers, got dtype {labels.dtype}')
  if labels.shape != (batch,):
    raise ValueError(f'labels must have shape {(batch,)} (one per example), got {labels.shape}')
  return labels


def classifier_losses(
    logits_fn: LogitsFn, sde: sde_lib.SDE, x0: Array, labels: Array, t: Array, z: Array
) -> tuple[Array, Array]:
  """Per-example cross-entropy `[B]` and correctness `[B]` at `x_t = m(t) x_0 + s(t) z`.

  Args:
    logits_fn: the classifier, `logits_fn(x [B, ...], t [B]) -> [B, K]`.
    sde: the forward SDE.
    x0: clean data `[B, ...]`.
    labels: integer classes `[B]`.
    t: times `[B]`.
    z: standard normal noise shaped like `x0`.

  Returns:
    `(-log p_t(label | x_t) [B], argmax == label [B] as float32)`.
  """
  labels = _check_labels(labels, x0.shape[0])
  mean, std = sde.marginal_prob(x0, t)
  std = jnp.reshape(std, (-1,) + (1,) * (x0.ndim - 1))
  logits = logits_fn(mean + std * z, t)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return nll, correct


def classifier_loss(
    key: Array, logits_fn: LogitsFn, sde: sde_lib.SDE, x0: Array, labels: Array, *,
    eps: float = 1e-5,
) -> tuple[Array, Metrics]:
  """The noise-conditional classifier's training loss, `t ~ U[eps, T]`, `z ~ N(0, I)`.

  Returns:
    `(mean cross-entropy, {'loss', 'accuracy'})`.

  Raises:
    ValueError: for `eps` outside `(0, T)`, or labels that are not one integer per example.
  """
  if not 0.0 < eps < sde.T:
    raise ValueError(f'eps must be in (0, T={sde.T}), got {eps}')
  key_t, key_z = jax.random.split(key)
  t = jax.random.uniform(key_t, (x0.shape[0],), minval=eps, maxval=sde.T)
  z = jax.random.normal(key_z, x0.shape, x0.dtype)
  nll, correct = classifier_losses(logits_fn, sde, x0, labels, t, z)
  loss = jnp.mean(nll)
  return loss, {'loss': loss, 'accuracy': jnp.mean(correct)}


def guided_score_fn(
    score_fn: ScoreFn, logits_fn: LogitsFn, labels: Array, scale: float = 1.0
) -> ScoreFn:
  """`score_fn(x, t) + scale * grad_x log p_t(labels | x)`: the score of class `labels`.

  Args:
    score_fn: the unconditional score `score_fn(x [B, ...], t [B])`.
    logits_fn: the noise-conditional classifier, `logits_fn(x, t) -> [B, K]`.
    labels: the class of each sample, integers `[B]`.
    scale: guidance scale; 1 follows `p(x | y)` exactly (given exact score and classifier),
      0 is the unconditional score.

  Returns:
    The guided `score_fn(x, t)`, for any sampler of `scorejax.sampling` /
    `scorejax.fast_solvers`.

  Raises:
    ValueError: for a negative or non-finite scale, or labels that are not integers `[B]`
      (checked against the batch at the first call).
  """
  scale = float(scale)
  if not (scale >= 0.0 and scale < float('inf')):
    raise ValueError(f'guidance scale must be finite and >= 0, got {scale}')

  def log_likelihood(x: Array, t: Array, labels: Array) -> Array:
    log_probs = jax.nn.log_softmax(logits_fn(x, t), axis=-1)
    return jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))

  def guided(x: Array, t: Array) -> Array:
    chosen = _check_labels(labels, x.shape[0])
    score = score_fn(x, t)
    if scale == 0.0:
      return score
    gradient = jax.grad(log_likelihood)(x, t, chosen)
    return score + scale * gradient.astype(score.dtype)

  return guided


ClassScoreFn = Callable[[Array, Array, Array], Array]


def classifier_free_score_fn(
    class_score_fn: ClassScoreFn, labels: Array, null_label: int, weight: float = 0.0
) -> ScoreFn:
  """`(1 + w) s(x, t, labels) - w s(x, t, null_label)`: classifier-free guidance.

  Args:
    class_score_fn: `class_score_fn(x [B, ...], t [B], class_labels [B]) -> score`, a
      class-conditional score whose label `null_label` means "no class".
    labels: the class of each sample, integers `[B]`.
    null_label: the "no class" label (the number of classes, for `scorejax.models`).
    weight: `w >= 0`; 0 is the conditional score alone (one evaluation per call), above 0
      the conditional and unconditional scores are evaluated together on a `2B` batch.

  Returns:
    The guided `score_fn(x, t)`.

  Raises:
    ValueError: for a negative or non-finite weight, or labels that are not integers `[B]`.
  """
  weight = float(weight)
  if not (weight >= 0.0 and weight < float('inf')):
    raise ValueError(f'classifier-free guidance weight must be finite and >= 0, got {weight}')

  def guided(x: Array, t: Array) -> Array:
    chosen = _check_labels(labels, x.shape[0])
    if weight == 0.0:
      return class_score_fn(x, t, chosen)
    both = class_score_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                          jnp.concatenate([chosen, jnp.full_like(chosen, null_label)]))
    conditional, unconditional = jnp.split(both, 2)
    return conditional + weight * (conditional - unconditional)

  return guided
