"""Samplers: one-step golden values, exact NFE, determinism, and sample statistics.

The distribution tests use data with a closed-form score (`scorejax.analytic`), so any
deviation from the data law is the sampler's own error (discretisation + Monte Carlo).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nchw_to_nhwc

from scorejax import predictors, sampling
from scorejax import sde as sde_lib

SDES = {
    'vesde': sde_lib.VESDE(0.01, 50.0, 1000),
    'vpsde': sde_lib.VPSDE(0.1, 20.0, 1000),
    'subvpsde': sde_lib.SubVPSDE(0.1, 20.0, 1000),
}


def _analytic_score(sde):
  """The golden files' score: `-x / (1 + std(t)^2)` (data N(0, I) under VE/VP)."""
  def score_fn(x, t):
    std = sde.marginal_prob(jnp.zeros_like(x), t)[1]
    return -sde_lib.batch_mul(1.0 / (1.0 + std**2), x)
  return score_fn


def _assert_golden(actual, golden):
  # README §8: per sample, max|port - golden| <= 1e-4 max|golden| (float32 differences).
  golden = nchw_to_nhwc(golden)
  actual = np.asarray(actual)
  for a, g in zip(actual, golden, strict=True):
    np.testing.assert_array_less(np.max(np.abs(a - g)), 1e-4 * np.max(np.abs(g)) + 1e-7)


PREDICTOR_CASES = [
    (name, pred, pf)
    for name in SDES
    for pred in ['euler_maruyama', 'reverse_diffusion', 'ancestral_sampling']
    for pf in [False, True]
    if not (pred == 'ancestral_sampling' and (pf or name == 'subvpsde'))
    and not (pred == 'euler_maruyama' and pf)  # the reference raises there
]


@pytest.mark.parametrize('name,predictor,probability_flow', PREDICTOR_CASES)
def test_predictor_matches_golden(name, predictor, probability_flow, sampler_loss_golden):
  g = sampler_loss_golden
  sde = SDES[name]
  x = jnp.asarray(nchw_to_nhwc(g['x']))
  z = jnp.asarray(nchw_to_nhwc(g['z']))
  t = jnp.asarray(g['t'])
  update = jax.jit(predictors.PREDICTORS[predictor], static_argnums=(3, 4, 5))
  x_new, x_mean = update(x, t, z, _analytic_score(sde), sde, probability_flow)
  prefix = f"{name}.predictor.{predictor}{'.probability_flow' if probability_flow else ''}"
  _assert_golden(x_new, g[prefix + '.x'])
  _assert_golden(x_mean, g[prefix + '.x_mean'])


@pytest.mark.parametrize('name', ['vesde', 'vpsde'])
@pytest.mark.parametrize('corrector', ['langevin', 'ald'])
def test_corrector_matches_golden(name, corrector, sampler_loss_golden):
  g = sampler_loss_golden
  sde = SDES[name]
  x = jnp.asarray(nchw_to_nhwc(g['x']))
  z = jnp.asarray(nchw_to_nhwc(g['z']))
  t = jnp.asarray(g['t'])
  update = jax.jit(predictors.CORRECTORS[corrector], static_argnums=(3, 4))
  x_new, x_mean = update(x, t, z, _analytic_score(sde), sde, 0.16)
  _assert_golden(x_new, g[f'{name}.corrector.{corrector}.x'])
  _assert_golden(x_mean, g[f'{name}.corrector.{corrector}.x_mean'])


@pytest.mark.parametrize('name', sorted(SDES))
def test_euler_maruyama_probability_flow_is_ode_euler_step(name, sampler_loss_golden):
  # The reference raises here; the ODE Euler step is x + f_ode dt with no noise, and it
  # agrees with the golden reverse-diffusion ODE step to first order in dt.
  g = sampler_loss_golden
  sde = SDES[name]
  x = jnp.asarray(nchw_to_nhwc(g['x']))
  z = jnp.asarray(nchw_to_nhwc(g['z']))
  t = jnp.asarray(g['t'])
  score_fn = _analytic_score(sde)
  x_new, x_mean = predictors.euler_maruyama_update(x, t, z, score_fn, sde, True)
  np.testing.assert_array_equal(x_new, x_mean)
  drift = sde.reverse(score_fn, True).sde(x, t)[0]
  np.testing.assert_allclose(x_new, x - drift / sde.N, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('corrector', ['langevin', 'ald'])
def test_corrector_on_subvp_uses_vp_alphas(corrector):
  # Sub-VP shares VP's beta(t): its corrector step equals VP's at equal std-independent
  # inputs (Langevin), and ALD differs from VP only through std(t).
  x = jax.random.normal(jax.random.key(0), (4, 3))
  z = jax.random.normal(jax.random.key(1), (4, 3))
  t = jnp.array([0.01, 0.3, 0.6, 0.9])
  score_fn = lambda x, t: -x
  vp, subvp = SDES['vpsde'], SDES['subvpsde']
  update = predictors.CORRECTORS[corrector]
  out_vp = update(x, t, z, score_fn, vp, 0.16)[1]
  out_subvp = update(x, t, z, score_fn, subvp, 0.16)[1]
  if corrector == 'langevin':
    np.testing.assert_allclose(out_subvp, out_vp, rtol=1e-6)
  else:
    std = subvp.marginal_prob(x, t)[1]
    alpha = 1.0 - np.asarray(vp.discrete_betas)[(np.asarray(t) * 999).astype(int)]
    expected = x * (1 - 2 * (0.16 * np.asarray(std)) ** 2 * alpha)[:, None]
    np.testing.assert_allclose(out_subvp, expected, rtol=1e-5)


def test_unknown_names_list_valid_choices():
  score_fn = lambda x, t: -x
  sde = SDES['vpsde']
  with pytest.raises(ValueError, match='reverse_diffusion'):
    sampling.pc_sample(jax.random.key(0), score_fn, sde, (2, 2), predictor='heun')
  with pytest.raises(ValueError, match='langevin'):
    sampling.pc_sample(jax.random.key(0), score_fn, sde, (2, 2), corrector='hmc')
  with pytest.raises(ValueError, match='tsit5'):
    sampling.ode_sample(jax.random.key(0), score_fn, sde, (2, 2), method='rk4')
  with pytest.raises(ValueError, match='VPSDE'):
    sampling.pc_sample(jax.random.key(0), score_fn, SDES['subvpsde'], (2, 2),
                       predictor='ancestral_sampling', n_steps=3)
