"""Few-step solvers: convergence orders against the exact probability-flow map, the DDIM
paper's update, sample laws, exact NFE, grids, and argument checks.

For data `N(mu, diag(v))` every SDE here has the marginal `N(alpha_t mu, alpha_t^2 v +
sigma_t^2)`, and the probability-flow ODE keeps each coordinate's standardised value
`(x_t - alpha_t mu) / sqrt(alpha_t^2 v + sigma_t^2)` constant. So the exact ODE solution
from any prior draw at `T` to `eps` is known in closed form, and a solver of order `p` must
show errors shrinking by ~`2^p` when its steps double.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import counted
from test_sampling import MIXTURE, N_SAMPLES, SDES, _assert_law

from scorejax import analytic, fast_solvers, sampling
from scorejax import sde as sde_lib

MEAN = jnp.array([1.0, -0.5])
VARIANCE = jnp.array([0.3, 0.05])
GAUSSIAN = analytic.GaussianMixture.diagonal([1.0], MEAN[None], VARIANCE[None])
EPS = 1e-3


def _exact_flow(sde, x_T, mean=MEAN, variance=VARIANCE):
  alpha_T, sigma_T = fast_solvers.kernel(sde, jnp.float32(sde.T))
  alpha, sigma = fast_solvers.kernel(sde, jnp.float32(EPS))
  scale = jnp.sqrt(alpha**2 * variance + sigma**2) / jnp.sqrt(alpha_T**2 * variance + sigma_T**2)
  return alpha * mean + scale * (x_T - alpha_T * mean)


def _error(sde, method, n_steps, time_grid='logsnr'):
  key = jax.random.key(0)
  x, _ = fast_solvers.fast_sample(key, GAUSSIAN.score_fn(sde), sde, (64, 2), method=method,
                                  n_steps=n_steps, time_grid=time_grid, eps=EPS)
  x_T = sde.prior_sampling(jax.random.split(key)[0], (64, 2))  # the sampler's prior draw
  return float(jnp.max(jnp.abs(x - _exact_flow(sde, x_T))))


# Step counts in each method's asymptotic range (measured rates: ddim 0.96-0.98,
# dpm_solver_2 2.02-2.10, dpm_solver_3 3.2-3.4, dpmpp_2m 1.9-2.0, dpmpp_3m 3.9-4.1; with
# its second-derivative term halved, 3M falls to 2.4-2.6, which fails here).
ORDER_CASES = [('ddim', 20), ('dpm_solver_2', 20), ('dpm_solver_3', 10), ('dpmpp_2m', 40),
               ('dpmpp_3m', 20)]


@pytest.mark.parametrize('method,n_steps', ORDER_CASES)
@pytest.mark.parametrize('name', ['vpsde', pytest.param('vesde', marks=pytest.mark.slow),
                                  pytest.param('subvpsde', marks=pytest.mark.slow)])
def test_solvers_converge_at_their_order(name, method, n_steps):
  sde = SDES[name]
  order = fast_solvers.FAST_METHODS[method].order
  coarse, fine = _error(sde, method, n_steps), _error(sde, method, 2 * n_steps)
  assert np.log2(coarse / fine) > order - 0.3, (coarse, fine)
  assert fine < 0.15  # of data std ~0.5: the limit is the exact map, not a plateau


def test_vesde_and_subvpsde_second_order_solvers_converge():
  # The default method on the other SDEs (the full matrix is marked slow).
  for name in ('vesde', 'subvpsde'):
    coarse, fine = _error(SDES[name], 'dpmpp_2m', 40), _error(SDES[name], 'dpmpp_2m', 80)
    assert np.log2(coarse / fine) > 1.7, (name, coarse, fine)


def test_ddim_is_the_ddim_paper_update():
  # DDIM (Song, Meng & Ermon 2021, Eq. 12 with eta = 0) written with abar_t = alpha_t^2:
  # x0 = (x - sqrt(1 - abar) e) / sqrt(abar), x' = sqrt(abar') x0 + sqrt(1 - abar') e.
  sde = SDES['vpsde']
  n_steps, shape = 8, (16, 2)
  score_fn = GAUSSIAN.score_fn(sde)
  samples, nfe = fast_solvers.fast_sample(jax.random.key(5), score_fn, sde, shape,
                                          method='ddim', n_steps=n_steps, time_grid='uniform')
  assert nfe == n_steps
  times = np.linspace(1.0, EPS, n_steps + 1)
  x = np.asarray(sde.prior_sampling(jax.random.split(jax.random.key(5))[0], shape), np.float64)
  abar = lambda t: np.exp(2.0 * float(sde.log_mean_coeff(jnp.float32(t))))
  for t, t_next in zip(times[:-1], times[1:], strict=True):
    score = np.asarray(score_fn(jnp.asarray(x, jnp.float32), jnp.full((shape[0],), t)))
    noise = -np.sqrt(1.0 - abar(t)) * score
    x0 = (x - np.sqrt(1.0 - abar(t)) * noise) / np.sqrt(abar(t))
    x = np.sqrt(abar(t_next)) * x0 + np.sqrt(1.0 - abar(t_next)) * noise
  np.testing.assert_allclose(samples, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name,method,time_grid', [
    ('vpsde', 'dpmpp_2m', 'logsnr'), ('vesde', 'dpm_solver_3', 'logsnr'),
    ('subvpsde', 'dpmpp_3m', 'quadratic'), ('vesde', 'dpmpp_2m', 'karras')])
def test_few_step_solvers_reproduce_mixture(name, method, time_grid):
  # 20 steps (dpm_solver_3: 10, i.e. 30 NFE): the law of the mixture (weights, means,
  # covariance) within the tolerances of the 1000-step samplers' tests.
  sde = SDES[name]
  n_steps = 10 if method == 'dpm_solver_3' else 20
  samples, nfe = fast_solvers.fast_sample(jax.random.key(2), MIXTURE.score_fn(sde), sde,
                                          (N_SAMPLES, 2), method=method, n_steps=n_steps,
                                          time_grid=time_grid)
  assert nfe == fast_solvers.fast_nfe(method, n_steps) <= 30
  assert np.all(np.isfinite(samples))
  _assert_law(samples, MIXTURE)


@pytest.mark.parametrize('method', ['dpmpp_3m', 'dpm_solver_3'])
def test_nfe_counts_every_score_evaluation(method):
  sde = SDES['vpsde']
  score_fn, calls = counted(GAUSSIAN.score_fn(sde))
  _, nfe = fast_solvers.fast_sample(jax.random.key(0), score_fn, sde, (4, 2), method=method,
                                    n_steps=5, denoise=True)
  jax.effects_barrier()
  assert nfe == len(calls) == (6 if method == 'dpmpp_3m' else 16)


def test_denoise_is_tweedie_at_eps():
  # For a point mass at MEAN the data prediction is exact: one denoising step lands on it.
  sde = SDES['vpsde']
  point = analytic.GaussianMixture.diagonal([1.0], MEAN[None], jnp.zeros((1, 2)))
  samples, _ = fast_solvers.fast_sample(jax.random.key(1), point.score_fn(sde), sde, (8, 2),
                                        method='ddim', n_steps=3, denoise=True)
  np.testing.assert_allclose(samples, np.broadcast_to(MEAN, (8, 2)), atol=1e-4)


@pytest.mark.parametrize('name', sorted(SDES))
def test_log_snr_grid_and_its_inverse(name):
  sde = SDES[name]
  times = fast_solvers.sampling_times(sde, 12, EPS, 'logsnr')
  assert times[0] == sde.T and times[-1] == np.float32(EPS)
  lams = np.asarray(fast_solvers.log_snr(sde, times), np.float64)
  np.testing.assert_allclose(np.diff(lams), np.full(12, (lams[-1] - lams[0]) / 12), rtol=1e-3)
  t = jnp.linspace(EPS, sde.T, 50)
  back = fast_solvers.time_of_log_snr(sde, fast_solvers.log_snr(sde, t), EPS, sde.T)
  np.testing.assert_allclose(back, t, rtol=1e-4, atol=1e-6)
  for kind in ('uniform', 'quadratic', 'karras'):
    grid = np.asarray(fast_solvers.sampling_times(sde, 7, EPS, kind))
    assert grid.shape == (8,) and np.all(np.diff(grid) < 0)
    np.testing.assert_allclose(grid[[0, -1]], [sde.T, EPS], rtol=1e-6)
  # Karras et al. 2022, Eq. 5: sigma_i^(1/7) evenly spaced, sigma = sigma_t / alpha_t.
  karras = fast_solvers.sampling_times(sde, 12, EPS, 'karras')
  roots = np.exp(-np.asarray(fast_solvers.log_snr(sde, karras), np.float64) / 7)
  np.testing.assert_allclose(np.diff(roots), np.full(12, (roots[-1] - roots[0]) / 12),
                             rtol=2e-3)


def check_builder(make_sampler, sample, nfe, **kwargs):
  """`make_sampler(builder, sde, shape, **kwargs)` is deterministic, equals
  `sample(key, score_fn, sde, shape, **kwargs)`, reports `nfe`, and traces its parameters (the
  mixture's means) instead of baking them in."""
  sde = SDES['vpsde']
  sample_fn = make_sampler(
      lambda means: dataclasses.replace(MIXTURE, means=means).score_fn(sde), sde, (32, 2),
      **kwargs)
  first, reported = sample_fn(jax.random.key(3), MIXTURE.means)
  again, _ = sample_fn(jax.random.key(3), MIXTURE.means)
  direct, _ = sample(jax.random.key(3), MIXTURE.score_fn(sde), sde, (32, 2), **kwargs)
  assert reported == nfe
  np.testing.assert_array_equal(first, again)
  np.testing.assert_allclose(first, direct, rtol=1e-5, atol=1e-5)
  moved, _ = sample_fn(jax.random.key(3), MIXTURE.means + 1.0)  # params are traced, not baked
  assert np.abs(np.asarray(moved) - np.asarray(first)).max() > 0.5


def test_builder_takes_params_and_is_deterministic():
  check_builder(fast_solvers.make_fast_sampler, fast_solvers.fast_sample, 6, method='dpmpp_2m',
                n_steps=6)


@pytest.mark.parametrize('kwargs, message', [
    (dict(method='dpm_solver_4'), "valid choices: ['ddim', 'dpm_solver_2', 'dpm_solver_3'"),
    (dict(time_grid='cosine'), "valid choices: ['karras', 'logsnr', 'quadratic', 'uniform']"),
    (dict(n_steps=0), 'n_steps must be'),
    (dict(eps=1.5), 'eps must be in (0, 1)'),
])
def test_arguments_are_checked_before_tracing(kwargs, message):
  sde = SDES['vpsde']
  for call in (lambda: fast_solvers.fast_sample(jax.random.key(0), lambda x, t: -x, sde,
                                                (2, 2), **kwargs),
               lambda: fast_solvers.make_fast_sampler(lambda p: (lambda x, t: -x), sde, (2, 2),
                                                      **kwargs)):
    with pytest.raises(ValueError) as error:
      call()
    assert message in str(error.value) and '\n' not in str(error.value)
  with pytest.raises(TypeError, match='unknown keyword arguments'):
    fast_solvers.make_fast_sampler(lambda p: (lambda x, t: -x), sde, (2, 2), order=2)


def test_a_score_of_the_wrong_shape_is_named():
  with pytest.raises(ValueError, match=r'must return the shape of x \(4, 2\), got \(2,\)'):
    fast_solvers.fast_sample(jax.random.key(0), lambda x, t: jnp.mean(x, 0), SDES['vesde'],
                             (4, 2))


def test_multistep_solvers_beat_ddim_and_ten_times_the_euler_steps():
  # What the solvers are for: at 20 NFE, DPM-Solver++(2M) is far closer to the exact ODE
  # map than DDIM (measured 8.6x), and (3M) closer than the ODE sampler's Euler at 200 NFE
  # (measured 2.5x).
  sde = sde_lib.VPSDE()
  assert _error(sde, 'dpmpp_2m', 20) < 0.2 * _error(sde, 'ddim', 20)
  key = jax.random.key(0)
  euler, nfe = sampling.ode_sample(key, GAUSSIAN.score_fn(sde), sde, (64, 2), method='euler',
                                   n_steps=200, eps=EPS)
  x_T = sde.prior_sampling(jax.random.split(key)[0], (64, 2))  # the same draw as _error's
  euler_error = float(jnp.max(jnp.abs(euler - _exact_flow(sde, x_T))))
  assert int(nfe) == 200 and _error(sde, 'dpmpp_3m', 20) < 0.6 * euler_error


def test_samples_converge_to_the_ode_samplers_for_the_same_key():
  # Same prior draw as `ode_sample`: the few-step solution approaches the adaptive one,
  # sample by sample, on the mixture (whose exact flow has no closed form).
  sde = SDES['vpsde']
  key = jax.random.key(9)
  reference, _ = sampling.ode_sample(key, MIXTURE.score_fn(sde), sde, (256, 2), method='rk45',
                                     rtol=1e-6, atol=1e-6)
  def rms_error(n_steps):
    samples, _ = fast_solvers.fast_sample(key, MIXTURE.score_fn(sde), sde, (256, 2),
                                          method='dpmpp_3m', n_steps=n_steps)
    return float(jnp.sqrt(jnp.mean(jnp.square(samples - reference))))

  # Measured: 0.030 at 20 steps, 0.0011 at 80 (the data std is ~3).
  coarse, fine = rms_error(20), rms_error(80)
  assert fine < 3e-3 and fine < coarse / 10, (coarse, fine)


def test_images_nhwc_follow_the_exact_flow():
  # The same closed form on `[B, 4, 4, 3]` images (per-pixel means and variances).
  sde = SDES['vesde']
  mean = jnp.linspace(-1.0, 1.0, 48)
  variance = jnp.linspace(0.05, 0.5, 48)
  images = analytic.GaussianMixture.diagonal([1.0], mean[None], variance[None], (4, 4, 3))
  key = jax.random.key(4)
  samples, _ = fast_solvers.fast_sample(key, images.score_fn(sde), sde, (3, 4, 4, 3),
                                        method='dpmpp_3m', n_steps=40)
  x_T = sde.prior_sampling(jax.random.split(key)[0], (3, 4, 4, 3)).reshape(3, 48)
  exact = _exact_flow(sde, x_T, mean, variance)
  assert samples.shape == (3, 4, 4, 3)
  np.testing.assert_allclose(samples.reshape(3, 48), exact, atol=2e-3)
