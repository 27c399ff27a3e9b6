"""The MLP score network for low-dimensional data, through make_model."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scorejax.models import make_model


def _config(**model):
  return ml_collections.ConfigDict({'model': {'name': 'mlp', 'hidden': 16, **model}})


@pytest.mark.parametrize('embedding_type', ['positional', 'fourier'])
def test_mlp_shapes_and_determinism(embedding_type):
  model = make_model(_config(embedding_type=embedding_type, num_layers=2))
  x = jax.random.normal(jax.random.key(1), (4, 2))
  labels = jnp.array([0.1, 1.0, 5.0, 40.0])
  variables = model.init(jax.random.key(0), x, labels)
  out = model.apply(variables, x, labels, train=False)
  assert out.shape == (4, 2)
  again = make_model(_config(embedding_type=embedding_type, num_layers=2)).init(
      jax.random.key(0), x, labels)
  np.testing.assert_array_equal(model.apply(again, x, labels), out)
  # The label conditions the output.
  assert not np.allclose(model.apply(variables, x, labels[::-1]), out)


def test_mlp_scale_by_sigma_divides_output():
  x = jax.random.normal(jax.random.key(1), (3, 2))
  labels = jnp.array([0.5, 2.0, 8.0])
  plain, scaled = make_model(_config()), make_model(_config(scale_by_sigma=True))
  variables = plain.init(jax.random.key(0), x, labels)
  np.testing.assert_allclose(
      scaled.apply(variables, x, labels), plain.apply(variables, x, labels) / labels[:, None],
      rtol=1e-6)


def test_mlp_fourier_weights_get_no_gradient():
  model = make_model(_config(embedding_type='fourier'))
  x, labels = jnp.ones((2, 2)), jnp.array([1.0, 3.0])
  params = model.init(jax.random.key(0), x, labels)['params']
  grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x, labels) ** 2))(params)
  np.testing.assert_array_equal(grads['fourier_projection']['W'], 0.0)
  assert np.any(np.asarray(grads['input']['kernel']) != 0)


def test_unknown_model_name_lists_valid_ones():
  with pytest.raises(ValueError, match='valid choices'):
    make_model({'model': {'name': 'nope'}})
