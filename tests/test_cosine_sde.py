"""The cosine-schedule VP SDE: its schedule against iDDPM's closed form, and every sampler,
the likelihood and the discrete tables on it with the exact score of closed-form data.

The samplers, the likelihood and the losses treat `CosineVPSDE` through the generic
`VariancePreservingSDE` interface, so the laws checked here are those of
`test_sampling` / `test_likelihood` / `test_fast_solvers`, on this schedule.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fast_solvers import _error
from test_likelihood import GAUSSIAN as GAUSSIAN_2D
from test_likelihood import _check_exact
from test_sampling import GAUSSIAN, MIXTURE, N_SAMPLES, _assert_law

from scorejax import fast_solvers, losses, predictors, sampling
from scorejax import sde as sde_lib
from scorejax.models import make_score_fn

SDE = sde_lib.CosineVPSDE()


def _iddpm_alpha_bar(t, s=0.008):
  """Nichol & Dhariwal (2021) Eq. (17), continuous in t in [0, 1], float64."""
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  return f(np.asarray(t, np.float64)) / f(0.0)


def _alpha_bar(sde, t):
  mean, _ = sde.marginal_prob(jnp.ones((len(t), 1)), jnp.asarray(t, jnp.float32))
  return np.asarray(mean[:, 0], np.float64) ** 2


def test_schedule_is_iddpm_cosine_on_rescaled_time():
  t = np.linspace(0.0, 1.0, 101)
  scale = (SDE.phi_T - SDE.phi_0) / (np.pi / 2 - SDE.phi_0)
  np.testing.assert_allclose(_alpha_bar(SDE, t), _iddpm_alpha_bar(scale * t),
                             rtol=1e-4, atol=1e-7)
  assert 0.99 < scale < 1.0
  alpha_bar_T = _alpha_bar(SDE, [1.0])[0]
  np.testing.assert_allclose(np.log(alpha_bar_T / (1 - alpha_bar_T)), SDE.logsnr_min, atol=1e-3)


@pytest.mark.parametrize('logsnr_min', [-10.0, -20.0])
def test_beta_is_the_log_mean_derivative_and_the_kernel_is_variance_preserving(logsnr_min):
  sde = sde_lib.CosineVPSDE(logsnr_min=logsnr_min)
  t = jnp.linspace(0.0, 1.0, 41)
  d_log_alpha = jax.vmap(jax.grad(sde.log_mean_coeff))(t)
  # Near T at -20, alpha^2 ~ 2e-9: the float32 derivative of log1p(u) at 1 + u ~ 5e-5 keeps
  # ~4 digits.
  np.testing.assert_allclose(sde.beta(t), -2.0 * d_log_alpha, rtol=1e-3)
  mean, std = sde.marginal_prob(jnp.ones((41, 1)), t)
  np.testing.assert_allclose(mean[:, 0] ** 2 + std**2, 1.0, atol=1e-6)
  assert float(std[0]) == 0.0 and float(mean[0, 0]) == 1.0


@pytest.mark.parametrize('t', [1e-6, 1e-5, 1e-3])
def test_small_time_std_keeps_its_precision(t):
  # The likelihood starts at eps = 1e-5; log(cos) differences lose std there in float32.
  _, std = SDE.marginal_prob(jnp.ones((1, 1)), jnp.array([t], jnp.float32))
  d = (SDE.phi_T - SDE.phi_0) * t
  exact = np.sqrt(1.0 - (np.cos(SDE.phi_0 + d) / np.cos(SDE.phi_0)) ** 2)
  np.testing.assert_allclose(float(std[0]), exact, rtol=1e-4)


def test_discrete_chain_is_iddpm_construction():
  betas = SDE.discrete_betas
  assert betas.shape == (SDE.N,) and np.all(betas > 0) and np.all(betas < 1)
  # The chain's cumulative alphas are the continuous schedule at t_{i+1} = (i + 1) / N.
  grid = np.arange(1, SDE.N + 1) / SDE.N
  np.testing.assert_allclose(SDE.alphas_cumprod, _alpha_bar(SDE, grid), rtol=2e-3, atol=1e-7)
  # Far out (log-SNR -20 at T) the schedule is iDDPM's up to the last steps (time rescaled by
  # 3e-5), and so is its table, clipped at the end as iDDPM's.
  far = sde_lib.CosineVPSDE(logsnr_min=-20.0)
  steps = np.arange(SDE.N + 1) / SDE.N
  alpha_bar = _iddpm_alpha_bar(steps)
  iddpm = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], sde_lib.MAX_DISCRETE_BETA)
  np.testing.assert_allclose(far.discrete_betas[:990], iddpm[:990], rtol=3e-3)
  np.testing.assert_allclose(far.discrete_betas, iddpm, rtol=1e-2)
  assert iddpm[-1] == sde_lib.MAX_DISCRETE_BETA
  assert far.discrete_betas[-1] == np.float32(sde_lib.MAX_DISCRETE_BETA)


@pytest.mark.parametrize('field, value, message', [
    ('s', -0.1, 'CosineVPSDE.s'), ('logsnr_min', 0.0, 'CosineVPSDE.logsnr_min'),
    ('logsnr_min', -25.0, 'CosineVPSDE.logsnr_min'),
    ('logsnr_min', float('nan'), 'CosineVPSDE.logsnr_min'), ('N', 0, 'CosineVPSDE.N')])
def test_bad_fields_are_named(field, value, message):
  with pytest.raises(ValueError, match=message):
    sde_lib.CosineVPSDE(**{field: value})


def test_make_sde_builds_it_by_name():
  sde = sde_lib.make_sde('CosineVPSDE', cosine_s=0.01, logsnr_min=-12.0, num_scales=500)
  assert sde == sde_lib.CosineVPSDE(s=0.01, logsnr_min=-12.0, N=500)
  assert isinstance(sde, sde_lib.VariancePreservingSDE)


@pytest.mark.parametrize('predictor, corrector, data, n_steps', [
    ('reverse_diffusion', 'langevin', MIXTURE, 500),
    ('ancestral_sampling', 'none', GAUSSIAN, None),
    ('euler_maruyama', 'none', GAUSSIAN, None),
])
def test_pc_sampler_reproduces_the_law(predictor, corrector, data, n_steps):
  samples, nfe = sampling.pc_sample(jax.random.key(1), data.score_fn(SDE), SDE,
                                    (N_SAMPLES, data.dim), predictor=predictor,
                                    corrector=corrector, n_steps=n_steps)
  assert nfe == (n_steps or SDE.N) * (1 + (corrector != 'none'))
  _assert_law(samples, data)


def test_ode_and_fast_samplers_reproduce_the_mixture():
  samples, _ = sampling.ode_sample(jax.random.key(2), MIXTURE.score_fn(SDE), SDE,
                                   (N_SAMPLES, 2))
  _assert_law(samples, MIXTURE)
  samples, nfe = fast_solvers.fast_sample(jax.random.key(3), MIXTURE.score_fn(SDE), SDE,
                                          (N_SAMPLES, 2), method='dpmpp_2m', n_steps=30)
  assert int(nfe) == 30
  _assert_law(samples, MIXTURE)


def test_second_order_solver_converges_at_its_order():
  coarse, fine = _error(SDE, 'dpmpp_2m', 40), _error(SDE, 'dpmpp_2m', 80)
  assert np.log2(coarse / fine) > 1.7, (coarse, fine)


def test_exact_trace_likelihood_matches_the_log_density():
  _check_exact(GAUSSIAN_2D, SDE)


def test_langevin_corrector_uses_the_cosine_chain_alphas():
  x = jax.random.normal(jax.random.key(0), (4, 3))
  z = jax.random.normal(jax.random.key(1), (4, 3))
  t = jnp.array([0.999, 0.5, 0.1, 0.01])
  got = predictors.langevin_update(x, t, z, lambda x, t: -x, SDE, 0.16)[1]
  alpha = SDE.alphas[(np.asarray(t) * (SDE.N - 1)).astype(int)]
  step = 2 * (0.16 * np.mean(np.linalg.norm(z, axis=1)) / np.mean(np.linalg.norm(x, axis=1)))**2
  np.testing.assert_allclose(got, x - (step * alpha)[:, None] * x, rtol=1e-5)
  assert alpha[0] < 0.8  # the last cosine steps are large (linear VP: 0.98)


def test_discrete_ddpm_loss_of_the_exact_noise_predictor():
  # Data N(0, c^2 I): x_i = a x0 + s z, and E[z | x_i] = s x_i / (a^2 c^2 + s^2) leaves
  # a^2 c^2 / (a^2 c^2 + s^2) of variance per dimension; the DDPM loss (half the sum over
  # the 4 dims, as the reference) averages 2 of that over the uniformly drawn steps.
  c, dim, n = 0.7, 4, 20000
  a = SDE.sqrt_alphas_cumprod.astype(np.float64)
  s = SDE.sqrt_1m_alphas_cumprod.astype(np.float64)
  expected = 0.5 * dim * np.mean(a**2 * c**2 / (a**2 * c**2 + s**2))

  def model_fn(x, labels):  # integer steps, or the score convention's float t (N - 1)
    labels = labels.astype(jnp.int32)
    a_i, s_i = jnp.asarray(a, jnp.float32)[labels], jnp.asarray(s, jnp.float32)[labels]
    return (s_i / (a_i**2 * c**2 + s_i**2))[:, None] * x

  batch = c * jax.random.normal(jax.random.key(0), (n, dim))
  loss, _ = losses.ddpm_loss(jax.random.key(1), model_fn, SDE, batch)
  # Per-example losses: half a sum of 4 squared normals of variance <= 1, std <= sqrt(2 dim)
  # / 2; 5 standard errors.
  assert abs(float(loss) - expected) < 2.5 * np.sqrt(2 * dim / n), (float(loss), expected)
  # The discrete score convention reads the same table: score = -model / sqrt(1 - abar_i).
  x = jnp.ones((2, dim))
  t = jnp.array([0.3, 0.9])
  score = make_score_fn(model_fn, SDE, continuous=False)(x, t)
  i = (np.asarray(t) * (SDE.N - 1)).astype(int)
  np.testing.assert_allclose(score, -(1 / (a[i] ** 2 * c**2 + s[i] ** 2))[:, None] * x,
                             rtol=1e-5)


def test_traced_as_a_static_pytree():
  fn = jax.jit(lambda sde, x, t: sde.marginal_prob(x, t)[1])
  std = fn(SDE, jnp.ones((2, 1)), jnp.array([0.5, 1.0]))
  np.testing.assert_allclose(std, SDE.marginal_prob(jnp.ones((2, 1)), jnp.array([0.5, 1.0]))[1])
  assert dataclasses.replace(SDE, N=10).discrete_betas.shape == (10,)
