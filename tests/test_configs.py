"""Every `configs/*.py` builds: SDE, network (shapes only), optimizer, sampler, loss."""

import pathlib

import jax
import numpy as np
import pytest

from scorejax import run_common, run_train
from scorejax.models import make_model
from tests.test_main import load_config

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / 'configs').glob(
    '*.py') if p.stem != 'cifar10_common')

# Parameter counts of score_sde's networks, as the reference reports them.
REFERENCE_COUNTS = {
    've_cifar': 62_758_915,  # NCSN++ cont.
    've_cifar_deep': 107_587_075,  # NCSN++ cont. deep
    'vp_cifar': 61_804_419,  # DDPM++ cont.
    'vp_cifar_deep': 106_632_579,  # DDPM++ cont. deep
    've_celebahq256': 65_574_549,  # NCSN++ CelebA-HQ 256
}


def test_every_config_is_listed():
  assert set(REFERENCE_COUNTS) <= set(CONFIGS) and {'default', 'smoke', 'toy2d'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds(name):
  config = load_config(name)
  sde = run_common.make_sde(config)
  assert sde.N == config.model.num_scales
  model = make_model(config)
  shape = run_common.element_shape(config)
  # jax.eval_shape: traces the initialisation, allocates and computes nothing.
  params = jax.eval_shape(lambda k: run_common.init_params(model, k, shape), jax.random.key(0))
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert count > 0
  if name in REFERENCE_COUNTS:
    assert count == REFERENCE_COUNTS[name]
  run_train.make_optimizer_from_config(config)
  run_common.make_sampler(config, model, sde, (2, *shape))  # checks the sampler's names
  loss_fn = run_common.make_loss_fn(config, model, sde)
  batch = {'image': jax.ShapeDtypeStruct((2, *shape), np.float32)}
  loss, _ = jax.eval_shape(loss_fn, jax.random.key(0), params, batch)
  assert loss.shape == ()
