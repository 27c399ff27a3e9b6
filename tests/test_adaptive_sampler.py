"""Adaptive reverse-SDE sampler (Jolicoeur-Martineau et al. 2021, Algorithm 1, with one
Brownian path per sample): one attempted step against the paper's formulas in float64, exact
NFE, the controller, per-sample keys and step counts, strong convergence, the data law in 2-D
and 64-D, and argument checks.

The 2-D laws are the point of the Brownian paths: with a fresh draw per attempt (the paper) a
rejection selects the noise, and on N(0.5, 0.25 I) the sample variance was 0.40-0.57 at D = 2
(0.253-0.256 at D = 64) at the default tolerances, tighter ones no better (measured before the
change; `scorejax.adaptive_sampler`, "Noise").
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import counted
from test_sampling import MIXTURE, SDES, _assert_law

from scorejax import adaptive_sampler, analytic
from scorejax import sde as sde_lib

EPS = 1e-3
EVENT = (8, 8, 1)
D = 64
_A = np.asarray(jax.random.normal(jax.random.key(11), (D, D))) / np.sqrt(D)
# A correlated Gaussian (covariance eigenvalues 0.05-1.9) and three components >= 10 apart.
GAUSSIAN_64 = analytic.GaussianMixture.gaussian(
    0.3 * jax.random.normal(jax.random.key(12), (D,)), 0.5 * _A @ _A.T + 0.05 * np.eye(D), EVENT)
MIXTURE_64 = analytic.GaussianMixture.diagonal(
    [0.5, 0.3, 0.2], jax.random.normal(jax.random.key(13), (3, D)), 0.25, EVENT)
N_LAW = 2000


def _isotropic(dim, event_shape=None):
  """N(0.5, 0.25 I) in `dim` dimensions."""
  return analytic.GaussianMixture.diagonal([1.0], jnp.full((1, dim), 0.5), 0.25, event_shape)


def _paper_step(x, x_prev, t, h, z, rtol, atol, safety, exponent):
  """Algorithm 1's attempt on VP (beta_min 0.1, beta_max 20) with the score `-x` (N(0, I)
  data), float64: f = -beta x / 2, g^2 = beta, so the reverse drift f - g^2 s is beta x / 2."""
  if t <= EPS:
    return x, x_prev, t, 0.0, False
  beta = lambda t: 0.1 + 19.9 * t
  t_next = EPS if h >= t - EPS else t - h
  x_euler = x - h * beta(t) * x / 2 + np.sqrt(h * beta(t)) * z
  x_tilde = x - h * beta(t_next) * x_euler / 2 + np.sqrt(h * beta(t_next)) * z
  x_heun = (x_euler + x_tilde) / 2
  delta = np.maximum(atol, rtol * np.maximum(np.abs(x_euler), np.abs(x_prev)))
  error = np.sqrt(np.mean(((x_euler - x_heun) / delta) ** 2))
  accepted = error <= 1
  if accepted:
    x, x_prev, t = x_heun, x_euler, t_next
  h_next = min(t - EPS, safety * h * error ** -exponent) if t > EPS else 0.0
  return x, x_prev, t, h_next, accepted


def test_one_attempt_is_the_papers_step_and_controller():
  rng = np.random.default_rng(0)
  x, z = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  x_prev = x.copy()
  x_prev[0] = [10.0, -10.0, 10.0]  # the tolerance is set by |x'_prev| here
  t = np.array([0.6, 0.9, EPS, 0.02, 0.02])
  # accepted; rejected; done; accepted with the next step capped at t - eps; the last step.
  h = np.array([0.05, 0.3, 0.01, 0.015, 0.02 - EPS])
  options = dict(rtol=0.05, atol=0.0078, safety=0.9, exponent=0.9)
  expected = [_paper_step(*row, **options) for row in zip(x, x_prev, t, h, z, strict=True)]
  assert [e[4] for e in expected] == [True, False, False, True, True]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  out = adaptive_sampler.adaptive_update(f32(x), f32(x_prev), f32(t), f32(h), f32(z),
                                         lambda x, t: -x, SDES['vpsde'], eps=EPS, **options)
  for k, name in enumerate(['x', 'x_prev', 't', 'h', 'accepted']):
    want = np.array([e[k] for e in expected])
    np.testing.assert_allclose(out[k], want, rtol=2e-5, atol=1e-6, err_msg=name)
  assert out[2][4] == np.float32(EPS) and out[3][4] == 0.0  # lands on eps exactly, then stops
  assert out[3][1] < h[1] and out[3][0] > h[0]  # shrinks after the rejection, grows after E < 1


@pytest.mark.parametrize('name,denoise', [
    ('vesde', True), ('cosinevpsde', False),  # VP and sub-VP: the law tests
    pytest.param('vpsde', False, marks=pytest.mark.slow),
    pytest.param('subvpsde', True, marks=pytest.mark.slow)])
def test_nfe_counts_every_score_evaluation(name, denoise):
  # Image-shaped samples. Two evaluations per loop iteration, rejected attempts and finished
  # samples included, as a host-side counter sees them.
  sde = sde_lib.make_sde(name)
  score_fn, calls = counted(_isotropic(D, EVENT).score_fn(sde))
  samples, nfe, stats = adaptive_sampler.adaptive_sample_with_stats(
      jax.random.key(0), score_fn, sde, (16,) + EVENT, denoise=denoise)
  jax.effects_barrier()
  attempts = np.asarray(stats.accepted + stats.rejected)
  assert int(nfe) == len(calls) == 2 * int(stats.iterations) + denoise
  assert attempts.max() == stats.iterations and np.all(np.asarray(stats.accepted) > 0)
  assert samples.shape == (16,) + EVENT and np.all(np.isfinite(samples))


def test_one_step_when_h_init_spans_the_interval():
  # h_init is clipped to T - eps, and with a huge atol the first attempt is accepted: one
  # improved-Euler step from the prior draw (split(key)[0], as ode_sample's) with the
  # documented noise: sample b's Brownian path, a diffrax.VirtualBrownianTree on [eps, T]
  # with the key fold_in(split(key)[1], b), over the whole interval.
  import diffrax

  sde, shape, key = SDES['vpsde'], (6, 2), jax.random.key(4)
  score_fn = MIXTURE.score_fn(sde)
  samples, nfe = adaptive_sampler.adaptive_sample(key, score_fn, sde, shape, h_init=5.0,
                                                  atol=1e6, denoise=False)
  prior_key, noise_key = jax.random.split(key)
  x_T = sde.prior_sampling(prior_key, shape)
  tolerance = 2.0**-20 * (sde.T - EPS)
  z = jnp.stack([diffrax.VirtualBrownianTree(
      EPS, sde.T, tolerance, shape[1:], jax.random.fold_in(noise_key, b)).evaluate(EPS, sde.T)
                 for b in range(shape[0])]) / np.sqrt(sde.T - EPS)
  assert abs(float(jnp.std(z)) - 1.0) < 0.5  # a standard normal draw, as the step wants
  t = jnp.full((shape[0],), sde.T)
  update = jax.jit(adaptive_sampler.adaptive_update, static_argnames=('score_fn',))
  expected = update(x_T, x_T, t, t - EPS, z, score_fn, sde, rtol=0.05, atol=1e6, safety=0.9,
                    exponent=0.9, eps=EPS)
  assert int(nfe) == 2 and np.all(np.asarray(expected[4]))
  np.testing.assert_allclose(samples, expected[0], rtol=1e-5, atol=1e-5)


def test_nfe_falls_as_the_tolerances_loosen():
  sde = SDES['vpsde']
  score_fn = _isotropic(D).score_fn(sde)  # one closure, one compilation: tolerances are traced
  run = lambda **tol: int(adaptive_sampler.adaptive_sample(jax.random.key(1), score_fn, sde,
                                                           (32, D), **tol)[1])
  by_rtol = [run(rtol=rtol) for rtol in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)]
  by_atol = [run(rtol=0.0, atol=atol) for atol in (0.005, 0.01, 0.02, 0.05, 0.1)]
  assert np.all(np.diff(by_rtol) < 0) and np.all(np.diff(by_atol) < 0), (by_rtol, by_atol)


@pytest.mark.parametrize('name', [pytest.param('vesde', marks=pytest.mark.slow), 'vpsde'])
def test_samples_converge_along_their_brownian_paths(name):
  """Strong convergence: the same key gives the same Brownian paths at every tolerance, so the
  samples converge to the paths' exact solutions as the tolerances shrink (a fresh draw per
  attempt would give other samples at each tolerance)."""
  sde = SDES[name]
  score_fn = MIXTURE.score_fn(sde)  # one compilation: the tolerances are traced
  run = lambda rtol: np.asarray(adaptive_sampler.adaptive_sample(
      jax.random.key(2), score_fn, sde, (64, 2), rtol=rtol, atol=rtol / 10)[0], np.float64)
  reference = run(1e-3)
  # The median over samples: a few samples near the boundary between two components end in
  # the other one at a loose tolerance. Measured (reference 5e-4): medians 0.073, 0.029,
  # 0.011, 0.005 (VE) and 0.059, 0.025, 0.011, 0.006 (VP) at rtol 0.2, 0.05, 0.0125, 0.003.
  errors = [np.median(np.sqrt(np.mean((run(rtol) - reference) ** 2, axis=-1)))
            for rtol in (0.2, 0.05, 0.0125)]
  assert errors[0] > 1.5 * errors[1] > 2.25 * errors[2], errors


@pytest.mark.parametrize('name,data', [
    ('vesde', 'mixture_2d'), ('vpsde', 'mixture_2d'),
    pytest.param('subvpsde', 'mixture_2d', marks=pytest.mark.slow),
    pytest.param('subvpsde', 'gaussian_64', marks=pytest.mark.slow),
    pytest.param('vesde', 'gaussian_64', marks=pytest.mark.slow),
    pytest.param('vpsde', 'mixture_64', marks=pytest.mark.slow)])
def test_samples_follow_the_data_law(name, data):
  # Default tolerances: mean, full covariance and (mixture) weights within _assert_law's k = 4
  # standard errors of 2000 samples plus its 3% bias budget; the 64-D mixture's component
  # means within 4 standard errors sqrt(0.25 / n_k) plus the same budget.
  sde = SDES[name]
  law = {'mixture_2d': MIXTURE, 'gaussian_64': GAUSSIAN_64, 'mixture_64': MIXTURE_64}[data]
  shape = (N_LAW,) + (law.event_shape or (law.dim,))
  samples, nfe = adaptive_sampler.adaptive_sample(jax.random.key(2), law.score_fn(sde), sde,
                                                  shape)
  samples = np.asarray(samples, np.float64).reshape(N_LAW, -1)
  assert np.all(np.isfinite(samples)) and int(nfe) < 600
  _assert_law(samples, law)
  if data == 'mixture_64':
    means = np.asarray(law.means)
    nearest = np.argmin(((samples[:, None] - means[None]) ** 2).sum(-1), axis=1)
    for k, mean in enumerate(means):
      members = samples[nearest == k]
      np.testing.assert_array_less(np.abs(members.mean(0) - mean),
                                   4 * np.sqrt(0.25 / len(members)) + 0.03 * 0.5)


def test_samples_do_not_depend_on_the_rest_of_the_batch():
  # Per-sample times, steps and noise keys: the first 4 of a batch of 8 are a batch of 4 (the
  # prior draw too, under JAX's default jax_threefry_partitionable).
  sde = SDES['vesde']
  score_fn = MIXTURE.score_fn(sde)
  sample = lambda key, n: adaptive_sampler.adaptive_sample_with_stats(key, score_fn, sde, (n, 2))
  eight, nfe_8, stats_8 = sample(jax.random.key(5), 8)
  four, nfe_4, stats_4 = sample(jax.random.key(5), 4)
  again, _, _ = sample(jax.random.key(5), 8)
  other, _, _ = sample(jax.random.key(6), 8)
  np.testing.assert_array_equal(eight[:4], four)
  np.testing.assert_array_equal(stats_8.accepted[:4], stats_4.accepted)
  np.testing.assert_array_equal(stats_8.rejected[:4], stats_4.rejected)
  assert int(nfe_8) >= int(nfe_4)  # the batch runs until its slowest sample is done
  np.testing.assert_array_equal(eight, again)
  assert np.all(np.abs(np.asarray(eight) - np.asarray(other)).max(-1) > 1e-2)
  attempts = np.asarray(stats_8.accepted + stats_8.rejected)
  assert attempts.min() < attempts.max()  # the samples took steps of their own


def test_max_steps_leaves_the_unfinished_samples_nan():
  # A sample's trajectory does not depend on the budget: the samples that finish within it
  # equal the unlimited run's, the others are NaN.
  sde = SDES['vpsde']
  score_fn = MIXTURE.score_fn(sde)
  full, _, stats = adaptive_sampler.adaptive_sample_with_stats(jax.random.key(7), score_fn, sde,
                                                                (32, 2))
  attempts = np.asarray(stats.accepted + stats.rejected)
  budget = int(np.median(attempts))
  cut, nfe = adaptive_sampler.adaptive_sample(jax.random.key(7), score_fn, sde, (32, 2),
                                              max_steps=budget)
  finished = attempts <= budget
  assert 0 < finished.sum() < 32 and int(nfe) == 2 * budget + 1
  np.testing.assert_array_equal(np.asarray(cut)[finished], np.asarray(full)[finished])
  assert np.all(np.isnan(np.asarray(cut)[~finished]))


def test_builder_takes_params_and_is_deterministic():
  # test_fast_solvers.check_builder, with nfe an array.
  sde, kwargs = SDES['vpsde'], dict(rtol=0.1, max_steps=500)
  sample_fn = adaptive_sampler.make_adaptive_sampler(
      lambda means: dataclasses.replace(MIXTURE, means=means).score_fn(sde), sde, (32, 2),
      **kwargs)
  first, nfe = sample_fn(jax.random.key(3), MIXTURE.means)
  again, _ = sample_fn(jax.random.key(3), MIXTURE.means)
  # The direct call in the same program (the means as arguments, not constants: rounding
  # differences would change the adaptive steps).
  direct, direct_nfe = jax.jit(lambda means: adaptive_sampler.adaptive_sample(
      jax.random.key(3), dataclasses.replace(MIXTURE, means=means).score_fn(sde), sde, (32, 2),
      **kwargs))(MIXTURE.means)
  assert nfe.dtype == jnp.int32 and int(nfe) == int(direct_nfe)
  np.testing.assert_array_equal(first, again)
  np.testing.assert_allclose(first, direct, rtol=1e-6, atol=1e-6)
  moved, _ = sample_fn(jax.random.key(3), MIXTURE.means + 1.0)  # params are traced, not baked
  assert np.abs(np.asarray(moved) - np.asarray(first)).max() > 0.5


@pytest.mark.parametrize('kwargs, message', [
    (dict(rtol=-0.1), 'rtol must be in [0, inf)'),
    (dict(atol=-1.0), 'atol must be in [0, inf)'),
    (dict(rtol=0.0, atol=0.0), 'must not both be 0'),
    (dict(h_init=0.0), 'h_init must be in (0, inf)'),
    (dict(safety=0.0), 'safety must be in (0, 1]'),
    (dict(safety=1.5), 'safety must be in (0, 1]'),
    (dict(exponent=-0.9), 'exponent must be in (0, inf)'),
    (dict(eps=0.0), 'eps must be in (0, 1)'),
    (dict(eps=1.0), 'eps must be in (0, 1)'),
    (dict(max_steps=0), 'max_steps must be an integer >= 1'),
    (dict(max_steps=10.5), 'max_steps must be an integer >= 1'),
])
def test_arguments_are_checked_before_tracing(kwargs, message):
  sde = SDES['vpsde']
  for call in (lambda: adaptive_sampler.adaptive_sample(jax.random.key(0), lambda x, t: -x, sde,
                                                        (2, 2), **kwargs),
               lambda: adaptive_sampler.make_adaptive_sampler(lambda p: (lambda x, t: -x), sde,
                                                              (2, 2), **kwargs)):
    with pytest.raises(ValueError) as error:
      call()
    assert message in str(error.value) and '\n' not in str(error.value)
  with pytest.raises(TypeError, match='unknown keyword arguments'):
    adaptive_sampler.make_adaptive_sampler(lambda p: (lambda x, t: -x), sde, (2, 2), tol=0.1)
