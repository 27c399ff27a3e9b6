"""Dropout with fused Threefry bits: the same bits / masks as JAX and Flax, no loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scorejax.models.dropout import Dropout, bernoulli_mask, threefry_bits


@pytest.mark.parametrize('shape', [(7,), (2, 3, 5), (4, 8, 8, 16)])
@pytest.mark.parametrize('seed', [0, 12345])
def test_bits_equal_jax_random_bits(shape, seed):
  key = jax.random.fold_in(jax.random.key(seed), 7)
  np.testing.assert_array_equal(jax.jit(threefry_bits, static_argnums=1)(key, shape),
                                jax.random.bits(key, shape))
  raw = jax.random.PRNGKey(seed)  # legacy uint32[2] keys too
  np.testing.assert_array_equal(threefry_bits(raw, shape), jax.random.bits(raw, shape))


def test_mask_equals_bernoulli_and_other_key_types_fall_back():
  key = jax.random.key(3)
  np.testing.assert_array_equal(bernoulli_mask(key, 0.9, (64, 33)),
                                jax.random.bernoulli(key, 0.9, (64, 33)))
  rbg = jax.random.key(3, impl='rbg')
  np.testing.assert_array_equal(bernoulli_mask(rbg, 0.9, (64, 33)),
                                jax.random.bernoulli(rbg, 0.9, (64, 33)))
  with pytest.raises(ValueError, match='threefry2x32 key'):
    threefry_bits(rbg, (3,))


class _Net(nn.Module):
  ours: bool

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(16)(x)
    drop = Dropout(0.3) if self.ours else nn.Dropout(0.3)
    x = drop(x, deterministic=not train)
    return nn.Dense(4)(jax.nn.relu(x))


def test_module_draws_the_masks_of_flax_dropout():
  x = jax.random.normal(jax.random.key(0), (32, 8))
  variables = _Net(False).init(jax.random.key(1), x, False)
  rngs = {'dropout': jax.random.key(2)}
  ours = _Net(True).apply(variables, x, True, rngs=rngs)
  np.testing.assert_array_equal(ours, _Net(False).apply(variables, x, True, rngs=rngs))
  assert not np.allclose(ours, _Net(True).apply(variables, x, False))
  np.testing.assert_array_equal(_Net(True).apply(variables, x, False),
                                _Net(False).apply(variables, x, False))


def test_mask_compiles_without_a_loop():
  """What makes it fast on CPU: JAX's own bits are a `while` loop there."""
  lowered = jax.jit(lambda k: bernoulli_mask(k, 0.9, (8, 32, 32, 128))).lower(jax.random.key(0))
  assert ' while(' not in lowered.compile().as_text()


def test_keep_fraction_matches_rate():
  mask = bernoulli_mask(jax.random.key(5), 0.9, (200_000,))
  # Binomial: std of the fraction = sqrt(0.09 / 2e5) = 6.7e-4; 5 sigma.
  assert abs(float(jnp.mean(mask)) - 0.9) < 5 * 6.7e-4


@pytest.mark.slow  # the module-level test above checks the masks in the default set
def test_network_in_train_mode_equals_flax_dropout(monkeypatch):
  """The U-Net's residual dropout draws the masks `nn.Dropout` would (same rng stream)."""
  import json

  from scorejax.models import blocks, make_model
  from tests.conftest import DATA_DIR

  config = json.loads((DATA_DIR / 'ddpmpp_small_config.json').read_text())
  config['model'].update(num_res_blocks=1, attn_resolutions=[], ch_mult=[1, 2])
  model = make_model(config)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  labels = jnp.array([10.0, 500.0])
  variables = jax.jit(model.init)(jax.random.key(1), x, labels)
  # init_scale=0 zeroes the conv after the dropout: perturb every weight.
  variables = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape),
                           variables)
  # A new function per call: jit traces again after the monkeypatch.
  apply = lambda: jax.jit(lambda v: model.apply(v, x, labels, train=True,
                                                rngs={'dropout': jax.random.key(2)}))(variables)
  ours = apply()
  monkeypatch.setattr(blocks, 'Dropout', nn.Dropout)
  np.testing.assert_allclose(ours, apply(), rtol=1e-6, atol=1e-6)
  eval_out = jax.jit(lambda v: model.apply(v, x, labels, train=False))(variables)
  assert not np.allclose(ours, eval_out, atol=1e-4)
