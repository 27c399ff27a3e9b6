"""Closed-form data distributions and their exact perturbed scores under every SDE.

Owns `GaussianMixture` (and the single-`Gaussian` helper): data distributed as
`sum_k w_k N(mu_k, S_k)` with diagonal or full covariances, of any event shape (images
`[H, W, C]` are flattened to `D = H * W * C`). Every SDE of `scorejax.sde` has an affine
perturbation kernel `x_t = m(t) x_0 + s(t) z`, with `(m(t) x_0, s(t)) = sde.marginal_prob(x_0,
t)`, so the marginal at time t is again a mixture, `sum_k w_k N(m mu_k, m^2 S_k + s^2 I)`,
whose score and log-density are known exactly. This is how samplers, likelihoods and losses
are verified without training a network.

Each covariance is diagonalised once, `S_k = U_k diag(lambda_k) U_k^T`; then
`m^2 S_k + s^2 I = U_k diag(m^2 lambda_k + s^2) U_k^T`, so per-sample times need no
per-sample factorisation. Diagonal mixtures skip the rotation entirely.

References:
  Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
  Equations", ICLR. Eq. (1) perturbation kernels, Appendix B (VE / VP / sub-VP marginals).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scorejax import checks
from scorejax import sde as sde_lib

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_covariances(covs: Array) -> None:
  """Raises unless every concrete `covs[k]` is symmetric positive semi-definite.

  Tolerances are float32 ones, relative to the largest entry of each matrix: asymmetry up to
  1e-5 (it is averaged away) and eigenvalues down to -1e-5 (clipped to 0).
  """
  values = checks.concrete_array(covs)
  if values is None:
    return
  values = values.astype(np.float64)
  for k, cov in enumerate(values):
    scale = np.abs(cov).max() if np.all(np.isfinite(cov)) else np.nan
    if not scale >= 0 or np.abs(cov - cov.T).max() > 1e-5 * scale:
      raise ValueError(f'covs[{k}] must be finite and symmetric, got {cov.tolist()}')
    smallest = np.linalg.eigvalsh(cov).min()
    if smallest < -1e-5 * scale:
      raise ValueError(f'covs[{k}] must be positive semi-definite, got smallest eigenvalue '
                       f'{smallest:.4g}')


def _kernel_coefficients(sde: sde_lib.SDE, t: Array, batch: int) -> tuple[Array, Array]:
  """Returns `(m [B], s [B])` of the kernel `x_t = m x_0 + s z` at times `t` (scalar or [B])."""
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
  mean, std = sde.marginal_prob(jnp.ones((batch, 1), jnp.float32), t)
  return mean[:, 0], jnp.broadcast_to(std, (batch,))


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """A mixture of Gaussians `sum_k w_k N(mu_k, S_k)` on `R^D`, reshaped to `event_shape`.

  Build it with `diagonal`, `full` or `gaussian` rather than the raw constructor. It is a
  pytree (arrays are leaves, `event_shape` is static), so it can be passed through `jax.jit`.

  Attributes:
    weights: `[K]` mixture weights, summing to one.
    means: `[K, D]` component means.
    covs: `[K, D]` variances of diagonal components, or `[K, D, D]` full covariances.
    event_shape: the shape of one sample, with `prod(event_shape) == D`.
    eigen: for full covariances, the cached `(U [K, D, D], lambda [K, D])` with
      `S_k = U_k diag(lambda_k) U_k^T` (computed by `full`, so that scores inside a
      sampler loop need no factorisation); `None` for diagonal mixtures or to recompute.
  """

  weights: Array
  means: Array
  covs: Array
  event_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
  eigen: tuple[Array, Array] | None = None

  # -- constructors --------------------------------------------------------------------------

  @classmethod
  def diagonal(
      cls,
      weights: Array | Sequence[float],
      means: Array,
      variances: Array,
      event_shape: Sequence[int] | None = None,
  ) -> GaussianMixture:
    """A mixture with diagonal covariances.

    Args:
      weights: `[K]` non-negative weights (normalised here).
      means: `[K, D]` or `[K, *event_shape]`.
      variances: non-negative variances, same shape as `means` (or broadcastable to it).
      event_shape: the shape of one sample; defaults to `means.shape[1:]`.

    Returns:
      The mixture.

    Raises:
      ValueError: if the shapes disagree, or for negative weights or variances.
    """
    means_shape = jnp.shape(means)
    weights, means, event_shape = cls._check(weights, means, event_shape)
    variances = jnp.broadcast_to(jnp.asarray(variances, jnp.float32), means_shape)
    variances = variances.reshape(means.shape)
    values = checks.concrete_array(variances)
    if values is not None and not np.all(values >= 0):  # NaN fails too
      raise ValueError(f'variances must be >= 0 (not NaN), got smallest {values.min()}')
    return cls(weights, means, variances, event_shape)

  @classmethod
  def full(
      cls,
      weights: Array | Sequence[float],
      means: Array,
      covs: Array,
      event_shape: Sequence[int] | None = None,
  ) -> GaussianMixture:
    """A mixture with full covariances.

    Args:
      weights: `[K]` non-negative weights (normalised here).
      means: `[K, D]` or `[K, *event_shape]`.
      covs: `[K, D, D]` symmetric positive (semi-)definite covariances.
      event_shape: the shape of one sample; defaults to `means.shape[1:]`.

    Returns:
      The mixture.

    Raises:
      ValueError: if the shapes disagree, for negative weights, or covariances that are
        not symmetric positive semi-definite.
    """
    weights, means, event_shape = cls._check(weights, means, event_shape)
    covs = jnp.asarray(covs, jnp.float32)
    K, D = means.shape
    if covs.shape != (K, D, D):
      raise ValueError(f'covs must have shape {(K, D, D)}, got {covs.shape}')
    _check_covariances(covs)
    covs = 0.5 * (covs + jnp.swapaxes(covs, -1, -2))
    eigenvalues, eigenvectors = jnp.linalg.eigh(covs)
    return cls(weights, means, covs, event_shape, (eigenvectors, jnp.maximum(eigenvalues, 0.0)))

  @classmethod
  def gaussian(
      cls, mean: Array, cov: Array | float, event_shape: Sequence[int] | None = None
  ) -> GaussianMixture:
    """A single Gaussian `N(mean, cov)` (K = 1).

    Args:
      mean: `[D]` or `[*event_shape]`.
      cov: `[D, D]` full covariance, or variances of the shape of `mean`, or a scalar
        (isotropic).
      event_shape: the shape of one sample; defaults to `mean.shape`.

    Returns:
      The one-component mixture.
    """
    mean = jnp.asarray(mean, jnp.float32)
    cov = jnp.asarray(cov, jnp.float32)
    D = mean.size
    if cov.shape == (D, D) and cov.shape != mean.shape:
      return cls.full([1.0], mean[None], cov[None], event_shape or mean.shape)
    variances = jnp.broadcast_to(cov, mean.shape)
    return cls.diagonal([1.0], mean[None], variances[None], event_shape or mean.shape)

  @staticmethod
  def _check(weights, means, event_shape):
    weights = jnp.asarray(weights, jnp.float32)
    means = jnp.asarray(means, jnp.float32)
    if weights.ndim != 1 or means.shape[0] != weights.shape[0]:
      raise ValueError(f'weights {weights.shape} and means {means.shape} disagree on K')
    event_shape = tuple(int(d) for d in (means.shape[1:] if event_shape is None else event_shape))
    D = math.prod(event_shape)
    if math.prod(means.shape[1:]) != D:
      raise ValueError(f'means {means.shape} do not match event_shape {event_shape}')
    values = checks.concrete_array(weights)
    if values is not None and not (np.all(values >= 0) and values.sum() > 0):
      raise ValueError(f'weights must be >= 0 with a positive sum, got {values.tolist()}')
    return weights / jnp.sum(weights), means.reshape(-1, D), event_shape

  # -- properties ----------------------------------------------------------------------------

  @property
  def is_diagonal(self) -> bool:
    return self.covs.ndim == 2

  @property
  def dim(self) -> int:
    return self.means.shape[-1]

  @property
  def num_components(self) -> int:
    return self.means.shape[0]

  def _eigen(self) -> tuple[Array | None, Array]:
    """`(U [K, D, D] or None, lambda [K, D])` with `S_k = U_k diag(lambda_k) U_k^T`."""
    if self.is_diagonal:
      return None, self.covs
    if self.eigen is not None:
      return self.eigen
    eigenvalues, eigenvectors = jnp.linalg.eigh(self.covs)
    return eigenvectors, jnp.maximum(eigenvalues, 0.0)

  def _flatten(self, x: Array) -> Array:
    x = jnp.asarray(x)
    return x.reshape(x.shape[0], self.dim)

  # -- densities and scores ------------------------------------------------------------------

  def _components(self, x: Array, t: Array | None, sde: sde_lib.SDE | None):
    """Per-component log-densities `[B, K]` and scores `[B, K, D]` of p_t at `x [B, ...]`."""
    x = self._flatten(x)
    batch = x.shape[0]
    if t is None:
      m, s = jnp.ones((batch,)), jnp.zeros((batch,))
    elif sde is None:
      raise ValueError('log_prob / score at a time t need the sde')
    else:
      m, s = _kernel_coefficients(sde, t, batch)
    eigenvectors, eigenvalues = self._eigen()
    diff = x[:, None, :] - m[:, None, None] * self.means[None]  # [B, K, D]
    if eigenvectors is not None:
      diff = jnp.einsum('kdj,bkd->bkj', eigenvectors, diff, precision=_HIGHEST)
    var = m[:, None, None] ** 2 * eigenvalues[None] + (s**2)[:, None, None]  # [B, K, D]
    logp = -0.5 * (
        jnp.sum(diff**2 / var, axis=-1) + jnp.sum(jnp.log(var), axis=-1)
        + self.dim * np.log(2 * np.pi)
    )
    score = -diff / var
    if eigenvectors is not None:
      score = jnp.einsum('kdj,bkj->bkd', eigenvectors, score, precision=_HIGHEST)
    return logp, score

  def log_prob(
      self, x: Array, t: Array | None = None, sde: sde_lib.SDE | None = None
  ) -> Array:
    """Exact log-density of the data (`t is None`) or of the marginal p_t under `sde`.

    Args:
      x: `[B, *event_shape]` points.
      t: `None` for the data density, else times, scalar or `[B]`.
      sde: the forward SDE (needed when `t` is given).

    Returns:
      `[B]` log-densities in nats.

    Raises:
      ValueError: if `t` is given without `sde`.
    """
    logp, _ = self._components(x, t, sde)
    return jax.nn.logsumexp(logp + jnp.log(self.weights), axis=-1)

  def score(self, x: Array, t: Array | None = None, sde: sde_lib.SDE | None = None) -> Array:
    """Exact score `grad_x log p_t(x)`: responsibilities times component scores.

    Args:
      x: `[B, *event_shape]` points.
      t: `None` for the data score, else times, scalar or `[B]`.
      sde: the forward SDE (needed when `t` is given).

    Returns:
      `[B, *event_shape]` scores.

    Raises:
      ValueError: if `t` is given without `sde`.
    """
    logp, component_scores = self._components(x, t, sde)
    responsibilities = jax.nn.softmax(logp + jnp.log(self.weights), axis=-1)  # [B, K]
    score = jnp.einsum('bk,bkd->bd', responsibilities, component_scores, precision=_HIGHEST)
    return score.reshape(jnp.shape(x))

  def component_log_posterior(
      self, x: Array, t: Array | None = None, sde: sde_lib.SDE | None = None
  ) -> Array:
    """Exact `log p_t(k | x) [B, K]`: which component `x` came from, seen at time `t`.

    Components are classes: this is the Bayes-optimal noise-conditional classifier of the
    labelled data `(x_0, k)` (see `sample_labeled`), the `log p_t(y | x)` of classifier
    guidance (`scorejax.classifier_guidance`).

    Raises:
      ValueError: if `t` is given without `sde`.
    """
    logp, _ = self._components(x, t, sde)
    return jax.nn.log_softmax(logp + jnp.log(self.weights), axis=-1)

  def component(self, k: int) -> GaussianMixture:
    """Component `k` alone, `N(mu_k, S_k)`: the data law of class `k`."""
    eigen = None if self.eigen is None else tuple(a[k:k + 1] for a in self.eigen)
    return GaussianMixture(jnp.ones((1,), jnp.float32), self.means[k:k + 1],
                           self.covs[k:k + 1], self.event_shape, eigen)

  def score_fn(self, sde: sde_lib.SDE) -> ScoreFn:
    """The exact `score_fn(x [B, ...], t [B]) -> [B, ...]` of the marginals under `sde`."""
    return lambda x, t: self.score(x, t, sde)

  def marginal(self, t: float | Array, sde: sde_lib.SDE) -> GaussianMixture:
    """The exact marginal p_t at a scalar time: `sum_k w_k N(m mu_k, m^2 S_k + s^2 I)`."""
    m, s = _kernel_coefficients(sde, t, 1)
    m, s = m[0], s[0]
    if self.is_diagonal:
      return GaussianMixture(self.weights, m * self.means, m**2 * self.covs + s**2,
                             self.event_shape)
    # m^2 S + s^2 I keeps the eigenvectors of S; its eigenvalues are m^2 lambda + s^2.
    eigenvectors, eigenvalues = self._eigen()
    return GaussianMixture(self.weights, m * self.means,
                           m**2 * self.covs + s**2 * jnp.eye(self.dim), self.event_shape,
                           (eigenvectors, m**2 * eigenvalues + s**2))

  # -- sampling and moments ------------------------------------------------------------------

  def sample(self, key: Array, n: int) -> Array:
    """Exact samples `[n, *event_shape]`: pick a component by weight, then `mu + S^(1/2) z`."""
    return self.sample_labeled(key, n)[0]

  def sample_labeled(self, key: Array, n: int) -> tuple[Array, Array]:
    """Exact samples with the component each came from: `(x [n, *event_shape], k [n])`.

    The same key gives the same `x` as `sample`.
    """
    key_component, key_noise = jax.random.split(key)
    component = jax.random.categorical(key_component, jnp.log(self.weights), shape=(n,))
    z = jax.random.normal(key_noise, (n, self.dim))
    eigenvectors, eigenvalues = self._eigen()
    noise = jnp.sqrt(eigenvalues[component]) * z
    if eigenvectors is not None:
      noise = jnp.einsum('bdj,bj->bd', eigenvectors[component], noise, precision=_HIGHEST)
    x = (self.means[component] + noise).reshape((n,) + self.event_shape)
    return x, component.astype(jnp.int32)

  def mean(self) -> Array:
    """Mean `[*event_shape]` of the data distribution."""
    return (self.weights @ self.means).reshape(self.event_shape)

  def component_covariances(self) -> Array:
    """The `[K, D, D]` covariances S_k (diagonal ones expanded)."""
    return jax.vmap(jnp.diag)(self.covs) if self.is_diagonal else self.covs

  def covariance(self) -> Array:
    """Covariance `[D, D]` of the data distribution (law of total covariance)."""
    covs = self.component_covariances()
    mean = self.weights @ self.means
    centered = self.means - mean
    return jnp.einsum('k,kde->de', self.weights, covs) + jnp.einsum(
        'k,kd,ke->de', self.weights, centered, centered, precision=_HIGHEST)


jax.tree_util.register_dataclass(
    GaussianMixture, data_fields=['weights', 'means', 'covs', 'eigen'], meta_fields=['event_shape'])


def Gaussian(
    mean: Array, cov: Array | float, event_shape: Sequence[int] | None = None
) -> GaussianMixture:
  """A single Gaussian `N(mean, cov)`; see `GaussianMixture.gaussian`."""
  return GaussianMixture.gaussian(mean, cov, event_shape)
