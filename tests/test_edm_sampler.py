"""EDM sampler: Algorithm 2 of Karras et al. written independently in the noise level, second
order without churn, the data law with churn, exact NFE, and argument checks.

For Gaussian data `N(mu, v)` the data smoothed by noise of level `s` is `N(mu, v + s^2)`
whatever the SDE, so the paper's denoiser is `D(y; s) = y - s^2 (y - mu) / (v + s^2)`: the
reference below runs the paper's pseudocode on it in float64, with no SDE score, time or
kernel coefficient of the library, only the closed-form noise level of each SDE.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import counted
from test_fast_solvers import EPS, GAUSSIAN, MEAN, VARIANCE, _exact_flow, check_builder
from test_sampling import MIXTURE, N_SAMPLES, SDES, _assert_law

from scorejax import edm_sampler, fast_solvers, sampling


def _noise_level(name, t):
  """`s(t) = sigma_t / alpha_t` in closed form (EDM Table 1 for VP and VE)."""
  if name == 'vesde':
    return 0.01 * (50.0 / 0.01) ** t
  integral = 0.5 * 19.9 * t**2 + 0.1 * t  # int_0^t beta, beta_min = 0.1, beta_max = 20
  if name == 'vpsde':
    return math.sqrt(math.expm1(integral))
  alpha = math.exp(-0.5 * integral)  # sub-VP: sigma_t = 1 - alpha_t^2
  return (1.0 - alpha**2) / alpha


def _paper_algorithm(name, y0, n_steps, rho, s_churn, s_tmin, s_tmax, s_noise, noises):
  """Karras et al. 2022, Algorithm 2 in `y = x / alpha`, float64, ending with D(y_N; s_N)."""
  s_max, s_min = _noise_level(name, 1.0), _noise_level(name, EPS)
  i = np.arange(n_steps + 1)
  levels = (s_max ** (1 / rho) + i / n_steps * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
  mean, variance = np.asarray(MEAN, np.float64), np.asarray(VARIANCE, np.float64)
  denoise = lambda y, s: y - s**2 * (y - mean) / (variance + s**2)
  y = np.asarray(y0, np.float64)
  for k in range(n_steps):
    s, s_next = levels[k], levels[k + 1]
    gamma = min(s_churn / n_steps, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
    s_hat = min(s * (1 + gamma), levels[0])
    y_hat = y + math.sqrt(s_hat**2 - s**2) * s_noise * noises[k]
    d = (y_hat - denoise(y_hat, s_hat)) / s_hat
    y_euler = y_hat + (s_next - s_hat) * d
    d_next = (y_euler - denoise(y_euler, s_next)) / s_next
    y = y_hat + (s_next - s_hat) * (d + d_next) / 2
  return denoise(y, levels[-1])


@pytest.mark.parametrize('name', sorted(SDES))
@pytest.mark.parametrize('churn', [
    dict(s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0),
    dict(s_churn=10.0, s_tmin=0.05, s_tmax=20.0, s_noise=1.007),
    dict(s_churn=10.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0)])  # capped at s(T) first
def test_equals_the_papers_algorithm_in_the_noise_level(name, churn):
  sde, n_steps, rho, shape = SDES[name], 8, 7.0, (16, 2)
  key = jax.random.key(3)
  samples, nfe = edm_sampler.edm_sample(key, GAUSSIAN.score_fn(sde), sde, shape,
                                        n_steps=n_steps, rho=rho, eps=EPS, **churn)
  prior_key, churn_key = jax.random.split(key)
  alpha_T = float(fast_solvers.kernel(sde, jnp.float32(sde.T))[0])
  y0 = np.asarray(sde.prior_sampling(prior_key, shape), np.float64) / alpha_T
  noises = [np.asarray(jax.random.normal(jax.random.fold_in(churn_key, k), shape))
            for k in range(n_steps)]
  expected = _paper_algorithm(name, y0, n_steps, rho, noises=noises, **churn)
  assert nfe == 2 * n_steps + 1
  # float32 and times found by bisection against float64 closed forms; the data std is ~0.5.
  np.testing.assert_allclose(samples, expected, rtol=0, atol=2e-3)
  if churn['s_churn']:  # the churn changed the samples (levels 0.05-20 are on the grid)
    plain, _ = edm_sampler.edm_sample(key, GAUSSIAN.score_fn(sde), sde, shape,
                                      n_steps=n_steps, rho=rho, eps=EPS)
    assert np.abs(np.asarray(plain) - np.asarray(samples)).max() > 0.05


def _error(sde, n_steps):
  key = jax.random.key(0)
  x, _ = edm_sampler.edm_sample(key, GAUSSIAN.score_fn(sde), sde, (64, 2), n_steps=n_steps,
                                eps=EPS, denoise=False)
  x_T = sde.prior_sampling(jax.random.split(key)[0], (64, 2))  # the sampler's prior draw
  return float(jnp.max(jnp.abs(x - _exact_flow(sde, x_T))))


@pytest.mark.parametrize('name', ['vpsde', pytest.param('vesde', marks=pytest.mark.slow),
                                  pytest.param('subvpsde', marks=pytest.mark.slow)])
def test_deterministic_sampler_is_second_order(name):
  # Without churn it is Heun's method on the probability-flow ODE: the error to the exact
  # flow map falls ~4x when the steps double (measured on VP: rate 2.0 from 20 to 40 steps).
  sde = SDES[name]
  coarse, fine = _error(sde, 20), _error(sde, 40)
  assert np.log2(coarse / fine) > 1.7, (coarse, fine)
  assert fine < 0.05


def _rms_to_the_ode_solution(sample):
  """RMS distance of `sample(key, score_fn, sde, shape)` to a tight rk45 solve of the
  probability-flow ODE on the mixture (VP SDE) from the same prior draw."""
  sde, key, shape = SDES['vpsde'], jax.random.key(9), (256, 2)
  reference, _ = sampling.ode_sample(key, MIXTURE.score_fn(sde), sde, shape, method='rk45',
                                     rtol=1e-6, atol=1e-6)
  samples, _ = sample(key, MIXTURE.score_fn(sde), sde, shape)
  return float(jnp.sqrt(jnp.mean(jnp.square(samples - reference))))


def test_heun_beats_ddim_at_equal_nfe():
  # At 40 NFE: 20 Heun steps against DDIM's 40 on the same Karras grid kind (measured RMS
  # 0.029 and 0.110; at 20 NFE and below DDIM is as good or better, and DPM-Solver++(2M)
  # beats both: 0.011).
  heun = _rms_to_the_ode_solution(
      functools.partial(edm_sampler.edm_sample, n_steps=20, denoise=False))
  ddim = _rms_to_the_ode_solution(
      functools.partial(fast_solvers.fast_sample, method='ddim', n_steps=40, time_grid='karras'))
  assert heun < 0.5 * ddim, (heun, ddim)


@pytest.mark.parametrize('name,churn', [
    ('vpsde', dict(s_churn=40.0)),
    ('vesde', dict(s_churn=40.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.0)),
    ('subvpsde', dict(s_churn=0.0))])
def test_samples_follow_the_mixture_law(name, churn):
  # 25 steps (51 NFE): weights, means and covariance within the 1000-step samplers'
  # tolerances, with and without churn (with the exact score, churn keeps the marginals).
  sde = SDES[name]
  samples, nfe = edm_sampler.edm_sample(jax.random.key(2), MIXTURE.score_fn(sde), sde,
                                        (N_SAMPLES, 2), n_steps=25, **churn)
  assert nfe == 51 and np.all(np.isfinite(samples))
  _assert_law(samples, MIXTURE)


def test_nfe_counts_every_score_evaluation():
  sde = SDES['vpsde']
  score_fn, calls = counted(GAUSSIAN.score_fn(sde))
  for denoise in (True, False):
    calls.clear()
    _, nfe = edm_sampler.edm_sample(jax.random.key(0), score_fn, sde, (4, 2), n_steps=5,
                                    s_churn=5.0, denoise=denoise)
    jax.effects_barrier()
    assert nfe == len(calls) == 10 + denoise


def test_without_churn_the_samples_converge_to_the_ode_samplers_for_the_same_key():
  rms_error = lambda n_steps: _rms_to_the_ode_solution(
      functools.partial(edm_sampler.edm_sample, n_steps=n_steps, denoise=False))
  coarse, fine = rms_error(20), rms_error(80)
  assert fine < 1e-2 and fine < coarse / 8, (coarse, fine)


def test_builder_takes_params_and_is_deterministic():
  check_builder(edm_sampler.make_edm_sampler, edm_sampler.edm_sample, 13, n_steps=6,
                s_churn=10.0)


@pytest.mark.parametrize('kwargs, message', [
    (dict(n_steps=0), 'n_steps must be'),
    (dict(rho=0.0), 'rho must be in (0, inf)'),
    (dict(eps=1.5), 'eps must be in (0, 1)'),
    (dict(s_churn=-1.0), 's_churn must be in [0, inf)'),
    (dict(s_noise=-0.5), 's_noise must be in [0, inf)'),
    (dict(s_tmin=2.0, s_tmax=1.0), 's_tmax must be in [2, inf)'),
])
def test_arguments_are_checked_before_tracing(kwargs, message):
  sde = SDES['vpsde']
  for call in (lambda: edm_sampler.edm_sample(jax.random.key(0), lambda x, t: -x, sde, (2, 2),
                                              **kwargs),
               lambda: edm_sampler.make_edm_sampler(lambda p: (lambda x, t: -x), sde, (2, 2),
                                                    **kwargs)):
    with pytest.raises(ValueError) as error:
      call()
    assert message in str(error.value) and '\n' not in str(error.value)
  with pytest.raises(TypeError, match='unknown keyword arguments'):
    edm_sampler.make_edm_sampler(lambda p: (lambda x, t: -x), sde, (2, 2), churn=2)
