"""Class-conditional networks (`model.num_classes > 0`) and their training loss with label
dropout (classifier-free guidance): a zero-initialised class embedding, "no class" as label
K, unconditional networks unchanged, and the loss's label dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models_networks import _small_config, random_variables

from scorejax import losses
from scorejax import sde as sde_lib
from scorejax.models import make_model

NETWORKS = {
    'ncsnpp': _small_config(),
    'ddpm': {'model': {'name': 'ddpm', 'nf': 32, 'ch_mult': (1, 2), 'num_res_blocks': 1,
                       'attn_resolutions': (4,), 'dropout': 0.0},
             'data': {'image_size': 8, 'num_channels': 3, 'centered': True}},
    'mlp': {'model': {'name': 'mlp', 'hidden': 16, 'num_layers': 1, 'embedding_dim': 16}},
}


def _conditional(name, num_classes=4):
  config = {k: dict(v) for k, v in NETWORKS[name].items()}
  config['model']['num_classes'] = num_classes
  return make_model(config)


@pytest.mark.parametrize('name', [  # NCSN++ slow: DDPM and the MLP check the same embedding
    pytest.param('ncsnpp', marks=pytest.mark.slow), 'ddpm', 'mlp'])
def test_class_embedding_conditions_the_network(name):
  model = _conditional(name)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3) if name != 'mlp' else (4, 2))
  labels = jnp.array([0.3, 0.5, 0.7, 0.9]) * (999.0 if name != 'ncsnpp' else 1.0)
  variables = jax.jit(model.init)(jax.random.key(1), x, labels)
  table = variables['params']['class_embedding']['embedding']
  assert table.shape[0] == 5 and not np.any(np.asarray(table))  # K + 1 rows, zero at start
  apply = jax.jit(lambda v, y: model.apply(v, x, labels, class_labels=y))
  # A new conditional network is its unconditional self for every label.
  np.testing.assert_array_equal(apply(variables, jnp.array([0, 1, 2, 3])),
                                apply(variables, None))
  trained = random_variables(model, x, labels)
  classes = jnp.array([0, 1, 2, 3])
  out = apply(trained, classes)
  # Each example's output depends on its own label; None is label K ("no class").
  other = apply(trained, jnp.array([1, 1, 2, 3]))
  assert float(jnp.abs(out[0] - other[0]).max()) > 1e-6
  np.testing.assert_array_equal(out[1:], other[1:])
  np.testing.assert_array_equal(apply(trained, None), apply(trained, jnp.full((4,), 4)))


@pytest.mark.parametrize('name', sorted(NETWORKS))
def test_unconditional_networks_have_no_class_parameters(name):
  model = make_model(NETWORKS[name])
  x = jnp.zeros((1, 8, 8, 3) if name != 'mlp' else (1, 2))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, jnp.ones((1,)))
  assert 'class_embedding' not in shapes['params']
  with pytest.raises(ValueError, match='network without classes'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.ones((1,)),
                                      class_labels=jnp.zeros((1,), jnp.int32)))


def test_bad_class_settings():
  with pytest.raises(ValueError, match='model.num_classes must be >= 0'):
    _conditional('mlp', -1)
  config = _small_config(conditional=False)
  config['model']['num_classes'] = 3
  with pytest.raises(ValueError, match='needs config.model.conditional=True'):
    make_model(config)
  with pytest.raises(ValueError, match=r'class_dropout must be in \[0, 1\]'):
    losses.make_loss_fn(sde_lib.VPSDE(), _conditional('mlp'), train=True, class_dropout=1.5)


def test_loss_drops_labels_to_no_class():
  """class_dropout = 1 is the unconditional loss (a batch without labels); 0 uses every
  label; in between, each label survives with probability 1 - p (seen through a network
  whose output is its class embedding)."""
  sde = sde_lib.VPSDE()
  model = _conditional('mlp')
  x = jax.random.normal(jax.random.key(0), (256, 2))
  y = jax.random.randint(jax.random.key(1), (256,), 0, 4)
  params = dict(random_variables(model, x[:1], jnp.ones((1,)))['params'])
  # A class embedding of the time embedding's scale, so that labels visibly move the loss.
  params['class_embedding'] = {'embedding': jax.random.normal(jax.random.key(4), (5, 16))}
  loss = lambda p, batch: losses.make_loss_fn(sde, model, train=True, class_dropout=p)(
      params, jax.random.key(2), batch)[0]
  with_labels, without = {'image': x, 'label': y}, {'image': x}
  np.testing.assert_allclose(loss(1.0, with_labels), loss(0.0, without), rtol=1e-6)
  # (small weights: the network adds ~1e-4 to a loss of ~1, all of it deterministic)
  assert abs(float(loss(0.0, with_labels)) - float(loss(1.0, with_labels))) > 1e-6
  # The unconditional network ignores labels.
  plain = make_model(NETWORKS['mlp'])
  plain_params = random_variables(plain, x[:1], jnp.ones((1,)))['params']
  plain_loss = lambda batch: losses.make_loss_fn(sde, plain, train=True, class_dropout=0.5)(
      plain_params, jax.random.key(2), batch)[0]
  np.testing.assert_array_equal(plain_loss(with_labels), plain_loss(without))
  # The dropped fraction: labels replaced by K with probability p.
  dropped = losses._dropped_labels(jax.random.key(3), y.repeat(40), 10240, 4, 0.3)
  fraction = float(jnp.mean(dropped == 4))
  assert abs(fraction - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 10240)
  np.testing.assert_array_equal(dropped[dropped != 4], y.repeat(40)[dropped != 4])
