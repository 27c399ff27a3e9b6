"""Samplers: one-step golden values, exact NFE, determinism, and sample statistics.

The distribution tests use data with a closed-form score (`scorejax.analytic`), so any
deviation from the data law is the sampler's own error (discretisation + Monte Carlo).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import counted, nchw_to_nhwc

from scorejax import analytic, predictors, sampling
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


# -- sample statistics with exact scores ---------------------------------------------------

N_SAMPLES = 4000
# 2-D Gaussian with correlation: checks mean and full covariance.
GAUSSIAN = analytic.GaussianMixture.gaussian(
    jnp.array([1.0, -0.5]), jnp.array([[1.0, 0.6], [0.6, 0.5]]))
# Three well separated components (>= 12 component stds apart): checks the weights too.
MIXTURE = analytic.GaussianMixture.diagonal(
    [0.5, 0.3, 0.2], jnp.array([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]]), 0.25)


def _assert_law(samples, data, k=4.0, bias=0.03):
  """Checks mean, covariance and (mixtures) weights of `samples [n, D]` against `data`.

  Tolerance = k standard errors of the estimator + a discretisation-bias budget `bias`
  (relative to the data scale). Standard errors, n samples: mean_i sqrt(S_ii / n);
  covariance S_ij sqrt((S_ii S_jj + S_ij^2) / n) (Gaussian fourth moments; the mixtures
  here are close enough, their kurtosis is lower than Gaussian along the split axes); weight
  w sqrt(w (1 - w) / n). With k = 4 each check fails by chance with probability ~6e-5
  (and the keys are fixed, so runs are deterministic). The bias budget covers the
  O(1/N) drift of the 1000-step samplers (measured <= 0.02 on these laws) and eps > 0.
  """
  samples = np.asarray(samples, np.float64).reshape(samples.shape[0], -1)
  n = samples.shape[0]
  mean = np.asarray(data.mean()).reshape(-1)
  cov = np.asarray(data.covariance())
  var = np.diag(cov)
  scale = np.sqrt(var)
  np.testing.assert_array_less(np.abs(samples.mean(0) - mean), k * np.sqrt(var / n) + bias * scale)
  cov_se = np.sqrt((np.outer(var, var) + cov**2) / n)
  np.testing.assert_array_less(np.abs(np.cov(samples.T) - cov),
                               k * cov_se + bias * np.outer(scale, scale))
  if data.num_components > 1:
    means = np.asarray(data.means)
    nearest = np.argmin(((samples[:, None] - means[None]) ** 2).sum(-1), axis=1)
    freq = np.bincount(nearest, minlength=len(means)) / n
    w = np.asarray(data.weights)
    np.testing.assert_array_less(np.abs(freq - w), k * np.sqrt(w * (1 - w) / n) + 0.01)


FAST_PC_CASES = [
    ('vesde', 'reverse_diffusion', 'langevin'), ('vpsde', 'reverse_diffusion', 'langevin'),
    ('subvpsde', 'reverse_diffusion', 'langevin'), ('vesde', 'ancestral_sampling', 'ald'),
    ('vpsde', 'euler_maruyama', 'none'), ('subvpsde', 'euler_maruyama', 'ald'),
]


def _pc_cases(all_cases):
  cases = []
  for name in sorted(SDES):
    for p in ['euler_maruyama', 'reverse_diffusion', 'ancestral_sampling']:
      for c in ['langevin', 'ald', 'none']:
        if p == 'ancestral_sampling' and name == 'subvpsde':
          continue
        if ((name, p, c) in FAST_PC_CASES) != all_cases:
          cases.append((name, p, c))
  return cases


def _check_pc(name, predictor, corrector, data, n_steps=None):
  sde = SDES[name]
  samples, nfe = sampling.pc_sample(jax.random.key(1), data.score_fn(sde), sde,
                                    (N_SAMPLES, data.dim), predictor=predictor,
                                    corrector=corrector, n_steps=n_steps)
  n_steps = n_steps or sde.N
  assert nfe == n_steps * (1 + (corrector != 'none'))
  assert np.all(np.isfinite(samples))
  _assert_law(samples, data)


@pytest.mark.parametrize('name,predictor,corrector', _pc_cases(False))
def test_pc_sampler_reproduces_gaussian(name, predictor, corrector):
  _check_pc(name, predictor, corrector, GAUSSIAN)


@pytest.mark.slow
@pytest.mark.parametrize('name,predictor,corrector', _pc_cases(True))
def test_pc_sampler_reproduces_gaussian_all_combinations(name, predictor, corrector):
  _check_pc(name, predictor, corrector, GAUSSIAN)


@pytest.mark.parametrize('name', sorted(SDES))
def test_pc_sampler_reproduces_mixture(name):
  # 500 steps: exercises n_steps != sde.N (the discrete tables are rebuilt for the grid).
  _check_pc(name, 'reverse_diffusion', 'langevin', MIXTURE, n_steps=500)


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(SDES))
def test_pc_sampler_reproduces_8d_mixture(name):
  means = 3.0 * jax.random.normal(jax.random.key(7), (3, 8))
  data = analytic.GaussianMixture.diagonal([0.5, 0.3, 0.2], means, 0.25)
  _check_pc(name, 'reverse_diffusion', 'langevin', data)


ODE_CASES = [(name, 'tsit5', None) for name in sorted(SDES)] + [
    ('vpsde', 'heun', 100), ('vpsde', 'dopri5', None), ('vpsde', 'rk45', None),
    pytest.param('vesde', 'heun', 200, marks=pytest.mark.slow)]


@pytest.mark.parametrize('name,method,n_steps', ODE_CASES)
def test_ode_sampler_reproduces_mixture(name, method, n_steps):
  sde = SDES[name]
  if method == 'dopri5':  # through the builder, with the mixture means as traced params
    sample_fn = sampling.make_ode_sampler(
        lambda means: dataclasses.replace(MIXTURE, means=means).score_fn(sde), sde,
        (N_SAMPLES, 2), method=method)
    samples, nfe = sample_fn(jax.random.key(2), MIXTURE.means)
  else:
    samples, nfe = sampling.ode_sample(jax.random.key(2), MIXTURE.score_fn(sde), sde,
                                       (N_SAMPLES, 2), method=method, n_steps=n_steps)
  if n_steps is not None:
    assert int(nfe) == 2 * n_steps
  _assert_law(samples, MIXTURE)


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(SDES))
def test_ode_euler_reproduces_gaussian(name):
  # First order: the VE grid needs ~1000 uniform steps for a bias under the budget.
  sde = SDES[name]
  samples, nfe = sampling.ode_sample(jax.random.key(3), GAUSSIAN.score_fn(sde), sde,
                                     (N_SAMPLES, 2), method='euler')
  assert int(nfe) == sde.N
  _assert_law(samples, GAUSSIAN)


@pytest.mark.slow
def test_ode_sampler_reproduces_8d_mixture():
  means = 3.0 * jax.random.normal(jax.random.key(7), (3, 8))
  data = analytic.GaussianMixture.diagonal([0.5, 0.3, 0.2], means, 0.25)
  sde = SDES['vpsde']
  samples, _ = sampling.ode_sample(jax.random.key(4), data.score_fn(sde), sde, (N_SAMPLES, 8))
  _assert_law(samples, data)


@pytest.mark.parametrize('method', ['tsit5', 'dopri5', 'rk45'])
def test_ode_nfe_counts_every_score_evaluation(method):
  # A host-side counter inside the score (jax.debug.callback runs once per actual
  # evaluation, also inside the solver's while loop) must equal the reported NFE.
  sde = SDES['vpsde']
  score_fn, calls = counted(GAUSSIAN.score_fn(sde))
  _, nfe = sampling.ode_sample(jax.random.key(0), score_fn, sde, (8, 2), method=method,
                               rtol=1e-4, atol=1e-4, denoise=True)
  jax.effects_barrier()
  assert int(nfe) == len(calls) > 10


def test_pc_sampler_is_deterministic_and_jittable_with_params():
  sde = sde_lib.VPSDE(N=50)

  def score_fn_builder(means):
    data = analytic.GaussianMixture.diagonal([0.5, 0.5], means, 0.25)
    return data.score_fn(sde)

  means = jnp.array([[-2.0, 0.0], [2.0, 0.0]])
  kwargs = dict(predictor='euler_maruyama', corrector='ald')
  score_fn = score_fn_builder(means)  # one closure: one compilation of pc_sample
  a, nfe = sampling.pc_sample(jax.random.key(5), score_fn, sde, (6, 2), **kwargs)
  b, _ = sampling.pc_sample(jax.random.key(5), score_fn, sde, (6, 2), **kwargs)
  c, _ = sampling.pc_sample(jax.random.key(6), score_fn, sde, (6, 2), **kwargs)
  sample_fn = sampling.make_pc_sampler(score_fn_builder, sde, (6, 2), **kwargs)
  d, nfe_d = sample_fn(jax.random.key(5), means)
  assert nfe == nfe_d == 100
  np.testing.assert_array_equal(a, b)
  assert np.max(np.abs(np.asarray(a) - np.asarray(c))) > 1e-2
  np.testing.assert_allclose(d, a, rtol=1e-5, atol=1e-5)


# -- argument checks -------------------------------------------------------------------------


@pytest.mark.parametrize('kwargs, message', [
    (dict(n_steps=0), r'^n_steps must be an integer >= 1'),
    (dict(n_corrector_steps=-1), r'^n_corrector_steps must be an integer >= 0'),
    (dict(snr=-0.16), r'^snr must be in \[0, inf\)'),
    (dict(eps=0.0), r'^eps must be in \(0, 1\)'),
    (dict(eps=2.0), r'^eps must be in \(0, 1\)'),
    # VP tables on 10 steps: beta_max / N = 2, so alpha = 1 - beta < 0 (the sampler would
    # return NaN); the reverse-diffusion predictor and the Langevin corrector both read them.
    (dict(n_steps=10), r'on N=10 steps: .* use N >= 20'),
    (dict(n_steps=10, predictor='euler_maruyama'), r'on N=10 steps: .* use N >= 20'),
    (dict(n_steps=20, predictor='ancestral_sampling', corrector='none'), r'use N >= 21'),
])
def test_pc_arguments_are_checked_before_the_first_call(kwargs, message):
  score_fn = lambda x, t: -x
  with pytest.raises(ValueError, match=message):
    sampling.pc_sample(jax.random.key(0), score_fn, SDES['vpsde'], (2, 2), **kwargs)
  with pytest.raises(ValueError, match=message):  # at construction, not at the first call
    sampling.make_pc_sampler(lambda params: score_fn, SDES['vpsde'], (2, 2), **kwargs)


def test_few_step_samplers_that_need_no_tables_run():
  score_fn = lambda x, t: -x
  x, nfe = sampling.pc_sample(jax.random.key(0), score_fn, SDES['vpsde'], (64, 2), n_steps=5,
                              predictor='euler_maruyama', corrector='none')
  assert nfe == 5 and np.all(np.isfinite(x))
  x, nfe = sampling.pc_sample(jax.random.key(0), score_fn, SDES['vpsde'], (64, 2), n_steps=21,
                              predictor='ancestral_sampling', corrector='none')
  assert nfe == 21 and np.all(np.isfinite(x))
  # N(0, I) data: score -x at every t, so samples stay standard normal.
  assert abs(float(jnp.std(x)) - 1.0) < 0.3


def test_sampler_builders_reject_unknown_keywords_and_bad_numbers():
  builder = lambda params: (lambda x, t: -x)
  with pytest.raises(TypeError, match=r"unknown keyword arguments \['nsteps'\]"):
    sampling.make_pc_sampler(builder, SDES['vpsde'], (2, 2), nsteps=10)
  with pytest.raises(TypeError, match=r"unknown keyword arguments \['step'\]"):
    sampling.make_ode_sampler(builder, SDES['vpsde'], (2, 2), step=10)
  with pytest.raises(ValueError, match='must not both be 0'):
    sampling.make_ode_sampler(builder, SDES['vpsde'], (2, 2), rtol=0.0, atol=0.0)
  with pytest.raises(ValueError, match=r'^eps must be in \(0, 1\)'):
    sampling.ode_sample(jax.random.key(0), lambda x, t: -x, SDES['vpsde'], (2, 2), eps=-1e-3)
  with pytest.raises(ValueError, match=r'^n_steps must be an integer >= 1'):
    sampling.ode_sample(jax.random.key(0), lambda x, t: -x, SDES['vpsde'], (2, 2),
                        method='euler', n_steps=0)


def test_traced_numbers_pass_through_unchecked():
  # Inside a caller's jit, eps is traced: it cannot be checked in Python, and must not fail.
  sample = jax.jit(lambda eps: sampling.pc_sample(jax.random.key(0), lambda x, t: -x,
                                                  SDES['vpsde'], (2, 2), n_steps=30,
                                                  eps=eps)[0])
  assert np.all(np.isfinite(sample(1e-3)))


@pytest.mark.parametrize('sample', [
    lambda score_fn: sampling.pc_sample(jax.random.key(0), score_fn, SDES['vesde'], (4, 2),
                                        n_steps=30, predictor='ancestral_sampling',
                                        corrector='ald'),
    lambda score_fn: sampling.pc_sample(jax.random.key(0), score_fn, SDES['vpsde'], (4, 2),
                                        n_steps=30),
    lambda score_fn: sampling.ode_sample(jax.random.key(0), score_fn, SDES['vpsde'], (4, 2)),
], ids=['pc_ve_ancestral_ald', 'pc_vp', 'ode'])
def test_a_score_of_the_wrong_shape_is_named(sample):
  # [D] from a mean over the batch would broadcast into every update without an error.
  with pytest.raises(ValueError, match=r'must return the shape of x \(4, 2\), got \(2,\)'):
    sample(lambda x, t: -jnp.mean(x, axis=0))
