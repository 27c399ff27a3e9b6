"""make_score_fn: label conventions and output scaling of score_sde's get_score_fn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scorejax import sde as sde_lib
from scorejax.models import make_score_fn

T_VALUES = np.array([1e-3, 0.1, 0.5, 0.9, 1.0], np.float32)


def _x(shape=(5, 3)):
  return jax.random.normal(jax.random.key(0), shape)


@pytest.mark.parametrize('sde', [sde_lib.VPSDE(), sde_lib.SubVPSDE()], ids=['vp', 'subvp'])
def test_vp_continuous_noise_prediction_gives_exact_gaussian_score(sde):
  # Data N(0, I): x_t = mean_coeff x0 + std z. A network predicting z = -std * score
  # must give back the closed-form score -x / (mean_coeff^2 + std^2).
  def model_fn(x, labels):
    t = labels / 999.0
    mean_coeff = jnp.exp(sde.log_mean_coeff(t))[:, None]
    std = sde.marginal_prob(jnp.zeros_like(x), t)[1][:, None]
    return std * x / (mean_coeff**2 + std**2)

  x, t = _x(), jnp.asarray(T_VALUES)
  score = make_score_fn(model_fn, sde, continuous=True)(x, t)
  mean_coeff = np.exp(np.asarray(sde.log_mean_coeff(t)))[:, None]
  std = np.asarray(sde.marginal_prob(x, t)[1])[:, None]
  np.testing.assert_allclose(score, -x / (mean_coeff**2 + std**2), rtol=1e-5)


def test_vp_discrete_uses_integer_table_std():
  sde = sde_lib.VPSDE()
  seen = {}

  def model_fn(x, labels):
    seen['labels'] = labels
    return jnp.ones_like(x)

  t = jnp.asarray(T_VALUES)
  score = make_score_fn(model_fn, sde, continuous=False)(_x(), t)
  labels = np.asarray(T_VALUES) * (sde.N - 1)
  np.testing.assert_allclose(seen['labels'], labels, rtol=1e-6)
  std = sde.sqrt_1m_alphas_cumprod[labels.astype(np.int32)]
  np.testing.assert_allclose(score, -np.ones((5, 3)) / std[:, None], rtol=1e-6)


def test_subvp_is_always_continuous():
  sde = sde_lib.SubVPSDE()
  model_fn = lambda x, labels: x * labels[:, None]
  x, t = _x(), jnp.asarray(T_VALUES)
  a = make_score_fn(model_fn, sde, continuous=False)(x, t)
  b = make_score_fn(model_fn, sde, continuous=True)(x, t)
  np.testing.assert_array_equal(a, b)


def test_ve_continuous_labels_are_sigma():
  sde = sde_lib.VESDE()
  # Data N(0, I): score of N(0, (1 + sigma^2) I).
  model_fn = lambda x, sigma: -x / (1.0 + sigma[:, None] ** 2)
  x, t = _x(), jnp.asarray(T_VALUES)
  score = make_score_fn(model_fn, sde, continuous=True)(x, t)
  sigma = 0.01 * (50 / 0.01) ** T_VALUES.astype(np.float64)
  np.testing.assert_allclose(score, -x / (1 + sigma[:, None] ** 2), rtol=1e-5)


def test_ve_discrete_labels_index_descending_sigmas():
  sde = sde_lib.VESDE()
  seen = {}

  def model_fn(x, labels):
    seen['labels'] = labels
    return x

  x = _x()
  score = make_score_fn(model_fn, sde, continuous=False)(x, jnp.asarray(T_VALUES))
  np.testing.assert_array_equal(score, x)
  np.testing.assert_array_equal(seen['labels'], np.round((1 - T_VALUES) * 999).astype(np.int32))
  assert seen['labels'].dtype == jnp.int32
