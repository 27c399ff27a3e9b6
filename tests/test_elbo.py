"""The variational bound of `scorejax.elbo` against closed forms.

For Gaussian data `N(mu, S)` the exact score is `s*(x, t) = -A^-1 (x - alpha mu)`, with
`A = alpha^2 S + sigma^2 I`, and the diffusion term's expectation over the noise is, per `t`,

  E||sigma s* + z||^2 = tr((I - sigma^2 A^-1)^2) + sigma^2 alpha^2 ||A^-1 (x0 - mu)||^2,

so the expected bound is a one-dimensional integral, computed here in float64 by the
trapezoid rule in `log t` (independently of the library's importance sampler). With the exact
score the model is the data law blurred by the decoder: `N(mu, S + 2 (sigma_eps/alpha_eps)^2 I)`
up to the prior mismatch at `T`, which the bound must not undercut.

Monte-Carlo comparisons use `REPEATS` independent estimates per example and a tolerance of
4.5 standard errors (over all comparisons of this file, a false failure has probability
below 1e-4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scorejax import analytic, elbo, losses
from scorejax import sde as sde_lib

EPS = 1e-5
REPEATS = 100
SDES = {
    'vesde': sde_lib.VESDE(0.01, 50.0, 1000),
    'vpsde': sde_lib.VPSDE(0.1, 20.0, 1000),
    'subvpsde': sde_lib.SubVPSDE(0.1, 20.0, 1000),
    'cosine': sde_lib.CosineVPSDE(),
}
MU = np.array([1.0, -0.5])
COV = np.array([[1.0, 0.6], [0.6, 0.5]])
GAUSSIAN = analytic.GaussianMixture.gaussian(jnp.array(MU), jnp.array(COV))
MIXTURE_8D = analytic.GaussianMixture.diagonal(
    [0.5, 0.3, 0.2], 3.0 * jax.random.normal(jax.random.key(7), (3, 8)), 0.25)


def _kernel(sde, t):
  alpha, sigma = sde.marginal_prob(jnp.ones_like(t), t)
  return np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)


def _expected_diffusion(sde, x0, shift=None, n=4001):
  """`1/2 int g^2 / sigma^2 E||sigma s + z||^2 dt` for Gaussian data, `s = s* + shift`."""
  t = np.geomspace(EPS, sde.T, n)
  alpha, sigma = _kernel(sde, jnp.asarray(t, jnp.float32))
  g2 = np.asarray(sde.sde(jnp.zeros(n), jnp.asarray(t, jnp.float32))[1], np.float64) ** 2
  a, s = alpha[:, None, None], sigma[:, None, None]
  inverse = np.linalg.inv(a**2 * COV + s**2 * np.eye(2))  # [n, 2, 2]
  residual = np.eye(2) - s**2 * inverse
  trace = np.einsum('nij,nji->n', residual, residual)
  offset = np.einsum('nij,bj->bni', inverse, np.asarray(x0, np.float64) - MU)  # A^-1 (x0 - mu)
  second = trace + sigma**2 * alpha**2 * np.sum(offset**2, axis=-1)  # [B, n]
  if shift is not None:  # + sigma^2 |d|^2 + 2 sigma d . E[sigma s* + z | x0]
    second = second + sigma**2 * np.sum(shift**2) - 2 * sigma**2 * alpha * (offset @ shift)
  return np.trapezoid(g2 / sigma**2 * 0.5 * second * t, np.log(t), axis=-1)


def _estimates(score_fn, sde, x, num_times=32, repeats=REPEATS):
  """`[repeats, B]` independent estimates of the bound."""
  keys = jax.random.split(jax.random.key(0), repeats)
  return np.asarray(jax.vmap(lambda k: elbo.negative_elbo(
      k, score_fn, sde, x, num_times=num_times, eps=EPS)[0])(keys), np.float64)


def _repeated(score_fn, sde, x, num_times=32, repeats=REPEATS):
  bounds = _estimates(score_fn, sde, x, num_times, repeats)
  return bounds.mean(0), bounds.std(0) / np.sqrt(repeats)


@pytest.mark.parametrize('name', [
    'vesde', 'vpsde', pytest.param('subvpsde', marks=pytest.mark.slow),
    pytest.param('cosine', marks=pytest.mark.slow)])
def test_expected_bound_matches_its_closed_form(name):
  sde = SDES[name]
  x = GAUSSIAN.sample(jax.random.key(1), 6)
  _, terms = elbo.negative_elbo(jax.random.key(0), GAUSSIAN.score_fn(sde), sde, x, eps=EPS)
  expected = np.asarray(terms['decoder'] + terms['prior']) + _expected_diffusion(sde, x)
  mean, std_err = _repeated(GAUSSIAN.score_fn(sde), sde, x)
  assert np.all(np.abs(mean - expected) < 4.5 * std_err), (mean - expected, std_err)
  assert std_err.max() < 0.2  # the comparison above resolves ~0.5-1 nats


@pytest.mark.parametrize('name, tolerance', [('vesde', 5e-3), ('vpsde', 3e-4),
                                             ('subvpsde', 3e-4), ('cosine', 3e-4)])
def test_bound_is_tight_for_the_exact_score(name, tolerance):
  """With the exact score the expected bound is `-log p(x)` of the model (the data blurred by
  the decoder), which it may not undercut, and which tends to `-log p_0(x)` as eps -> 0."""
  sde = SDES[name]
  x = GAUSSIAN.sample(jax.random.key(2), 6)
  _, terms = elbo.negative_elbo(jax.random.key(0), GAUSSIAN.score_fn(sde), sde, x, eps=EPS)
  bound = np.asarray(terms['decoder'] + terms['prior']) + _expected_diffusion(sde, x)
  alpha, sigma = _kernel(sde, jnp.full((1,), EPS, jnp.float32))
  blurred = analytic.GaussianMixture.gaussian(
      jnp.array(MU), jnp.array(COV + 2.0 * (sigma[0] / alpha[0]) ** 2 * np.eye(2)))
  model_nll = -np.asarray(blurred.log_prob(x), np.float64)
  # 1e-4: the prior mismatch (the model starts from N(0, v I), not p_T) and the quadrature.
  assert np.all(bound - model_nll > -1e-4), bound - model_nll
  assert np.all(bound - model_nll < tolerance), bound - model_nll
  np.testing.assert_allclose(bound, -np.asarray(GAUSSIAN.log_prob(x)), atol=2.5 * tolerance)


@pytest.mark.parametrize('name', ['vesde', 'vpsde'])
def test_a_score_error_adds_its_closed_form(name):
  """`s = s* + d` raises the expected bound by `1/2 int g^2 E||d - sigma ...||^2`: per example
  `int g^2 (|d|^2 / 2 - alpha d^T A^-1 (x0 - mu)) dt`, whose data average is the weighted Fisher
  divergence `1/2 |d|^2 int g^2 dt`."""
  sde = SDES[name]
  shift = np.array([1.0, -0.6]) if name == 'vpsde' else np.array([0.08, -0.06])
  x = GAUSSIAN.sample(jax.random.key(3), 6)
  exact = GAUSSIAN.score_fn(sde)
  shifted = lambda y, t: exact(y, t) + jnp.asarray(shift, jnp.float32)
  added = _expected_diffusion(sde, x, shift) - _expected_diffusion(sde, x)
  t = np.geomspace(EPS, sde.T, 4001)
  g2 = np.asarray(sde.sde(jnp.zeros(t.size), jnp.asarray(t, jnp.float32))[1], np.float64) ** 2
  fisher = 0.5 * np.sum(shift**2) * np.trapezoid(g2 * t, np.log(t))
  many = GAUSSIAN.sample(jax.random.key(4), 2000)
  average = np.mean(_expected_diffusion(sde, many, shift, n=801) -
                    _expected_diffusion(sde, many, n=801))
  assert abs(average - fisher) < 0.05 * fisher  # the cross term averages out over the data
  # The estimator, with the same keys for both scores.
  difference = _estimates(shifted, sde, x) - _estimates(exact, sde, x)
  std_err = difference.std(0) / np.sqrt(REPEATS)
  assert np.all(np.abs(difference.mean(0) - added) < 4.5 * std_err), (difference.mean(0), added)
  assert np.all(std_err < fisher / 20)


def test_mixture_bound_matches_the_log_density():
  sde = SDES['vpsde']
  x = MIXTURE_8D.sample(jax.random.key(4), 6)
  mean, std_err = _repeated(MIXTURE_8D.score_fn(sde), sde, x)
  gap = mean + np.asarray(MIXTURE_8D.log_prob(x))
  assert np.all(np.abs(gap) < 4.5 * std_err + 2e-3), (gap, std_err)


def test_diffusion_term_is_the_likelihood_weighted_training_loss():
  """E[diffusion] = (T - eps) E[sde_loss] with likelihood (and importance) weighting."""
  sde = SDES['vpsde']
  x = MIXTURE_8D.sample(jax.random.key(5), 4)
  score_fn = lambda y, t: MIXTURE_8D.score_fn(sde)(y, t) * 0.9  # not the exact score
  keys = jax.random.split(jax.random.key(6), 200)
  diffusion = jax.vmap(lambda k: elbo.negative_elbo(k, score_fn, sde, x, num_times=8,
                                                    eps=EPS)[1]['diffusion'])(keys)
  loss = jax.vmap(lambda k: losses.sde_losses(
      score_fn, sde, x, losses.importance_times(sde, jax.random.uniform(k, (4,)), EPS),
      jax.random.normal(jax.random.fold_in(k, 1), x.shape), likelihood_weighting=True,
      importance_weighting=True, eps=EPS) * (sde.T - EPS))(keys)
  diffusion, loss = np.asarray(diffusion, np.float64), np.asarray(loss, np.float64)
  std_err = np.sqrt(diffusion.var(0) / len(keys) + loss.var(0) / len(keys))
  assert np.all(np.abs(diffusion.mean(0) - loss.mean(0)) < 4.5 * std_err)


def test_terms_determinism_and_standard_error():
  sde = SDES['subvpsde']
  x = MIXTURE_8D.sample(jax.random.key(8), 5)
  bound, terms = elbo.negative_elbo(jax.random.key(1), MIXTURE_8D.score_fn(sde), sde, x,
                                    num_times=64)
  again, _ = elbo.negative_elbo(jax.random.key(1), MIXTURE_8D.score_fn(sde), sde, x,
                                num_times=64)
  assert sorted(terms) == sorted(elbo.TERMS) and bound.shape == (5,)
  np.testing.assert_array_equal(bound, again)
  np.testing.assert_allclose(bound, terms['decoder'] + terms['prior'] + terms['diffusion'],
                             rtol=1e-6)


def test_bits_per_dim_follows_the_likelihood_protocol():
  """Dequantization, data scaling and offset are those of `likelihood.bits_per_dim`."""
  sde = SDES['vpsde']
  data = analytic.GaussianMixture.gaussian(jnp.zeros(12), 0.3, event_shape=(2, 2, 3))
  x = jnp.round(jnp.clip(data.sample(jax.random.key(9), 4) * 0.5 + 0.5, 0, 1) * 255) / 255
  key = jax.random.key(10)
  bpd = elbo.elbo_bits_per_dim(key, data.score_fn(sde), sde, x, centered=True, num_times=4)
  dequantize_key, bound_key = jax.random.split(jax.random.fold_in(key, 0))
  y = 2.0 * (255.0 * x + jax.random.uniform(dequantize_key, x.shape)) / 256.0 - 1.0
  bound, _ = elbo.negative_elbo(bound_key, data.score_fn(sde), sde, y, num_times=4)
  np.testing.assert_allclose(bpd, bound / (12 * np.log(2.0)) + 7.0, rtol=1e-6)
  two = elbo.elbo_bits_per_dim(key, data.score_fn(sde), sde, x, centered=True, num_times=4,
                               num_repeats=2)
  assert two.shape == (4,) and not np.allclose(two, bpd)


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_times=0), 'num_times must be'),
    (dict(eps=0.0), 'eps must be in (0, 1)'),
    (dict(eps=1.5), 'eps must be in (0, 1)'),
])
def test_bad_arguments_give_one_line_errors(kwargs, message):
  sde = SDES['vpsde']
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')) as info:
    elbo.negative_elbo(jax.random.key(0), GAUSSIAN.score_fn(sde), sde, jnp.zeros((2, 2)),
                       **kwargs)
  assert '\n' not in str(info.value)
