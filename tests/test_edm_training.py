"""EDM preconditioning and objective: the ideal network gives the exact score on every SDE,
the loss of the exact score is the posterior variance in closed form, its noise levels are
the clipped log-normal, training learns the score, and bad settings fail on one line.

For Gaussian data `N(mu, diag(v))` the data at noise level `s` is `N(mu, v + s^2)`, so the
ideal denoiser is `D*(y; s) = mu + v / (v + s^2) (y - mu)`, the posterior variance of each
coordinate given `y` is `v s^2 / (v + s^2)`, and the ideal network of the preconditioning is
`F* = (D* - c_skip y) / c_out`.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_classifier_guidance import ALL_SDES
from test_fast_solvers import GAUSSIAN, MEAN, VARIANCE
from test_main import load_config
from test_sampling import MIXTURE

from scorejax import edm_loss, fast_solvers, losses, run_common, run_train
from scorejax import sde as sde_lib
from scorejax.models import EDMPreconditioning, make_score_fn
from scorejax.models.mlp import MLPScoreNet

PRECONDITIONING = EDMPreconditioning(sigma_data=0.5)


def _ideal_network(sde):
  """`F*(x_in, labels)`, reading the noise level back from the SDE's time labels."""
  def model_fn(x_in, labels):
    if isinstance(sde, sde_lib.VESDE):  # labels = sigma_t = sigma_min (max / min)^t
      t = jnp.log(labels / sde.sigma_min) / jnp.log(sde.sigma_max / sde.sigma_min)
    else:  # labels = 999 t
      t = labels / 999.0
    alpha, sigma = fast_solvers.kernel(sde, t)
    s = (sigma / alpha)[:, None]
    c_in, _, c_out = PRECONDITIONING.coefficients(s)
    y, sd2 = x_in / c_in, PRECONDITIONING.sigma_data**2
    # D* - c_skip y, written as O(s^2) terms (a difference of two ~y terms loses every digit
    # of it in float32 at small s).
    residual = s**2 * (MEAN + y * (VARIANCE - sd2) / (s**2 + sd2)) / (VARIANCE + s**2)
    return residual / c_out
  return model_fn


@pytest.mark.parametrize('name', sorted(ALL_SDES))
def test_the_ideal_preconditioned_network_gives_the_exact_score(name):
  sde = ALL_SDES[name]
  score_fn = make_score_fn(_ideal_network(sde), sde, preconditioning=PRECONDITIONING)
  t = jnp.linspace(1e-3, sde.T, 16)
  x = GAUSSIAN.sample(jax.random.key(0), 16) * 3.0  # also far from the data
  mean, std = sde.marginal_prob(x, t)
  x = mean + std[:, None] * jax.random.normal(jax.random.key(1), x.shape)
  expected = GAUSSIAN.score_fn(sde)(x, t)
  np.testing.assert_allclose(score_fn(x, t), expected, rtol=2e-3,
                             atol=2e-3 * float(jnp.abs(expected).max()))


@pytest.mark.parametrize('name', ['vesde', 'vpsde', 'cosinevpsde'])
@pytest.mark.parametrize('reduce_mean', [True, False])
def test_the_exact_scores_loss_is_the_weighted_posterior_variance(name, reduce_mean):
  # At fixed levels, E[loss] = lambda(s) sum_d v_d s^2 / (v_d + s^2) (mean over d, or half
  # the sum); checked within 4 standard errors of 20000 draws per level; a score 10% off
  # loses on the same draws.
  sde, n = ALL_SDES[name], 20000
  levels = np.array([0.05, 0.5, 2.0], np.float32)
  x0 = GAUSSIAN.sample(jax.random.key(2), n)
  z = jax.random.normal(jax.random.key(3), x0.shape)
  for s in levels:
    s_batch = jnp.full((n,), s)
    exact = np.asarray(edm_loss.edm_losses(GAUSSIAN.score_fn(sde), sde, x0, s_batch, z,
                                           reduce_mean=reduce_mean), np.float64)
    variance = np.asarray(VARIANCE, np.float64) * s**2 / (np.asarray(VARIANCE) + s**2)
    reduced = variance.mean() if reduce_mean else 0.5 * variance.sum()
    expected = float(edm_loss.edm_weight(s, 0.5)) * reduced
    assert abs(exact.mean() - expected) < 4 * exact.std() / np.sqrt(n), (s, exact.mean(),
                                                                         expected)
    off = lambda x, t: 1.1 * GAUSSIAN.score_fn(sde)(x, t)
    worse = edm_loss.edm_losses(off, sde, x0, s_batch, z, reduce_mean=reduce_mean)
    assert float(jnp.mean(worse)) > exact.mean()


def test_edm_loss_draws_clipped_log_normal_levels():
  # The keyed loss of the exact score averages lambda(s) x posterior variance over
  # s = clip(exp(N(p_mean, p_std^2)), s(eps), s(T)); Gauss-Hermite quadrature gives the
  # expectation. Narrow VE range (0.1, 2): both clips matter.
  sde, eps = sde_lib.VESDE(sigma_min=0.1, sigma_max=2.0), 1e-5
  low, high = (float(v) for v in edm_loss.level_range(sde, eps))
  nodes, weights = np.polynomial.hermite_e.hermegauss(80)
  s = np.clip(np.exp(-1.2 + 1.2 * nodes), low, high)
  variance = np.asarray(VARIANCE, np.float64)
  per_level = (s**2 + 0.25) / (0.25 * s**2) * (variance * s[:, None]**2
                                              / (variance + s[:, None]**2)).mean(1)
  expected = float(np.sum(weights * per_level) / np.sqrt(2 * np.pi))
  draws = []
  for i in range(20):
    x0 = GAUSSIAN.sample(jax.random.fold_in(jax.random.key(4), i), 2000)
    loss, metrics = edm_loss.edm_loss(jax.random.fold_in(jax.random.key(5), i),
                                      GAUSSIAN.score_fn(sde), sde, x0, reduce_mean=True,
                                      eps=eps)
    draws.append(float(loss))
  assert metrics['loss'] == loss
  mean, error = np.mean(draws), np.std(draws) / np.sqrt(len(draws))
  assert abs(mean - expected) < 4 * error, (mean, expected, error)


@pytest.mark.parametrize('name', ['vpsde', 'vesde'])
def test_training_with_the_edm_objective_learns_the_score(name):
  # A small MLP with the EDM preconditioning and objective on the 2-D mixture: the Fisher
  # divergence to the exact score (over t, on noised data) falls at least 5x from its
  # initial value in 300 steps.
  sde = ALL_SDES[name]
  model = MLPScoreNet(hidden=64, num_layers=2, embedding_dim=16,
                      embedding_type='fourier' if name == 'vesde' else 'positional')
  params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.ones((1,)))['params']
  loss_fn = losses.make_loss_fn(sde, model, train=True, reduce_mean=True, objective='edm',
                                preconditioning=PRECONDITIONING, sigma_data=3.0)
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, key):
    key_data, key_loss = jax.random.split(key)
    grads = jax.grad(lambda p: loss_fn(p, key_loss, MIXTURE.sample(key_data, 256))[0])(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  t = jax.random.uniform(jax.random.key(6), (2048,), minval=0.02, maxval=1.0)
  mean, std = sde.marginal_prob(MIXTURE.sample(jax.random.key(7), 2048), t)
  xt = mean + std[:, None] * jax.random.normal(jax.random.key(8), mean.shape)

  def fisher(params):
    score_fn = make_score_fn(lambda x, labels: model.apply({'params': params}, x, labels), sde,
                             preconditioning=PRECONDITIONING)
    # std^2-weighted (the noise-prediction error): finite at every t.
    difference = (score_fn(xt, t) - MIXTURE.score_fn(sde)(xt, t)) * std[:, None]
    return float(jnp.mean(jnp.sum(difference**2, axis=-1)))

  initial = fisher(params)
  for i in range(300):
    params, opt_state = step(params, opt_state, jax.random.fold_in(jax.random.key(1), i))
  final = fisher(params)
  assert final < initial / 5, (initial, final)


@pytest.mark.parametrize('overrides, expected', [
    ({'training.objective': 'ddpm'}, "unknown training.objective 'ddpm'; valid choices: "
                                     "['sde', 'edm']"),
    ({'model.preconditioning': 'vp'}, "unknown model.preconditioning 'vp'; valid choices: "
                                      "['', 'edm']"),
    ({'training.objective': 'edm', 'training.continuous': False},
     'need training.continuous=True'),
    ({'model.preconditioning': 'edm', 'training.continuous': False},
     'need training.continuous=True'),
    ({'training.objective': 'edm', 'training.likelihood_weighting': True},
     'has its own weighting'),
    ({'training.objective': 'edm', 'model.sigma_data': 0.0}, 'sigma_data must be in (0, inf)'),
    ({'model.preconditioning': 'edm', 'model.sigma_data': -1.0}, 'model.sigma_data must be > 0'),
    ({'training.objective': 'edm', 'training.p_std': -1.0}, 'p_std must be in [0, inf)'),
    ({'model.preconditioning': 'edm', 'model.scale_by_sigma': True},
     'set model.scale_by_sigma=False'),
])
def test_bad_edm_settings_fail_before_training(tmp_path, overrides, expected):
  config = load_config(**overrides)
  with pytest.raises(ValueError) as error:
    run_train.validate(config, str(tmp_path / 'run'))
  assert str(error.value).startswith('training settings: ') and expected in str(error.value)
  assert '\n' not in str(error.value) and not (tmp_path / 'run').exists()


def test_the_drivers_score_is_the_preconditioned_one():
  config = load_config(**{'model.preconditioning': 'edm', 'model.sigma_data': 0.7})
  assert run_common.preconditioning(config) == EDMPreconditioning(0.7)
  assert run_common.preconditioning(load_config()) is None


def test_a_preconditioned_run_trains_samples_and_keeps_its_meaning(tmp_path):
  from scorejax import run_sample

  edm = {'model.preconditioning': 'edm', 'training.objective': 'edm', 'training.n_iters': 10,
         'training.snapshot_sampling': False, 'sampling.method': 'edm', 'sampling.num_steps': 4}
  config = load_config(**edm)
  run_train.validate(config, str(tmp_path))
  assert run_train.run(config, str(tmp_path))['status'] == 'done'
  out = run_sample.run(config, str(tmp_path))
  samples = np.load(out['path'])['samples']
  assert samples.shape == (32, 2) and np.isfinite(samples).all() and out['nfe'] == [9, 9]
  (tmp_path / 'config.json').write_text(config.to_json_best_effort())  # as main.py leaves it
  # Sampling its parameters as a plain score network would give wrong samples: refused.
  plain = load_config(**{**edm, 'model.preconditioning': ''})
  with pytest.raises(ValueError, match=r"trained with model.preconditioning='edm' \(here ''\)"):
    run_sample.validate(plain, str(tmp_path))
  # sigma_data is part of a preconditioned network's meaning (and of no other network's).
  with pytest.raises(ValueError, match=r'model.sigma_data=0.5 \(here 0.7\)'):
    run_sample.validate(load_config(**{**edm, 'model.sigma_data': 0.7}), str(tmp_path))
  from scorejax.run_common import _meaning_settings
  assert 'model.sigma_data' not in _meaning_settings(json.loads(plain.to_json_best_effort()))
