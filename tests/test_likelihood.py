"""Exact likelihood through the probability-flow ODE against closed-form log-densities.

With the exact score of a Gaussian (mixture), the probability-flow ODE maps p_eps onto p_T
exactly, so `delta_logp = log p_eps(x) - log p_T(z)` holds to the solver's accuracy. The model
log-likelihood `prior_logp(z) + delta_logp` then differs from `log p_eps(x)` only by the
prior mismatch `prior_logp(z) - log p_T(z)` (p_T is not exactly N(0, sigma_max^2) / N(0, I)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scorejax import analytic, likelihood
from scorejax import sde as sde_lib

SDES = {
    'vesde': sde_lib.VESDE(0.01, 50.0, 1000),
    'vpsde': sde_lib.VPSDE(0.1, 20.0, 1000),
    'subvpsde': sde_lib.SubVPSDE(0.1, 20.0, 1000),
}
EPS = 1e-5
GAUSSIAN = analytic.GaussianMixture.gaussian(
    jnp.array([1.0, -0.5]), jnp.array([[1.0, 0.6], [0.6, 0.5]]))
MIXTURE_8D = analytic.GaussianMixture.diagonal(
    [0.5, 0.3, 0.2], 3.0 * jax.random.normal(jax.random.key(7), (3, 8)), 0.25)


def _closed_form(data, sde, x, z):
  batch = x.shape[0]
  log_p_eps = data.log_prob(x, jnp.full((batch,), EPS), sde)
  log_p_T = data.log_prob(z, jnp.full((batch,), sde.T), sde)
  return np.asarray(log_p_eps), np.asarray(log_p_T)


def _check_exact(data, sde, batch=16):
  x = data.sample(jax.random.key(1), batch)
  logp, z, nfe = likelihood.log_likelihood(jax.random.key(2), data.score_fn(sde), sde, x,
                                           estimator='exact', eps=EPS)
  log_p_eps, log_p_T = _closed_form(data, sde, x, z)
  prior_logp = np.asarray(sde.prior_logp(z))
  delta_logp = np.asarray(logp) - prior_logp
  # The brief's bar: 1e-3 nats per dimension (tsit5, rtol = atol = 1e-5, float32).
  np.testing.assert_allclose(delta_logp, log_p_eps - log_p_T, atol=1e-3 * data.dim)
  mismatch = np.abs(prior_logp - log_p_T)
  np.testing.assert_array_less(np.abs(np.asarray(logp) - log_p_eps),
                               mismatch + 1e-3 * data.dim)
  assert int(nfe) > 7


@pytest.mark.parametrize('name', sorted(SDES))
def test_exact_trace_matches_gaussian_log_density(name):
  _check_exact(GAUSSIAN, SDES[name])


@pytest.mark.parametrize(
    'name', ['vpsde', pytest.param('vesde', marks=pytest.mark.slow),
             pytest.param('subvpsde', marks=pytest.mark.slow)])
def test_exact_trace_matches_8d_mixture_log_density(name):
  _check_exact(MIXTURE_8D, SDES[name])


def test_scipy_rk45_controller_matches_gaussian_log_density():
  # The in-graph scipy-RK45 solver, the one the benchmark compares with the reference.
  data, sde = GAUSSIAN, SDES['vpsde']
  x = data.sample(jax.random.key(1), 16)
  logp, z, nfe = likelihood.log_likelihood(jax.random.key(2), data.score_fn(sde), sde, x,
                                           estimator='exact', eps=EPS, method='rk45')
  log_p_eps, log_p_T = _closed_form(data, sde, x, z)
  delta_logp = np.asarray(logp) - np.asarray(sde.prior_logp(z))
  np.testing.assert_allclose(delta_logp, log_p_eps - log_p_T, atol=1e-3 * data.dim)
  assert (int(nfe) - 2) % 6 == 0


def test_image_shaped_data():
  # NHWC data, D = 16: the exact trace over all pixels, VP.
  data = analytic.GaussianMixture.gaussian(jnp.full((4, 4, 1), 0.3), 0.2)
  _check_exact(data, SDES['vpsde'], batch=4)


@pytest.mark.parametrize('estimator,jacobian_product',
                         [('rademacher', 'jvp'), ('gaussian', 'jvp'), ('rademacher', 'vjp')])
def test_hutchinson_is_unbiased_within_monte_carlo_error(estimator, jacobian_product):
  # Per-sample errors e_i = logp_i - log p_eps(x_i) - (prior mismatch) are independent (one
  # noise draw per sample) with mean = the solver error (<= 1e-3 D, checked above): their
  # batch mean must be within 4 standard errors (std(e) / sqrt(B)) of 0, plus that solver
  # budget. Their spread must be real (a Hutchinson estimate is not the exact trace).
  sde, data, batch = SDES['vpsde'], MIXTURE_8D, 64
  x = data.sample(jax.random.key(3), batch)
  logp, z, _ = likelihood.log_likelihood(jax.random.key(4), data.score_fn(sde), sde, x,
                                         estimator=estimator, eps=EPS,
                                         jacobian_product=jacobian_product)
  log_p_eps, log_p_T = _closed_form(data, sde, x, z)
  errors = np.asarray(logp) - np.asarray(sde.prior_logp(z)) - (log_p_eps - log_p_T)
  standard_error = errors.std(ddof=1) / np.sqrt(batch)
  assert abs(errors.mean()) < 4 * standard_error + 1e-3 * data.dim
  assert errors.std() > 0.1


@pytest.mark.parametrize('estimator', ['rademacher', 'exact'])
def test_auto_is_forward_mode_through_the_networks_conv2d(estimator):
  # The networks' conv2d (a primitive with loop-friendly transposes) has forward mode:
  # 'auto' takes the JVP (the same program as 'jvp') and agrees with the VJP.
  from scorejax.models.conv import conv2d

  data, sde = analytic.GaussianMixture.gaussian(jnp.full((4, 4, 1), 0.3), 0.2), SDES['vpsde']
  base = data.score_fn(sde)
  kernel = 0.1 * jax.random.normal(jax.random.key(0), (3, 3, 1, 1))
  score_fn = lambda x, t: base(x, t) + conv2d(jnp.tanh(x), kernel, (1, 1), ((1, 1), (1, 1)))
  x = data.sample(jax.random.key(1), 4)
  run = lambda product: likelihood.log_likelihood(
      jax.random.key(2), score_fn, sde, x, estimator=estimator, jacobian_product=product,
      method='rk45', rtol=1e-4, atol=1e-4)[0]
  auto = run('auto')
  np.testing.assert_array_equal(auto, run('jvp'))
  np.testing.assert_allclose(auto, run('vjp'), rtol=1e-5)


def test_unknown_estimator_and_method():
  score_fn = lambda x, t: -x
  with pytest.raises(ValueError, match='rademacher'):
    likelihood.log_likelihood(jax.random.key(0), score_fn, SDES['vpsde'], jnp.ones((2, 2)),
                              estimator='skilling')
  with pytest.raises(ValueError, match='tsit5'):
    likelihood.log_likelihood(jax.random.key(0), score_fn, SDES['vpsde'], jnp.ones((2, 2)),
                              method='rk4')


def test_bits_per_dim_offset_and_centering():
  # Data in [0, 1] space ~ N(m, S); the centered model space holds y = 2x - 1 ~ N(2m-1, 4S).
  # The same data must get the same bits/dim from both (offsets 8 and 7), and equal the
  # closed form -log2 p(x) / D + 8 (up to the solver and prior-mismatch errors, <0.01 bpd).
  sde = SDES['vpsde']
  mean, var = jnp.array([0.4, 0.6, 0.5, 0.45]), jnp.array([0.02, 0.03, 0.01, 0.05])
  data01 = analytic.GaussianMixture.gaussian(mean, var)
  centered = analytic.GaussianMixture.gaussian(2 * mean - 1, 4 * var)
  x = data01.sample(jax.random.key(5), 8)
  common = dict(dequantize=False, estimator='exact')
  bpd, _ = likelihood.bits_per_dim(jax.random.key(6), data01.score_fn(sde), sde, x, **common)
  bpd_c, _ = likelihood.bits_per_dim(jax.random.key(6), centered.score_fn(sde), sde, x,
                                     centered=True, **common)
  closed_form = -np.asarray(data01.log_prob(x)) / (4 * np.log(2)) + 8
  np.testing.assert_allclose(bpd, closed_form, atol=1e-2)
  np.testing.assert_allclose(bpd_c, bpd, atol=1e-2)


def test_bits_per_dim_dequantization_protocol():
  # score_sde: x = (255 x + u) / 256 with u ~ U[0, 1), then scale; repeats average fresh
  # noise drawn from fold_in(key, repeat).
  sde = sde_lib.VPSDE(N=100)
  data = analytic.GaussianMixture.gaussian(jnp.zeros((2, 2, 1)), 0.5)
  score_fn = data.score_fn(sde)
  pixels = jax.random.randint(jax.random.key(8), (3, 2, 2, 1), 0, 256) / 255.0
  key = jax.random.key(9)
  common = dict(estimator='exact', method='heun', rtol=1e-3, atol=1e-3)
  bpd, nfe = likelihood.bits_per_dim(key, score_fn, sde, pixels, centered=True,
                                     num_repeats=2, **common)
  expected = []
  for repeat in range(2):
    dequantize_key, likelihood_key = jax.random.split(jax.random.fold_in(key, repeat))
    u = jax.random.uniform(dequantize_key, pixels.shape)
    assert np.all(np.floor(255 * pixels + u) == np.round(255 * pixels))  # same 8-bit bin
    y = 2 * (255 * pixels + u) / 256 - 1
    logp, _, _ = likelihood.log_likelihood(likelihood_key, score_fn, sde, y, **common)
    expected.append(-np.asarray(logp) / (4 * np.log(2)) + 7)
  np.testing.assert_allclose(bpd, np.mean(expected, axis=0), rtol=1e-6)
  assert int(nfe) == 2 * 2 * sde.N


@pytest.mark.parametrize('kwargs, message', [
    (dict(eps=0.0), r'^eps must be in \(0, 1\)'),
    (dict(eps=1.0), r'^eps must be in \(0, 1\)'),
    (dict(rtol=0.0, atol=0.0), 'must not both be 0'),
    (dict(method='euler', n_steps=0), r'^n_steps must be an integer >= 1'),
])
def test_bad_numbers_raise_before_tracing(kwargs, message):
  score_fn = lambda x, t: -x
  with pytest.raises(ValueError, match=message):
    likelihood.log_likelihood(jax.random.key(0), score_fn, SDES['vpsde'], jnp.ones((2, 2)),
                              **kwargs)


def test_bits_per_dim_needs_a_repeat():
  with pytest.raises(ValueError, match=r'^num_repeats must be an integer >= 1'):
    likelihood.bits_per_dim(jax.random.key(0), lambda x, t: -x, SDES['vpsde'],
                            jnp.ones((2, 2)), num_repeats=0)
