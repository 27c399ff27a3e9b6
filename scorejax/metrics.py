"""Sample-quality metrics: FID, KID, Inception Score, streaming feature statistics, SWD, MMD.

Pure math, no I/O and no network. The feature-space metrics (FID, KID, IS) work on host
arrays in float64, the precision the standard implementations (TF-GAN, pytorch-fid, EDM)
use, so that numbers can be compared with published ones. The low-dimensional metrics
(sliced Wasserstein distance, MMD, negative log-likelihood) are written in `jax.numpy`.

Shapes: features `[N, D]`, logits `[N, K]`, low-dimensional samples `[N, D]`.

References:
  Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
    Nash Equilibrium" (FID, Eq. 6).
  Binkowski et al. 2018, "Demystifying MMD GANs" (KID, Eq. 4, cubic polynomial kernel).
  Salimans et al. 2016, "Improved Techniques for Training GANs" (Inception Score).
  Gretton et al. 2012, "A Kernel Two-Sample Test" (unbiased MMD^2, Lemma 6).
  Bonneel et al. 2015, "Sliced and Radon Wasserstein Barycenters of Measures" (SWD).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# ----------------------------------------------------------------------------------------
# Fréchet distance and streaming statistics.


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (eigh, clipped)."""
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
  """Returns `tr sqrt(cov1 cov2)` for covariances `[D, D]`, in float64.

  `cov1 cov2` is similar to the symmetric PSD matrix `A^T cov2 A` for any factor
  `cov1 = A A^T` (Cholesky when `cov1` is positive definite, else its symmetric square root),
  so its eigenvalues are real and non-negative; taking them from the symmetric form avoids
  the complex round-off that a general `sqrtm(cov1 @ cov2)` produces for near-singular
  covariances (the case pytorch-fid handles with an eps offset).
  """
  cov1 = np.asarray(cov1, np.float64)
  cov2 = np.asarray(cov2, np.float64)
  cov1 = (cov1 + cov1.T) / 2
  try:
    factor = np.linalg.cholesky(cov1)
  except np.linalg.LinAlgError:  # singular (e.g. fewer samples than dimensions)
    factor = _sqrtm_psd(cov1)
  inner = factor.T @ cov2 @ factor
  eigvals = np.linalg.eigvalsh((inner + inner.T) / 2)
  return float(np.sum(np.sqrt(np.clip(eigvals, 0.0, None))))


def frechet_distance(
  mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray
) -> float:
  """Fréchet distance between `N(mu1, cov1)` and `N(mu2, cov2)`.

  `d^2 = |mu1 - mu2|^2 + tr(cov1 + cov2 - 2 sqrt(cov1 cov2))`, computed in float64. This is
  FID when the statistics are those of Inception pool3 features.

  Args:
    mu1: mean `[D]` of the first set of features.
    cov1: covariance `[D, D]` of the first set.
    mu2: mean `[D]` of the second set.
    cov2: covariance `[D, D]` of the second set.

  Returns:
    The squared Fréchet distance (a Python float, as FID is reported).

  Raises:
    ValueError: if the shapes do not agree.

  References:
    Heusel et al. 2017, Eq. (6); Dowson & Landau 1982.
  """
  mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
  cov1, cov2 = (np.atleast_2d(np.asarray(c, np.float64)) for c in (cov1, cov2))
  dim = mu1.shape[0]
  if mu2.shape != (dim,) or cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
    raise ValueError(
      f'frechet_distance: shapes disagree: mu1 {mu1.shape}, cov1 {cov1.shape}, '
      f'mu2 {mu2.shape}, cov2 {cov2.shape}'
    )
  diff = mu1 - mu2
  value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2)
  return float(value)


@dataclasses.dataclass
class FeatureStats:
  """Streaming mean / covariance of features, accumulated in float64.

  Holds the count, the sum and the sum of outer products, so 50k Inception features never
  sit in memory at once: `stats.update(batch)` per batch, `a.merge(b)` across hosts or
  shards, `stats.mean_cov()` at the end (unbiased covariance, as `np.cov`).
  """

  dim: int
  count: int = 0
  total: np.ndarray | None = None
  total_outer: np.ndarray | None = None

  def __post_init__(self):
    if self.total is None:
      self.total = np.zeros([self.dim], np.float64)
    if self.total_outer is None:
      self.total_outer = np.zeros([self.dim, self.dim], np.float64)

  def update(self, feats: np.ndarray) -> FeatureStats:
    """Adds features `[B, D]`; returns `self` for chaining."""
    feats = np.asarray(feats, np.float64).reshape(-1, self.dim)
    self.count += feats.shape[0]
    self.total += feats.sum(axis=0)
    self.total_outer += feats.T @ feats
    return self

  def merge(self, other: FeatureStats) -> FeatureStats:
    """Returns the statistics of the union of both feature sets (a new object)."""
    if other.dim != self.dim:
      raise ValueError(f'FeatureStats.merge: dim {self.dim} != {other.dim}')
    return FeatureStats(
      self.dim,
      self.count + other.count,
      self.total + other.total,
      self.total_outer + other.total_outer,
    )

  def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(mean [D], covariance [D, D])` with the unbiased `1 / (n - 1)` normalization.

    Raises:
      ValueError: with fewer than two features.
    """
    if self.count < 2:
      raise ValueError(f'FeatureStats.mean_cov needs at least 2 features, got {self.count}')
    mean = self.total / self.count
    cov = (self.total_outer - self.count * np.outer(mean, mean)) / (self.count - 1)
    return mean, cov


# ----------------------------------------------------------------------------------------
# Kernel Inception Distance and Inception Score.


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_inception_distance(
  feats1: np.ndarray,
  feats2: np.ndarray,
  num_subsets: int = 100,
  subset_size: int = 1000,
  seed: int = 0,
) -> tuple[float, float]:
  """Unbiased KID: MMD^2 with the kernel `k(x, y) = (x.y / d + 1)^3`, averaged over subsets.

  Each subset draws `m = min(subset_size, N1, N2)` rows of each set without replacement and
  computes the unbiased estimator (diagonal terms excluded), as TF-GAN / StyleGAN / EDM do.

  Args:
    feats1: features `[N1, D]`.
    feats2: features `[N2, D]`.
    num_subsets: number of random subsets (default 100).
    subset_size: rows per subset (default 1000), clipped to the sample counts.
    seed: seed of the host RNG that draws the subsets.

  Returns:
    `(mean, std)` of the per-subset estimates.

  Raises:
    ValueError: on mismatched feature dimensions or fewer than 2 rows.

  References:
    Binkowski et al. 2018, Eq. (4) and Appendix D.
  """
  feats1 = np.asarray(feats1, np.float64)
  feats2 = np.asarray(feats2, np.float64)
  if feats1.ndim != 2 or feats2.ndim != 2 or feats1.shape[1] != feats2.shape[1]:
    raise ValueError(f'KID: feature shapes {feats1.shape} and {feats2.shape} disagree')
  m = min(subset_size, feats1.shape[0], feats2.shape[0])
  if m < 2:
    raise ValueError(f'KID needs at least 2 rows per set, got subset size {m}')
  rng = np.random.default_rng(seed)
  estimates = np.empty([num_subsets], np.float64)
  for i in range(num_subsets):
    x = feats1[rng.choice(feats1.shape[0], m, replace=False)]
    y = feats2[rng.choice(feats2.shape[0], m, replace=False)]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    estimates[i] = within - 2.0 * k_xy.sum() / (m * m)
  return float(estimates.mean()), float(estimates.std())


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
  """Inception Score `exp(E_x KL(p(y|x) || p(y)))`, mean and std over splits.

  The samples are split in order into `num_splits` contiguous chunks (as the reference
  implementations do); `p(y)` is the marginal of each chunk.

  Args:
    logits: classifier logits `[N, K]` (the 1008-way Inception logits for the standard IS).
    num_splits: number of splits (default 10), clipped to `N`.

  Returns:
    `(mean, std)` of the per-split scores; `1 <= IS <= K`.

  References:
    Salimans et al. 2016, Section 4.
  """
  logits = np.asarray(logits, np.float64)
  log_probs = logits - logits.max(axis=1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
  scores = []
  for chunk in np.array_split(log_probs, min(num_splits, logits.shape[0])):
    probs = np.exp(chunk)
    peak = chunk.max(axis=0)
    log_marginal = peak + np.log(np.exp(chunk - peak).mean(axis=0))  # stable log-mean-exp
    kl = np.sum(probs * (chunk - log_marginal), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------
# Low-dimensional sample metrics.


def _empirical_quantiles(sorted_values: Array, num: int) -> Array:
  """Empirical quantile function of sorted `[N, P]` columns at `num` mid-points levels."""
  n = sorted_values.shape[0]
  if n == num:
    return sorted_values
  levels = (jnp.arange(num) + 0.5) / num * n - 0.5
  grid = jnp.arange(n, dtype=levels.dtype)
  return jax.vmap(lambda col: jnp.interp(levels, grid, col), in_axes=1, out_axes=1)(sorted_values)


def sliced_wasserstein_distance(
  key: Array, x: Array, y: Array, num_projections: int = 256, p: int = 2
) -> Array:
  """Sliced p-Wasserstein distance between two empirical distributions.

  `SW_p = (E_theta W_p^p(theta.x, theta.y))^(1/p)` with `theta` uniform on the unit sphere,
  estimated with `num_projections` random directions; the 1-D distances compare sorted
  projections (quantile functions are interpolated when the sample counts differ).

  Args:
    key: PRNG key for the projection directions.
    x: samples `[N1, D]`.
    y: samples `[N2, D]`.
    num_projections: number of random directions.
    p: order of the Wasserstein distance.

  Returns:
    Scalar `SW_p`.

  References:
    Bonneel et al. 2015, Section 2.2.
  """
  theta = jax.random.normal(key, (x.shape[1], num_projections))
  theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
  proj_x = jnp.sort(x @ theta, axis=0)
  proj_y = jnp.sort(y @ theta, axis=0)
  num = max(x.shape[0], y.shape[0])
  diff = _empirical_quantiles(proj_x, num) - _empirical_quantiles(proj_y, num)
  return jnp.mean(jnp.abs(diff) ** p) ** (1.0 / p)


def _squared_distances(x: Array, y: Array) -> Array:
  sq = jnp.sum(x**2, 1)[:, None] + jnp.sum(y**2, 1)[None, :] - 2.0 * x @ y.T
  return jnp.maximum(sq, 0.0)


def median_bandwidth(x: Array, y: Array) -> Array:
  """Median heuristic: the median pairwise distance of the pooled samples (off-diagonal)."""
  z = jnp.concatenate([x, y], axis=0)
  n = z.shape[0]
  dist = jnp.sqrt(_squared_distances(z, z))
  return jnp.median(dist[jnp.triu_indices(n, k=1)])


def mmd_rbf(x: Array, y: Array, bandwidths: Sequence[float] | Array | None = None) -> Array:
  """Unbiased MMD^2 with an RBF kernel (sum over bandwidths).

  `k(a, b) = sum_s exp(-|a - b|^2 / (2 s^2))`; the within-set averages exclude the diagonal,
  so the estimate is unbiased (and can be slightly negative).

  Args:
    x: samples `[N1, D]`, `N1 >= 2`.
    y: samples `[N2, D]`, `N2 >= 2`.
    bandwidths: kernel widths `s`; default: the median heuristic (`median_bandwidth`).

  Returns:
    Scalar unbiased MMD^2 estimate.

  References:
    Gretton et al. 2012, Lemma 6 (Eq. 3).
  """
  if bandwidths is None:
    bandwidths = median_bandwidth(x, y)[None]
  scales = jnp.asarray(bandwidths, x.dtype).reshape(-1)

  def kernel(a, b):
    sq = _squared_distances(a, b)[..., None]
    return jnp.sum(jnp.exp(-sq / (2.0 * scales**2)), axis=-1)

  n, m = x.shape[0], y.shape[0]
  k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
  term_xx = (k_xx.sum() - jnp.trace(k_xx)) / (n * (n - 1))
  term_yy = (k_yy.sum() - jnp.trace(k_yy)) / (m * (m - 1))
  return term_xx + term_yy - 2.0 * k_xy.mean()


def negative_log_likelihood(samples: Array, log_prob_fn: Callable[[Array], Array]) -> Array:
  """Mean negative log-likelihood `-E log p(x)` of samples `[N, D]` under a known density.

  Args:
    samples: model samples `[N, D]`.
    log_prob_fn: the true data log-density, `[N, D] -> [N]` (e.g. `analytic.Gaussian`'s).

  Returns:
    Scalar mean NLL in nats: the cross-entropy `H(q, p)`, equal to the data entropy in
    expectation when the samples follow `p`. Samples collapsed onto high-density regions
    score lower, so report it next to SWD / MMD, never alone.
  """
  return -jnp.mean(log_prob_fn(samples))
