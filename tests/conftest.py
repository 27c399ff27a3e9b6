"""Shared test fixtures: float32 precision set high, golden data paths, a tiny tfds cifar10."""

import io
import json
import os
import pathlib
import shutil

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

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


# ----------------------------------------------------------------------------- tfds


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  buffer.seek(0)
  return buffer


def tiny_cifar_images(split):
  """The uint8 images of the tiny cifar10 fixture's split (12 train, 4 test)."""
  rng = np.random.default_rng({'train': 0, 'test': 1}[split])
  return rng.integers(0, 256, ({'train': 12, 'test': 4}[split], 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope='session')
def tiny_cifar10_dir(tmp_path_factory):
  """A 12 + 4 image dataset prepared by tfds in array_record format, laid out as cifar10.

  It is written by a builder with cifar10's features (PNG-encoded images, so no TensorFlow
  is needed) and then renamed to cifar10's name and version, so `make_dataset('cifar10')`
  runs the real `tfds.builder -> is_prepared -> data_source -> grain` path on it.
  """
  import tensorflow_datasets as tfds

  class TinyCifarForScorejax(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('3.0.2')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'id': tfds.features.Text(),
          'image': tfds.features.Image(shape=(32, 32, 3)),
          'label': tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in ('train', 'test')}

    def _generate_examples(self, split):
      for i, image in enumerate(tiny_cifar_images(split)):
        yield i, {'id': f'{split}_{i}', 'image': _png(image), 'label': i % 10}

  root = tmp_path_factory.mktemp('tfds')
  builder = TinyCifarForScorejax(data_dir=str(root / 'build'), file_format='array_record')
  builder.download_and_prepare()
  source = pathlib.Path(builder.data_dir)
  target = root / 'data' / 'cifar10' / '3.0.2'
  target.mkdir(parents=True)
  for path in source.iterdir():
    shutil.copy(path, target / path.name.replace(builder.name, 'cifar10'))
  info = json.loads((target / 'dataset_info.json').read_text())
  info['name'] = 'cifar10'
  (target / 'dataset_info.json').write_text(json.dumps(info))
  return str(root / 'data')
