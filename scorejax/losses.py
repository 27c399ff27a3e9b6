"""Score-matching objectives: explicit, implicit, sliced, denoising, and the SDE losses.

Every loss comes as a deterministic per-example core, `*_losses(...) -> [B]`, that takes
its random draws (noise `z`, times `t`, labels, projections `v`) as arguments, and a thin
keyed wrapper, `name(key, ...) -> (loss, metrics)`, that draws them and averages over the
batch. The cores make the losses testable against the reference with injected noise.

Score functions come in two shapes: `score_fn(x [B, ...]) -> [B, ...]` for the
noise-free objectives (explicit / implicit / sliced / denoising at one level; close over
`t` for a time-conditional network), and `score_fn(x, t [B])` for `sde_loss`. The
Jacobian-based objectives take the Jacobian of the *batched* function, so `score_fn` must
treat examples independently (no batch statistics).

References:
  Hyvarinen 2005, "Estimation of Non-Normalized Statistical Models by Score Matching",
  JMLR, Theorem 1 (implicit score matching).
  Vincent 2011, "A Connection Between Score Matching and Denoising Autoencoders", Neural
  Computation, Eq. (11) (denoising score matching).
  Song, Garg, Shi & Ermon 2019, "Sliced Score Matching", UAI, Eq. (7) (SSM) and Eq. (8)
  (SSM-VR).
  Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
  Equations", ICLR, Eq. (7) (continuous loss) and its likelihood weighting
  `lambda(t) = g(t)^2` (Song, Durkan, Murray & Ermon 2021, Eq. (9)); score_sde's
  `get_smld_loss_fn` / `get_ddpm_loss_fn` (discrete SMLD and DDPM losses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from scorejax import checks
from scorejax import sde as sde_lib
from scorejax.models import make_score_fn

Array = jax.Array
PRNGKey = jax.Array
Params = Any
ScoreFn = Callable[[Array, Array], Array]
DataScoreFn = Callable[[Array], Array]
ModelFn = Callable[[Array, Array], Array]
Metrics = dict[str, Array]
LossFn = Callable[[Params, PRNGKey, Array], tuple[Array, Metrics]]


def _flat(x: Array) -> Array:
  return x.reshape(x.shape[0], -1)


def reduce_dims(elementwise: Array, reduce_mean: bool) -> Array:
  """`[B, ...] -> [B]`: mean over dims, or (score_sde's `reduce_mean=False`) half the sum."""
  flat = _flat(elementwise)
  return jnp.mean(flat, axis=-1) if reduce_mean else 0.5 * jnp.sum(flat, axis=-1)


def summarize(losses: Array) -> tuple[Array, Metrics]:
  """Batch mean of per-example losses `[B]`, with their spread as metrics."""
  loss = jnp.mean(losses)
  return loss, {'loss': loss, 'loss_std': jnp.std(losses), 'loss_max': jnp.max(losses)}


# -- projections and Jacobian traces ----------------------------------------------------------


def _gaussian_projections(key: PRNGKey, shape: tuple[int, ...]) -> Array:
  return jax.random.normal(key, shape)


def _rademacher_projections(key: PRNGKey, shape: tuple[int, ...]) -> Array:
  return jax.random.rademacher(key, shape, dtype=jnp.float32)


PROJECTIONS: dict[str, Callable[[PRNGKey, tuple[int, ...]], Array]] = {
    'gaussian': _gaussian_projections,
    'rademacher': _rademacher_projections,
}


def sample_projections(key: PRNGKey, shape: tuple[int, ...], kind: str = 'gaussian') -> Array:
  """Random projections `v` with `E[v v^T] = I` (`'gaussian'` or `'rademacher'`).

  Raises:
    ValueError: for an unknown `kind`, listing the valid ones.
  """
  if kind not in PROJECTIONS:
    raise ValueError(f'unknown projection {kind!r}; valid choices: {sorted(PROJECTIONS)}')
  return PROJECTIONS[kind](key, shape)


def hutchinson_trace(fn: DataScoreFn, x: Array, v: Array) -> tuple[Array, Array]:
  """Hutchinson estimates `v^T (d fn / d x) v` of the per-example Jacobian trace.

  One Jacobian-vector product per projection; the Jacobian is never formed. Unbiased
  when `E[v v^T] = I`.

  Args:
    fn: batched `fn(x [B, ...]) -> [B, ...]` acting on each example independently.
    x: `[B, ...]` points.
    v: `[M, B, ...]` projections.

  Returns:
    `(fn(x) [B, ...], estimates [M, B])`.
  """
  out, jvp_fn = jax.linearize(fn, x)
  jv = jax.vmap(jvp_fn)(v)
  return out, jnp.sum((v * jv).reshape(v.shape[0], x.shape[0], -1), axis=-1)


def exact_jacobian_trace(fn: DataScoreFn, x: Array) -> tuple[Array, Array]:
  """Exact per-example trace of `d fn / d x` with one JVP per dimension (low dimension).

  Args:
    fn: batched `fn(x [B, ...]) -> [B, ...]` acting on each example independently.
    x: `[B, ...]` points with `D = prod(x.shape[1:])` small.

  Returns:
    `(fn(x) [B, ...], trace [B])`.
  """
  dim = math.prod(x.shape[1:])
  basis = jnp.eye(dim, dtype=x.dtype).reshape((dim, 1) + x.shape[1:])
  out, jvp_fn = jax.linearize(fn, x)
  columns = jax.vmap(lambda e: jvp_fn(jnp.broadcast_to(e, x.shape)))(basis)  # [D, B, ...]
  columns = columns.reshape(dim, x.shape[0], dim)
  return out, jnp.trace(columns, axis1=0, axis2=2)


# -- objectives on data (no time) --------------------------------------------------------------


def _shape_checked(score_fn: DataScoreFn) -> DataScoreFn:
  """`score_fn`, checked (at trace time) to return the shape of its input.

  A score of another shape (`[B]`, or `[D]` from a reduction over the batch) would otherwise
  broadcast into the loss without an error.
  """
  def checked(x: Array) -> Array:
    score = score_fn(x)
    if jnp.shape(score) != jnp.shape(x):
      raise ValueError(f'score_fn(x) must return the shape of x {tuple(jnp.shape(x))}, got '
                       f'{tuple(jnp.shape(score))}')
    return score
  return checked


def explicit_score_matching_losses(
    score_fn: DataScoreFn, target_score_fn: DataScoreFn, x: Array
) -> Array:
  """Per-example `||s(x) - grad log p(x)||^2 / 2` `[B]`, for a known target score."""
  score, target = _shape_checked(score_fn)(x), _shape_checked(target_score_fn)(x)
  return 0.5 * jnp.sum(_flat(score - target) ** 2, axis=-1)


def explicit_score_matching(
    score_fn: DataScoreFn, target_score_fn: DataScoreFn, x: Array
) -> tuple[Array, Metrics]:
  """Explicit score matching (Fisher divergence / 2) on a batch `x [B, ...]`.

  Returns:
    `(loss, metrics)`: the batch mean of `explicit_score_matching_losses`.
  """
  return summarize(explicit_score_matching_losses(score_fn, target_score_fn, x))


def implicit_score_matching_losses(score_fn: DataScoreFn, x: Array) -> Array:
  """Per-example `||s(x)||^2 / 2 + tr(grad_x s(x))` `[B]`, with the exact trace.

  References:
    Hyvarinen 2005, Theorem 1: equals explicit score matching up to a constant.
  """
  score, trace = exact_jacobian_trace(_shape_checked(score_fn), x)
  return 0.5 * jnp.sum(_flat(score) ** 2, axis=-1) + trace


def implicit_score_matching(score_fn: DataScoreFn, x: Array) -> tuple[Array, Metrics]:
  """Implicit score matching on a batch `x [B, D]` (exact trace: low dimension only)."""
  return summarize(implicit_score_matching_losses(score_fn, x))


def sliced_score_matching_losses(
    score_fn: DataScoreFn, x: Array, v: Array, *, variance_reduction: bool = False
) -> Array:
  """Per-example sliced score matching `[B]`, averaged over the projections `v`.

  SSM: `v^T grad_x s v + (v^T s)^2 / 2`; SSM-VR: `v^T grad_x s v + ||s||^2 / 2`.

  Args:
    score_fn: batched `score_fn(x [B, ...]) -> [B, ...]`.
    x: `[B, ...]` data.
    v: `[M, B, ...]` projections with `E[v v^T] = I`.
    variance_reduction: use the SSM-VR form.

  Returns:
    `[B]` losses.

  References:
    Song et al. 2019, "Sliced Score Matching", Eq. (7) and (8).
  """
  score, quadratic = hutchinson_trace(_shape_checked(score_fn), x, v)
  if variance_reduction:
    second = 0.5 * jnp.sum(_flat(score) ** 2, axis=-1)[None]
  else:
    second = 0.5 * jnp.sum((v * score[None]).reshape(quadratic.shape + (-1,)), axis=-1) ** 2
  return jnp.mean(quadratic + second, axis=0)


def sliced_score_matching(
    key: PRNGKey,
    score_fn: DataScoreFn,
    x: Array,
    *,
    n_projections: int = 1,
    projection: str = 'gaussian',
    variance_reduction: bool = False,
) -> tuple[Array, Metrics]:
  """Sliced score matching with `n_projections` random projections per example.

  Args:
    key: PRNG key for the projections.
    score_fn: batched `score_fn(x [B, ...]) -> [B, ...]`.
    x: `[B, ...]` data.
    n_projections: projections per example.
    projection: `'gaussian'` or `'rademacher'`.
    variance_reduction: use SSM-VR.

  Returns:
    `(loss, metrics)`.

  Raises:
    ValueError: for an unknown `projection` or `n_projections < 1`.
  """
  checks.check_count('n_projections', n_projections)
  v = sample_projections(key, (n_projections,) + x.shape, projection)
  return summarize(
      sliced_score_matching_losses(score_fn, x, v, variance_reduction=variance_reduction))


def denoising_score_matching_losses(
    score_fn: DataScoreFn, x: Array, z: Array, sigma: float | Array
) -> Array:
  """Per-example `||s(x + sigma z) + z / sigma||^2 / 2` `[B]` (noise `z [B, ...]` given).

  References:
    Vincent 2011, Eq. (11): the target `-(x_tilde - x) / sigma^2 = -z / sigma`.
  """
  score = _shape_checked(score_fn)(x + sigma * z)
  return 0.5 * jnp.sum(_flat(score + z / sigma) ** 2, axis=-1)


def denoising_score_matching(
    key: PRNGKey, score_fn: DataScoreFn, x: Array, sigma: float | Array
) -> tuple[Array, Metrics]:
  """Denoising score matching at one noise level `sigma` on a batch `x [B, ...]`.

  Its minimiser is the score of the perturbed data `p_sigma = p * N(0, sigma^2 I)`.

  Raises:
    ValueError: for a concrete `sigma <= 0`.
  """
  checks.check_in_range('sigma', sigma, low=0.0, low_open=True)
  z = jax.random.normal(key, x.shape, x.dtype)
  return summarize(denoising_score_matching_losses(score_fn, x, z, sigma))


# -- the SDE losses of score_sde ---------------------------------------------------------------


_BISECTION_STEPS = 40  # halves [eps, T] below float32 resolution


def _check_importance(likelihood_weighting: bool, importance_weighting: bool) -> None:
  if importance_weighting and not likelihood_weighting:
    raise ValueError('importance_weighting samples the likelihood-weighted loss; it needs '
                     'likelihood_weighting=True')


def importance_normalizer(sde: sde_lib.SDE, eps: float) -> Array:
  """`Z = F(T) - F(eps)` of `sde.likelihood_weight_integral`: the mass of `g^2 / std^2`."""
  ends = sde.likelihood_weight_integral(jnp.array([eps, sde.T], jnp.float32))
  return ends[1] - ends[0]


def importance_times(sde: sde_lib.SDE, u: Array, eps: float) -> Array:
  """Times in `[eps, T]` with density `g(t)^2 / std(t)^2 / Z`, from uniforms `u` in [0, 1).

  Inverts `F = sde.likelihood_weight_integral` by bisection: `F(t) = F(eps) + u Z`. For the
  VP SDEs `F` is minus the log-SNR, so the times are uniform in log-SNR; for VE they are
  uniform in `t`.
  """
  u = jnp.asarray(u, jnp.float32)
  f_eps = sde.likelihood_weight_integral(jnp.float32(eps))
  target = f_eps + u * importance_normalizer(sde, eps)
  low = jnp.full(u.shape, eps, jnp.float32)
  high = jnp.full(u.shape, sde.T, jnp.float32)

  def halve(_, bounds):
    low, high = bounds
    mid = 0.5 * (low + high)
    early = sde.likelihood_weight_integral(mid) < target  # F increases: the root is later
    return jnp.where(early, mid, low), jnp.where(early, high, mid)

  low, high = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, (low, high))
  return 0.5 * (low + high)


def sde_losses(
    score_fn: ScoreFn,
    sde: sde_lib.SDE,
    x0: Array,
    t: Array,
    z: Array,
    *,
    reduce_mean: bool = False,
    likelihood_weighting: bool = False,
    importance_weighting: bool = False,
    eps: float = 1e-5,
) -> Array:
  """Per-example continuous denoising loss `[B]` at given times `t [B]` and noise `z`.

  `x_t = mean(t) + std(t) z`; unweighted: `||std s(x_t, t) + z||^2` (i.e.
  `lambda(t) = std^2`); likelihood-weighted: `g(t)^2 ||s(x_t, t) + z / std||^2`.
  With `importance_weighting`, `t` was drawn from the density `g^2 / std^2 / Z` on
  `[eps, T]` (`importance_times`) and the likelihood-weighted loss is divided by
  `(T - eps)` times that density: `Z / (T - eps) ||std s + z||^2`, whose expectation is
  the likelihood-weighted loss's under `t ~ U[eps, T]`, without the variance of the factor
  `g^2 / std^2` (~1/t near t = 0 on the VP SDEs: from ~20 at T to ~1e5 at eps = 1e-5).
  Reduced over dimensions by the mean, or by half the sum (`reduce_mean=False`).

  References:
    Song et al. 2021, Eq. (7); score_sde `losses.get_sde_loss_fn`. Song, Durkan, Murray &
    Ermon 2021, Sec. 5 (importance sampling of `t` for the likelihood weighting).
  """
  _check_importance(likelihood_weighting, importance_weighting)
  mean, std = sde.marginal_prob(x0, t)
  xt = mean + sde_lib.batch_mul(std, z)
  score = sde_lib.evaluate_score(score_fn, xt, t)
  if importance_weighting:
    scale = importance_normalizer(sde, eps) / (sde.T - eps)
    return reduce_dims((sde_lib.batch_mul(std, score) + z) ** 2, reduce_mean) * scale
  if likelihood_weighting:
    g2 = sde.sde(jnp.zeros_like(x0), t)[1] ** 2
    return reduce_dims((score + sde_lib.batch_mul(1.0 / std, z)) ** 2, reduce_mean) * g2
  return reduce_dims((sde_lib.batch_mul(std, score) + z) ** 2, reduce_mean)


def sde_loss(
    key: PRNGKey,
    score_fn: ScoreFn,
    sde: sde_lib.SDE,
    batch: Array,
    *,
    reduce_mean: bool = False,
    likelihood_weighting: bool = False,
    importance_weighting: bool = False,
    eps: float = 1e-5,
) -> tuple[Array, Metrics]:
  """score_sde's continuous training loss with `t ~ U[eps, T]` and `z ~ N(0, I)`.

  Args:
    key: PRNG key.
    score_fn: `score_fn(x [B, ...], t [B]) -> [B, ...]`.
    sde: the forward SDE.
    batch: `[B, ...]` data.
    reduce_mean: average over dimensions instead of half-summing.
    likelihood_weighting: weight by `g(t)^2` (maximum-likelihood training).
    importance_weighting: draw `t` from `g^2 / std^2` instead (`importance_times`) and
      reweight: the same expected loss as `likelihood_weighting` with a far smaller variance.
    eps: smallest time, for numerical stability.

  Returns:
    `(loss, metrics)`.

  Raises:
    ValueError: for a concrete `eps` outside `(0, T)`, or `importance_weighting` without
      `likelihood_weighting`.
  """
  checks.check_time('eps', eps, sde.T)
  _check_importance(likelihood_weighting, importance_weighting)
  key_t, key_z = jax.random.split(key)
  if importance_weighting:
    t = importance_times(sde, jax.random.uniform(key_t, (batch.shape[0],)), eps)
  else:
    t = jax.random.uniform(key_t, (batch.shape[0],), minval=eps, maxval=sde.T)
  z = jax.random.normal(key_z, batch.shape, batch.dtype)
  return summarize(sde_losses(score_fn, sde, batch, t, z, reduce_mean=reduce_mean,
                               likelihood_weighting=likelihood_weighting,
                               importance_weighting=importance_weighting, eps=eps))


def smld_losses(
    model_fn: ModelFn, sde: sde_lib.VESDE, x0: Array, labels: Array, z: Array, *,
    reduce_mean: bool = False
) -> Array:
  """Per-example SMLD loss `[B]`: `sigma^2 ||model(x0 + sigma z, i) + z / sigma||^2`.

  `labels [B]` are integer indices into the *descending* table of noise levels, the
  network output is the score.

  References:
    score_sde `losses.get_smld_loss_fn`; Song & Ermon 2019 (NCSN), Eq. (2).
  """
  sigmas = jnp.asarray(sde.discrete_sigmas[::-1].copy())[labels]
  noise = sde_lib.batch_mul(sigmas, z)
  score = model_fn(x0 + noise, labels)
  target = -sde_lib.batch_mul(1.0 / sigmas**2, noise)
  return reduce_dims((score - target) ** 2, reduce_mean) * sigmas**2


def smld_loss(
    key: PRNGKey, model_fn: ModelFn, sde: sde_lib.VESDE, batch: Array, *,
    reduce_mean: bool = False
) -> tuple[Array, Metrics]:
  """SMLD (NCSN) loss with uniformly drawn noise-level indices; returns `(loss, metrics)`."""
  key_labels, key_z = jax.random.split(key)
  labels = jax.random.randint(key_labels, (batch.shape[0],), 0, sde.N)
  z = jax.random.normal(key_z, batch.shape, batch.dtype)
  return summarize(smld_losses(model_fn, sde, batch, labels, z, reduce_mean=reduce_mean))


def ddpm_losses(
    model_fn: ModelFn, sde: sde_lib.VariancePreservingSDE, x0: Array, labels: Array, z: Array, *,
    reduce_mean: bool = False
) -> Array:
  """Per-example DDPM loss `[B]`: `||model(sqrt(a_i) x0 + sqrt(1 - a_i) z, i) - z||^2`.

  `labels [B]` are integer steps; the network predicts the noise `z`.

  References:
    Ho et al. 2020, Eq. (14); score_sde `losses.get_ddpm_loss_fn`.
  """
  sqrt_alphas_cumprod = jnp.asarray(sde.sqrt_alphas_cumprod)[labels]
  sqrt_1m_alphas_cumprod = jnp.asarray(sde.sqrt_1m_alphas_cumprod)[labels]
  xt = sde_lib.batch_mul(sqrt_alphas_cumprod, x0) + sde_lib.batch_mul(sqrt_1m_alphas_cumprod, z)
  return reduce_dims((model_fn(xt, labels) - z) ** 2, reduce_mean)


def ddpm_loss(
    key: PRNGKey, model_fn: ModelFn, sde: sde_lib.VariancePreservingSDE, batch: Array, *,
    reduce_mean: bool = False
) -> tuple[Array, Metrics]:
  """DDPM loss with uniformly drawn integer steps; returns `(loss, metrics)`."""
  key_labels, key_z = jax.random.split(key)
  labels = jax.random.randint(key_labels, (batch.shape[0],), 0, sde.N)
  z = jax.random.normal(key_z, batch.shape, batch.dtype)
  return summarize(ddpm_losses(model_fn, sde, batch, labels, z, reduce_mean=reduce_mean))


# -- the factory the training driver calls ----------------------------------------------------


OBJECTIVES = ('sde', 'edm')  # training.objective: sde_loss / smld / ddpm, or edm_loss.edm_loss
CLASS_DROPOUT_STREAM = 7  # fold_in constant of the class-dropout key (the loss's own split
# of the key is unchanged, so unconditional training draws the same numbers as before)


def _dropped_labels(key: PRNGKey, labels: Array | None, batch: int, num_classes: int,
                    rate: float) -> Array:
  """`labels` with each replaced by `num_classes` ("no class") with probability `rate`."""
  if labels is None:
    return jnp.full((batch,), num_classes, jnp.int32)
  labels = jnp.asarray(labels, jnp.int32)
  if rate == 0.0:
    return labels
  return jnp.where(jax.random.bernoulli(key, rate, (batch,)), num_classes, labels)


def make_loss_fn(
    sde: sde_lib.SDE,
    model: Any,
    *,
    train: bool,
    reduce_mean: bool = False,
    continuous: bool = True,
    likelihood_weighting: bool = False,
    importance_weighting: bool = False,
    eps: float = 1e-5,
    class_dropout: float = 0.0,
    objective: str = 'sde',
    preconditioning: Any = None,
    sigma_data: float = 0.5,
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> LossFn:
  """Builds `loss_fn(params, key, batch) -> (loss, metrics)` as score_sde's `get_step_fn`.

  Continuous training uses `sde_loss` on the score of `models.make_score_fn`; discrete
  training uses `smld_loss` for a `VESDE` and `ddpm_loss` for a VP SDE (`VPSDE`,
  `CosineVPSDE`: the DDPM loss on its discrete chain).

  Args:
    sde: the forward SDE.
    model: a Flax module called as `model.apply({'params': params}, x, labels, train=...)`.
    train: training mode: dropout on, with `rngs={'dropout': key}`.
    reduce_mean: average over dimensions instead of half-summing.
    continuous: continuous-time training (`training.continuous`).
    likelihood_weighting: `g(t)^2` weighting (continuous only).
    importance_weighting: importance-sampled times for it (continuous only).
    eps: smallest training time (continuous only).
    class_dropout: class-conditional networks (`model.num_classes > 0`): the probability
      that an example's label is replaced by "no class" (classifier-free guidance trains
      the conditional and the unconditional score in one network; Ho & Salimans 2022).
      A batch without `'label'` trains "no class" only.
    objective: `'sde'` (score_sde's losses above) or `'edm'` (`scorejax.edm_loss`:
      log-normal noise levels `exp(N(p_mean, p_std^2))`, weighted denoising error with
      `sigma_data`; continuous only).
    preconditioning: `models.EDMPreconditioning`: the network is EDM's `F` (continuous only).
    sigma_data, p_mean, p_std: the `'edm'` objective's settings.

  Returns:
    `loss_fn(params, key, batch [B, ...] or {'image': [B, ...], 'label': [B]}) ->
    (loss, metrics)`; labels are read only by class-conditional networks.

  Raises:
    ValueError: for discrete training with an SDE other than VESDE / VP (or a VP grid too
      coarse for the DDPM tables), likelihood or importance weighting with discrete
      training, importance weighting without likelihood weighting, or an `eps` outside
      `(0, T)`, or a `class_dropout` outside [0, 1]; an unknown objective (listing the valid
      ones), the `'edm'` objective or a preconditioning with discrete training or with
      likelihood weighting, or a bad `'edm'` setting.
  """
  from scorejax import edm_loss  # it builds on this module's reductions

  if not 0.0 <= class_dropout <= 1.0:
    raise ValueError(f'training.class_dropout must be in [0, 1], got {class_dropout}')
  if objective not in OBJECTIVES:
    raise ValueError(f'unknown training.objective {objective!r}; valid choices: '
                     f'{list(OBJECTIVES)}')
  if (objective == 'edm' or preconditioning is not None) and not continuous:
    raise ValueError('training.objective=edm and model.preconditioning need '
                     'training.continuous=True')
  if objective == 'edm':
    if likelihood_weighting:
      raise ValueError('training.objective=edm has its own weighting; it does not take '
                       'training.likelihood_weighting=True')
    edm_loss.check_arguments(sde, sigma_data=sigma_data, p_std=p_std, eps=eps)
  num_classes = int(getattr(model, 'num_classes', 0) or 0)
  if continuous:
    checks.check_time('eps', eps, sde.T)
    if importance_weighting and not likelihood_weighting:
      raise ValueError('training.importance_weighting requires '
                       'training.likelihood_weighting=True')
    if importance_weighting:
      sde.likelihood_weight_integral(jnp.float32(eps))  # raises now for an SDE without one
  else:
    if likelihood_weighting or importance_weighting:
      raise ValueError('training.likelihood_weighting and training.importance_weighting '
                       'require training.continuous=True')
    if not isinstance(sde, sde_lib.VESDE | sde_lib.VariancePreservingSDE):
      raise ValueError(
          f'discrete training (training.continuous=False) is not supported for '
          f'training.sde={type(sde).__name__}; valid choices: [VESDE (smld), VPSDE or '
          'CosineVPSDE (ddpm)] '
          'or training.continuous=True')
    if isinstance(sde, sde_lib.VariancePreservingSDE):
      sde_lib.discrete_betas(sde)  # raises now if the grid is too coarse for the tables

  def loss_fn(params: Params, key: PRNGKey, batch: Array | Mapping[str, Array]):
    class_labels = None
    if isinstance(batch, Mapping):
      class_labels = batch.get('label')
      batch = batch['image']
    key_loss, key_dropout = jax.random.split(key)
    extra = {}
    if num_classes:
      extra['class_labels'] = _dropped_labels(jax.random.fold_in(key, CLASS_DROPOUT_STREAM),
                                              class_labels, batch.shape[0], num_classes,
                                              class_dropout)

    def model_fn(x: Array, labels: Array) -> Array:
      return model.apply({'params': params}, x, labels, train=train,
                         rngs={'dropout': key_dropout} if train else None, **extra)

    if continuous:
      score_fn = make_score_fn(model_fn, sde, continuous=True, preconditioning=preconditioning)
      if objective == 'edm':
        return edm_loss.edm_loss(key_loss, score_fn, sde, batch, sigma_data=sigma_data,
                                 p_mean=p_mean, p_std=p_std, eps=eps, reduce_mean=reduce_mean)
      return sde_loss(key_loss, score_fn, sde, batch, reduce_mean=reduce_mean,
                      likelihood_weighting=likelihood_weighting,
                      importance_weighting=importance_weighting, eps=eps)
    if isinstance(sde, sde_lib.VESDE):
      return smld_loss(key_loss, model_fn, sde, batch, reduce_mean=reduce_mean)
    return ddpm_loss(key_loss, model_fn, sde, batch, reduce_mean=reduce_mean)

  return loss_fn
