"""Closed-form Gaussian / mixture distributions: densities, scores, marginals, samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nchw_to_nhwc
from scipy import stats

from scorejax import analytic
from scorejax import sde as sde_lib

SDES = {
    'vesde': sde_lib.VESDE(0.01, 50.0, 1000),
    'vpsde': sde_lib.VPSDE(0.1, 20.0, 1000),
    'subvpsde': sde_lib.SubVPSDE(0.1, 20.0, 1000),
}


def _full_mixture():
  rng = np.random.default_rng(0)
  factors = rng.normal(size=(3, 3, 3)) * 0.5
  covs = factors @ np.swapaxes(factors, -1, -2) + 0.2 * np.eye(3)
  means = rng.normal(size=(3, 3)) * 2.0
  return analytic.GaussianMixture.full([0.2, 0.5, 0.3], means, covs)


def _diagonal_mixture():
  rng = np.random.default_rng(1)
  means = rng.normal(size=(2, 2, 2)) * 2.0  # event_shape (2, 2)
  variances = rng.uniform(0.1, 1.5, size=(2, 2, 2))
  return analytic.GaussianMixture.diagonal([0.7, 0.3], means, variances)


MIXTURES = {'full': _full_mixture, 'diagonal': _diagonal_mixture}


def _scipy_log_prob(mixture, x):
  """Reference mixture log-density through scipy (float64)."""
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  covs = np.asarray(mixture.component_covariances(), np.float64)
  weights, means = np.asarray(mixture.weights), np.asarray(mixture.means, np.float64)
  terms = [
      np.log(w) + np.atleast_1d(stats.multivariate_normal(mu, cov).logpdf(x))
      for w, mu, cov in zip(weights, means, covs, strict=True)
  ]
  return np.logaddexp.reduce(np.stack(terms, axis=-1), axis=-1)


@pytest.mark.parametrize('kind', sorted(MIXTURES))
@pytest.mark.parametrize('name', [None, *sorted(SDES)])
def test_log_prob_matches_scipy(kind, name):
  mixture = MIXTURES[kind]()
  sde = SDES.get(name)
  x = 2.0 * jax.random.normal(jax.random.key(0), (6, *mixture.event_shape))
  if sde is None:
    logp = mixture.log_prob(x)
    reference = _scipy_log_prob(mixture, x)
  else:
    t = jnp.asarray([0.05, 0.3, 0.6, 0.8, 0.95, 1.0])
    logp = mixture.log_prob(x, t, sde)
    # Per-sample time: compare row i with the exact marginal mixture at t[i].
    reference = np.array([
        _scipy_log_prob(mixture.marginal(t[i], sde), x[i:i + 1])[0] for i in range(6)
    ])
  np.testing.assert_allclose(logp, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('kind', sorted(MIXTURES))
@pytest.mark.parametrize('name', [None, *sorted(SDES)])
def test_score_is_gradient_of_log_prob(kind, name):
  mixture = MIXTURES[kind]()
  sde = SDES.get(name)
  x = 2.0 * jax.random.normal(jax.random.key(1), (5, *mixture.event_shape))
  t = None if sde is None else jnp.asarray([1e-3, 0.1, 0.4, 0.7, 1.0])
  grad = jax.grad(lambda x: jnp.sum(mixture.log_prob(x, t, sde)))(x)
  score = mixture.score(x, t, sde)
  assert score.shape == x.shape
  np.testing.assert_allclose(score, grad, rtol=1e-4, atol=1e-4 * np.max(np.abs(grad)))


def test_score_of_standard_normal_under_ve_matches_golden(sde_golden):
  # The golden `analytic_score = -x / (1 + std^2)` is the exact score of N(0, I) data only
  # under VE (m = 1). Under VP / sub-VP, N(0, I) data stays N(0, m^2 + s^2) != N(0, 1 + s^2).
  x = jnp.asarray(nchw_to_nhwc(sde_golden['x']))
  t = jnp.asarray(sde_golden['t'])
  data = analytic.Gaussian(jnp.zeros(x.shape[1:]), 1.0)
  score = jax.jit(data.score_fn(SDES['vesde']))(x, t)
  golden = nchw_to_nhwc(sde_golden['vesde.analytic_score'])
  np.testing.assert_allclose(score, golden, rtol=1e-5, atol=1e-6)
  # Under VP the same data is stationary: its score is -x at every t.
  np.testing.assert_allclose(data.score(x, t, SDES['vpsde']), -x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kind', sorted(MIXTURES))
def test_samples_match_moments(kind):
  mixture = MIXTURES[kind]()
  n = 40_000
  samples = np.asarray(mixture.sample(jax.random.key(2), n)).reshape(n, -1)
  assert samples.shape[1] == mixture.dim
  cov = np.asarray(mixture.covariance())
  mean = np.asarray(mixture.mean()).reshape(-1)
  # Mean: 5 standard errors. Covariance entries: 5 standard errors of a sample covariance,
  # bounded with the fourth moment taken as that of a Gaussian of the same variance.
  std_error = np.sqrt(np.diag(cov) / n)
  np.testing.assert_array_less(np.abs(samples.mean(0) - mean), 5 * std_error)
  var = np.diag(cov)
  cov_error = np.sqrt((np.outer(var, var) + cov**2) / n) * 3
  np.testing.assert_array_less(np.abs(np.cov(samples.T) - cov), 5 * cov_error)


@pytest.mark.parametrize('name', sorted(SDES))
@pytest.mark.parametrize('kind', sorted(MIXTURES))
def test_marginal_matches_perturbed_samples(name, kind):
  mixture = MIXTURES[kind]()
  sde = SDES[name]
  n = 40_000
  key_data, key_noise = jax.random.split(jax.random.key(3))
  t = 0.3
  x0 = mixture.sample(key_data, n)
  mean, std = sde.marginal_prob(x0, jnp.full((n,), t))
  xt = np.asarray(mean + sde_lib.batch_mul(std, jax.random.normal(key_noise, x0.shape)))
  xt = xt.reshape(n, -1)
  marginal = mixture.marginal(t, sde)
  cov = np.asarray(marginal.covariance())
  var = np.diag(cov)
  np.testing.assert_array_less(
      np.abs(xt.mean(0) - np.asarray(marginal.mean()).reshape(-1)), 5 * np.sqrt(var / n))
  cov_error = 3 * np.sqrt((np.outer(var, var) + cov**2) / n)
  np.testing.assert_array_less(np.abs(np.cov(xt.T) - cov), 5 * cov_error)
  # The marginal object and the per-sample-time density agree.
  points = jnp.asarray(xt[:4]).reshape(4, *mixture.event_shape)
  np.testing.assert_allclose(marginal.log_prob(points), mixture.log_prob(points, t, sde),
                             rtol=1e-5, atol=1e-5)


def test_log_prob_integrates_to_one_in_2d():
  mixture = analytic.GaussianMixture.full(
      [0.4, 0.6], [[-1.0, 0.5], [1.5, -0.5]],
      [[[0.3, 0.1], [0.1, 0.2]], [[0.5, -0.2], [-0.2, 0.4]]])
  grid = np.linspace(-5, 5, 401)
  xx, yy = np.meshgrid(grid, grid, indexing='ij')
  points = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)
  density = np.exp(np.asarray(mixture.log_prob(points), np.float64))
  total = density.sum() * (grid[1] - grid[0]) ** 2
  np.testing.assert_allclose(total, 1.0, atol=1e-4)


def test_jit_and_event_shape():
  mixture = analytic.GaussianMixture.diagonal(
      [0.5, 0.5], jnp.stack([jnp.zeros((4, 4, 1)), jnp.ones((4, 4, 1))]), 0.5)
  assert mixture.event_shape == (4, 4, 1) and mixture.dim == 16
  x = mixture.sample(jax.random.key(4), 3)
  assert x.shape == (3, 4, 4, 1)
  t = jnp.asarray([0.1, 0.5, 0.9])
  sde = SDES['vpsde']
  score = jax.jit(lambda m, x, t: m.score(x, t, sde))(mixture, x, t)
  np.testing.assert_allclose(score, mixture.score(x, t, sde), rtol=1e-6, atol=1e-6)
  # Sampling is deterministic under a fixed key.
  np.testing.assert_array_equal(x, mixture.sample(jax.random.key(4), 3))


def test_gaussian_moments_and_errors():
  cov = jnp.asarray([[2.0, 0.5], [0.5, 1.0]])
  gaussian = analytic.Gaussian(jnp.asarray([1.0, -1.0]), cov)
  np.testing.assert_allclose(gaussian.covariance(), cov, rtol=1e-6)
  np.testing.assert_allclose(gaussian.mean(), [1.0, -1.0])
  with pytest.raises(ValueError, match='sde'):
    gaussian.log_prob(jnp.zeros((1, 2)), t=jnp.ones((1,)))
  with pytest.raises(ValueError, match='covs'):
    analytic.GaussianMixture.full([1.0], jnp.zeros((1, 2)), jnp.eye(3)[None])


@pytest.mark.parametrize('build, message', [
    (lambda: analytic.GaussianMixture.diagonal([-0.5, 1.5], jnp.zeros((2, 2)), 1.0),
     r'^weights must be >= 0 with a positive sum'),
    (lambda: analytic.GaussianMixture.diagonal([0.0, 0.0], jnp.zeros((2, 2)), 1.0),
     r'^weights must be >= 0 with a positive sum'),
    (lambda: analytic.GaussianMixture.diagonal([1.0], jnp.zeros((1, 2)), jnp.array([1.0, -1.0])),
     r'^variances must be >= 0'),
    (lambda: analytic.GaussianMixture.full([1.0], jnp.zeros((1, 2)), [[[1.0, 2.0], [2.0, 1.0]]]),
     r'^covs\[0\] must be positive semi-definite, got smallest eigenvalue -1'),
    (lambda: analytic.GaussianMixture.full([1.0], jnp.zeros((1, 2)), [[[1.0, 0.5], [0.0, 1.0]]]),
     r'^covs\[0\] must be finite and symmetric'),
])
def test_invalid_mixtures_are_rejected(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_degenerate_but_valid_mixtures_are_accepted():
  # A singular (rank-1) covariance is a valid Gaussian on a line; zero weights are allowed.
  mixture = analytic.GaussianMixture.full([0.0, 1.0], jnp.zeros((2, 2)),
                                          jnp.ones((2, 2, 2)))
  samples = mixture.sample(jax.random.key(0), 1000)
  np.testing.assert_allclose(samples[:, 0], samples[:, 1], atol=1e-5)
  # Inside jit the values are traced and cannot be checked; construction still works.
  weights = jax.jit(lambda w: analytic.GaussianMixture.diagonal(
      w, jnp.zeros((2, 2)), 1.0).weights)(jnp.array([1.0, 3.0]))
  np.testing.assert_allclose(weights, [0.25, 0.75])
