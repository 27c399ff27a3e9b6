"""Shared test fixtures: float32 precision set high, golden data paths."""

import os
import pathlib

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

DATA_DIR = pathlib.Path(__file__).parent / 'data'


def counted(score_fn):
  """`(score_fn with a host-side call counter, the list it appends to)`.

  `jax.debug.callback` runs once per actual evaluation, also inside compiled loops; call
  `jax.effects_barrier()` before reading the count.
  """
  calls = []

  def counting_score_fn(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return score_fn(x, t)

  return counting_score_fn, calls


def nchw_to_nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope='session')
def sde_golden():
  return dict(np.load(DATA_DIR / 'sde_values.npz'))


@pytest.fixture(scope='session')
def sampler_loss_golden():
  return dict(np.load(DATA_DIR / 'sampler_loss_values.npz'))
