"""SDEs against the reference's golden values and against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nchw_to_nhwc

from scorejax import sde as sde_lib

SDES = {
    'vesde': sde_lib.VESDE(0.01, 50.0, 1000),
    'vpsde': sde_lib.VPSDE(0.1, 20.0, 1000),
    'subvpsde': sde_lib.SubVPSDE(0.1, 20.0, 1000),
}


def _close(actual, golden, rtol=1e-5, atol=1e-6):
  actual = np.asarray(actual)
  golden = np.asarray(golden)
  if golden.ndim == 4:
    golden = nchw_to_nhwc(golden)
  scale = max(np.max(np.abs(golden)), 1e-12)
  np.testing.assert_allclose(actual, np.broadcast_to(golden, actual.shape), rtol=rtol,
                             atol=atol + 1e-5 * scale)


def _analytic_score(sde):
  def score_fn(x, t):
    std = sde.marginal_prob(jnp.zeros_like(x), t)[1]
    return -sde_lib.batch_mul(1.0 / (1.0 + std**2), x)
  return score_fn


@pytest.mark.parametrize('name', sorted(SDES))
def test_forward_quantities_match_golden(name, sde_golden):
  sde = SDES[name]
  g = {k[len(name) + 1:]: v for k, v in sde_golden.items() if k.startswith(name + '.')}
  x = jnp.asarray(nchw_to_nhwc(sde_golden['x']))
  z = jnp.asarray(nchw_to_nhwc(sde_golden['z_prior']))
  t = jnp.asarray(sde_golden['t'])
  drift, diffusion = jax.jit(sde.sde)(x, t)
  _close(drift, g['sde.drift'])
  # subVP's diffusion at t=1e-5 carries ~1e-2 float32 error in the reference (README §8).
  _close(diffusion, g['sde.diffusion'], atol=2e-4)
  mean, std = jax.jit(sde.marginal_prob)(x, t)
  _close(mean, g['marginal_prob.mean'])
  _close(std, g['marginal_prob.std'], atol=1e-4)
  _close(sde.prior_logp(z), g['prior_logp'])
  f, G = jax.jit(sde.discretize)(x, t)
  _close(f, g['discretize.f'])
  _close(G, g['discretize.G'], atol=1e-4)
  _close(_analytic_score(sde)(x, t), g['analytic_score'], atol=1e-4)


@pytest.mark.parametrize('name', sorted(SDES))
@pytest.mark.parametrize('probability_flow', [False, True])
def test_reverse_matches_golden(name, probability_flow, sde_golden):
  sde = SDES[name]
  prefix = f"{name}.{'reverse_ode' if probability_flow else 'reverse_sde'}."
  x = jnp.asarray(nchw_to_nhwc(sde_golden['x']))
  t = jnp.asarray(sde_golden['t'])
  reverse = sde.reverse(_analytic_score(sde), probability_flow)
  drift, diffusion = jax.jit(reverse.sde)(x, t)
  # Drift = f - g^2 s: near t=0 the VP/subVP score term carries the std error above.
  _close(drift, sde_golden[prefix + 'sde.drift'], atol=1e-3)
  _close(diffusion, sde_golden[prefix + 'sde.diffusion'], atol=2e-4)
  f, G = jax.jit(reverse.discretize)(x, t)
  _close(f, sde_golden[prefix + 'discretize.f'], atol=1e-4)
  _close(G, sde_golden[prefix + 'discretize.G'], atol=1e-4)


def test_discrete_tables_match_golden(sde_golden):
  _close(SDES['vesde'].discrete_sigmas, sde_golden['vesde.discrete_sigmas'])
  vp = SDES['vpsde']
  for name in ['discrete_betas', 'alphas', 'alphas_cumprod', 'sqrt_alphas_cumprod',
               'sqrt_1m_alphas_cumprod']:
    _close(getattr(vp, name), sde_golden['vpsde.' + name])


@pytest.mark.parametrize('name', sorted(SDES))
def test_marginal_matches_monte_carlo_of_discretization(name):
  """Simulating the SDE with Euler-Maruyama reproduces marginal_prob's mean and std."""
  sde = SDES[name]
  n, steps, t_end = 20000, 400, 0.6
  x0 = jnp.full((n, 1), 1.5)
  dt = t_end / steps

  def body(i, carry):
    x, key = carry
    key, sub = jax.random.split(key)
    t = jnp.full((n,), i * dt)
    drift, diffusion = sde.sde(x, t)
    x = x + drift * dt + sde_lib.batch_mul(diffusion * np.sqrt(dt), jax.random.normal(sub, x.shape))
    return x, key

  x, _ = jax.jit(lambda k: jax.lax.fori_loop(0, steps, body, (x0, k)))(jax.random.key(0))
  mean, std = sde.marginal_prob(x0[:1], jnp.array([t_end]))
  se = float(std[0]) / np.sqrt(n)
  assert abs(float(jnp.mean(x)) - float(mean[0, 0])) < 5 * se + 2e-2 * float(std[0])
  assert abs(float(jnp.std(x)) / float(std[0]) - 1) < 0.03


@pytest.mark.parametrize('name', sorted(SDES))
def test_prior_logp_is_log_density_of_prior_sampling(name):
  sde = SDES[name]
  z = sde.prior_sampling(jax.random.key(1), (4, 3, 2))
  scale = sde.marginal_prob(jnp.zeros((1, 1)), jnp.ones((1,)))[1][0] if name == 'vesde' else 1.0
  expected = jax.scipy.stats.norm.logpdf(z, scale=scale).reshape(4, -1).sum(-1)
  np.testing.assert_allclose(sde.prior_logp(z), expected, rtol=1e-5)


def test_sdes_pass_through_jit_and_vmap():
  sde = SDES['vpsde']
  fn = jax.jit(lambda s, x, t: s.marginal_prob(x, t)[1])
  np.testing.assert_allclose(fn(sde, jnp.ones((3, 2)), jnp.full((3,), 0.5)),
                             sde.marginal_prob(jnp.ones((3, 2)), jnp.full((3,), 0.5))[1])
  per_example = jax.vmap(lambda x, t: sde.sde(x[None], t[None])[0][0])
  assert per_example(jnp.ones((5, 2)), jnp.linspace(0, 1, 5)).shape == (5, 2)


def test_make_sde_rejects_unknown_name():
  valid = "valid choices: \\['cosinevpsde', 'subvpsde', 'vesde', 'vpsde'\\]"
  with pytest.raises(ValueError, match=valid):
    sde_lib.make_sde('edm')
  assert sde_lib.make_sde('VPSDE', num_scales=10).N == 10


@pytest.mark.parametrize('build, field', [
    (lambda: sde_lib.VESDE(sigma_min=0.0), 'VESDE.sigma_min'),
    (lambda: sde_lib.VESDE(sigma_min=1.0, sigma_max=0.5), 'VESDE.sigma_max'),
    (lambda: sde_lib.VESDE(N=0), 'VESDE.N'),
    (lambda: sde_lib.VPSDE(N=2.5), 'VPSDE.N'),
    (lambda: sde_lib.VPSDE(T=0.0), 'VPSDE.T'),
    (lambda: sde_lib.VPSDE(beta_min=-0.1), 'VPSDE.beta_min'),
    (lambda: sde_lib.SubVPSDE(beta_max=0.0), 'SubVPSDE.beta_max'),
    (lambda: sde_lib.SubVPSDE(beta_min=float('nan')), 'SubVPSDE.beta_min'),
])
def test_constructors_reject_out_of_range_fields(build, field):
  with pytest.raises(ValueError, match=f'^{field} must be'):
    build()


def test_discrete_betas_need_enough_steps():
  # beta_max / N must stay <= 1 (alpha = 1 - beta under a square root) and < 1 for ancestral
  # sampling (1 / sqrt(alpha)); the error names the smallest N that works.
  with pytest.raises(ValueError, match=r'reach 2 but must stay <= 1; use N >= 20'):
    sde_lib.VPSDE(N=10).discrete_betas  # noqa: B018
  betas = sde_lib.VPSDE(N=20).discrete_betas
  assert betas.max() == 1.0 and np.all(np.isfinite(np.sqrt(sde_lib.VPSDE(N=20).alphas)))
  with pytest.raises(ValueError, match=r'must stay < 1; use N >= 21'):
    sde_lib.discrete_betas(sde_lib.VPSDE(N=20), strict=True)
  assert sde_lib.discrete_betas(sde_lib.SubVPSDE(N=21), strict=True).max() < 1
  # The continuous quantities do not need the tables: a 5-step VP SDE is a valid object.
  sde = sde_lib.VPSDE(N=5)
  assert np.isfinite(sde.marginal_prob(jnp.ones((1, 2)), jnp.ones((1,)))[1]).all()
