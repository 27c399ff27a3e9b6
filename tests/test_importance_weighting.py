"""Importance-sampled times for the likelihood-weighted SDE loss (Song, Durkan, Murray &
Ermon 2021): the density `g^2 / std^2`, its inverse CDF, and an estimator that is unbiased
against the closed-form expected loss with a far smaller variance.

For Gaussian data `N(mu, C)` and the exact score of another Gaussian `N(m, C')`, the
score is linear in `x_t`, so `E ||std s(x_t, t) + z||^2` has a closed form at every `t`;
one quadrature over `t` then gives the exact expected likelihood-weighted loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scorejax import analytic, losses
from scorejax import sde as sde_lib

SDES = {
    'vesde': sde_lib.VESDE(0.01, 50.0, 1000),
    'vpsde': sde_lib.VPSDE(0.1, 20.0, 1000),
    'subvpsde': sde_lib.SubVPSDE(0.1, 20.0, 1000),
    'cosinevpsde': sde_lib.CosineVPSDE(),
}
EPS = 1e-5
MU, COV = np.array([1.0, -0.5]), np.array([[1.0, 0.6], [0.6, 0.5]])
DATA = analytic.GaussianMixture.gaussian(jnp.asarray(MU), jnp.asarray(COV))
# The "model": the exact score of a wrong Gaussian, so the loss is not only its floor.
M, COV_MODEL = np.array([0.5, 0.0]), np.array([[1.5, 0.0], [0.0, 0.8]])
MODEL = analytic.GaussianMixture.gaussian(jnp.asarray(M), jnp.asarray(COV_MODEL))


def _coefficients(sde, t):
  """`(alpha, std, g^2)` at times `t`, float64."""
  t = jnp.asarray(t, jnp.float32)
  mean, std = sde.marginal_prob(jnp.ones((t.shape[0], 1)), t)
  g2 = sde.sde(jnp.zeros((t.shape[0], 1)), t)[1] ** 2
  return (np.asarray(mean[:, 0], np.float64), np.asarray(std, np.float64),
          np.asarray(g2, np.float64))


def _expected_loss(sde):
  """`E_{t ~ U[eps, T]} g^2 / std^2 E ||std s + z||^2 / 2` by quadrature in log t."""
  t = np.exp(np.linspace(np.log(EPS), np.log(sde.T), 20001))
  alpha, std, g2 = _coefficients(sde, t)
  values = []
  for a, s in zip(alpha, std, strict=True):
    # s(x) = -A (x - a m) with A = (a^2 C' + s^2 I)^-1, and x = a x0 + s z:
    # std s + z = -s a A x0 + (I - s^2 A) z + s a A m.
    A = np.linalg.inv(a**2 * COV_MODEL + s**2 * np.eye(2))
    mean = -s * a * A @ (MU - M)
    B = np.eye(2) - s**2 * A
    cov = s**2 * a**2 * A @ COV @ A.T + B @ B.T
    values.append(mean @ mean + np.trace(cov))
  integrand = g2 / std**2 * np.array(values) * 0.5 * t  # d t = t d log t
  return np.trapezoid(integrand, np.log(t)) / (sde.T - EPS)


def _per_example(sde, importance, n=200_000, seed=0):
  key_t, key_x, key_z = jax.random.split(jax.random.key(seed), 3)
  u = jax.random.uniform(key_t, (n,))
  t = losses.importance_times(sde, u, EPS) if importance else EPS + u * (sde.T - EPS)
  x0 = DATA.sample(key_x, n)
  z = jax.random.normal(key_z, x0.shape)
  return np.asarray(jax.jit(lambda x0, t, z: losses.sde_losses(
      MODEL.score_fn(sde), sde, x0, t, z, likelihood_weighting=True,
      importance_weighting=importance, eps=EPS))(x0, t, z), np.float64)


@pytest.mark.parametrize('name', sorted(SDES))
def test_weight_integral_derivative_is_g2_over_std2(name):
  sde = SDES[name]
  t = jnp.exp(jnp.linspace(np.log(1e-4), 0.0, 25))
  derivative = jax.vmap(jax.grad(sde.likelihood_weight_integral))(t)
  _, std, g2 = _coefficients(sde, t)
  np.testing.assert_allclose(derivative, g2 / std**2, rtol=1e-4)


@pytest.mark.parametrize('name', sorted(SDES))
def test_importance_times_invert_the_integral(name):
  sde = SDES[name]
  u = jnp.linspace(0.0, 1.0, 101)
  t = losses.importance_times(sde, u, EPS)
  assert np.all(np.diff(np.asarray(t)) > 0)
  assert float(t[0]) >= np.float32(EPS) and float(t[-1]) <= sde.T
  f = np.asarray(sde.likelihood_weight_integral(t), np.float64)
  f_eps = float(sde.likelihood_weight_integral(jnp.float32(EPS)))
  z = float(losses.importance_normalizer(sde, EPS))
  np.testing.assert_allclose((f - f_eps) / z, u, atol=2e-5)
  if name == 'vesde':  # g^2 / std^2 is constant: the times are uniform
    np.testing.assert_allclose(t, EPS + u * (sde.T - EPS), atol=1e-6)


@pytest.mark.parametrize('name', ['vpsde', 'subvpsde', 'cosinevpsde'])
def test_importance_weighted_loss_is_unbiased_with_a_smaller_variance(name):
  sde = SDES[name]
  exact = _expected_loss(sde)
  weighted, uniform = _per_example(sde, True), _per_example(sde, False)
  n = weighted.size
  # Unbiased: 4 standard errors of each estimator around the closed form (uniform times have
  # a heavy 1/t tail near eps, so their standard error is ~30x larger).
  assert abs(weighted.mean() - exact) < 4 * weighted.std() / np.sqrt(n), (weighted.mean(), exact)
  assert abs(uniform.mean() - exact) < 4 * uniform.std() / np.sqrt(n), (uniform.mean(), exact)
  assert weighted.var() < uniform.var() / 100, (weighted.var(), uniform.var())


def test_sde_loss_draws_importance_times_from_its_key():
  sde, batch = SDES['vpsde'], DATA.sample(jax.random.key(3), 8)
  key = jax.random.key(4)
  loss, _ = losses.sde_loss(key, MODEL.score_fn(sde), sde, batch, likelihood_weighting=True,
                            importance_weighting=True, eps=EPS)
  key_t, key_z = jax.random.split(key)
  t = losses.importance_times(sde, jax.random.uniform(key_t, (8,)), EPS)
  z = jax.random.normal(key_z, batch.shape)
  expected = losses.sde_losses(MODEL.score_fn(sde), sde, batch, t, z, likelihood_weighting=True,
                               importance_weighting=True, eps=EPS)
  np.testing.assert_allclose(loss, jnp.mean(expected), rtol=1e-6)


def test_importance_needs_likelihood_weighting():
  sde, batch = SDES['vpsde'], jnp.ones((2, 2))
  with pytest.raises(ValueError, match='needs likelihood_weighting=True'):
    losses.sde_loss(jax.random.key(0), MODEL.score_fn(sde), sde, batch,
                    importance_weighting=True)
  with pytest.raises(ValueError, match='requires training.likelihood_weighting=True'):
    losses.make_loss_fn(sde, None, train=True, importance_weighting=True)
  with pytest.raises(ValueError, match='require training.continuous=True'):
    losses.make_loss_fn(sde, None, train=True, continuous=False, likelihood_weighting=True,
                        importance_weighting=True)


def test_the_training_loss_factory_passes_it_on():
  from scorejax.models import make_score_fn
  from scorejax.models.mlp import MLPScoreNet

  sde, batch = SDES['cosinevpsde'], DATA.sample(jax.random.key(5), 8)
  model = MLPScoreNet(hidden=16, num_layers=1, embedding_dim=8)
  params = model.init(jax.random.key(1), batch, jnp.ones((8,)))['params']
  loss_fn = losses.make_loss_fn(sde, model, train=False, likelihood_weighting=True,
                                importance_weighting=True, eps=EPS)
  key = jax.random.key(2)
  loss, _ = loss_fn(params, key, batch)
  score_fn = make_score_fn(lambda x, labels: model.apply({'params': params}, x, labels), sde)
  expected, _ = losses.sde_loss(jax.random.split(key)[0], score_fn, sde, batch,
                                likelihood_weighting=True, importance_weighting=True, eps=EPS)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  plain, _ = losses.sde_loss(jax.random.split(key)[0], score_fn, sde, batch,
                             likelihood_weighting=True, eps=EPS)
  assert not np.isclose(float(loss), float(plain))
