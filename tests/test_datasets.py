"""Input pipelines: values, determinism, per-host sharding, resuming, and the real tfds /
image-folder code paths on tiny data written into tmp_path."""

import json
import shutil
import time

import jax
import numpy as np
import pytest
from conftest import tiny_cifar_images
from PIL import Image
from sklearn.datasets import load_digits

from scorejax import datasets, digits_classifier, image_sources, toy_data

# ----------------------------------------------------------------------------- scalers


@pytest.mark.parametrize('centered', [False, True])
def test_scalers_round_trip_and_range(centered):
  x = np.linspace(0.0, 1.0, 11, dtype=np.float32)
  scaled = datasets.get_data_scaler(centered)(x)
  np.testing.assert_allclose(scaled[[0, -1]], [-1.0, 1.0] if centered else [0.0, 1.0])
  np.testing.assert_allclose(datasets.get_data_inverse_scaler(centered)(scaled), x, atol=1e-7)


# ----------------------------------------------------------------------------- toys


@pytest.mark.parametrize('name', sorted(toy_data.TOYS))
def test_toy_sampling_is_deterministic(name):
  toy = toy_data.make_toy(name)
  x = toy.sample(0, 64)
  assert x.shape == (64, 2) and x.dtype == np.float32
  np.testing.assert_array_equal(x, toy.sample(0, 64))
  assert not np.array_equal(x, toy.sample(1, 64))
  key = jax.random.key(3)
  np.testing.assert_array_equal(toy.sample(key, 8), toy.sample(key, 8))


@pytest.mark.parametrize('name', sorted(toy_data.TOYS))
def test_toy_log_prob_is_normalised_and_matches_samples(name):
  """The density integrates to 1, and its cell masses match a histogram of samples.

  With n = 40000 samples in K = 100 cells the total-variation distance between empirical
  and true cell masses is ~0.01 from sampling noise alone (measured 0.006-0.014 over seeds;
  the seed is fixed, so the test is deterministic). 0.02 rejects a wrong sampler or density:
  8 Gaussians at radius 2.3 instead of 2 gives 0.25, mixture weights (.4, .4, .2) instead of
  (.5, .3, .2) 0.10, a checkerboard board of half-width 4.5 instead of 4 0.30, moons with
  noise std 0.15 instead of 0.1 0.022.
  """
  toy = toy_data.make_toy(name)
  bound, coarse, fine = 5.0, 10, 8
  _, _, logp = toy_data.log_prob_grid(toy, bound, coarse * fine)
  cell_area = (2 * bound / (coarse * fine)) ** 2
  density = np.exp(logp) * cell_area
  assert density.sum() == pytest.approx(1.0, abs=2e-3)
  masses = density.reshape(coarse, fine, coarse, fine).sum(axis=(1, 3))  # [y, x]
  x = toy.sample(123, 40000)
  hist, _, _ = np.histogram2d(x[:, 1], x[:, 0], bins=coarse, range=[[-bound, bound]] * 2)
  tv = 0.5 * np.abs(hist / len(x) - masses).sum()
  assert tv < 0.02
  assert np.all(np.isfinite(np.asarray(toy.log_prob(x[:100]))))


def test_checkerboard_support_and_closed_forms():
  board = toy_data.Checkerboard()
  logp = np.asarray(board.log_prob(np.array([[-3.0, -3.0], [-1.0, -3.0], [1.0, 1.0]])))
  np.testing.assert_allclose(logp, [-np.log(32.0), -np.inf, -np.log(32.0)])
  gaussians = toy_data.eight_gaussians(radius=2.0, std=0.2)
  # At a centre the other seven components are >= 7.6 std away: negligible.
  expected = np.log(1 / 8) - np.log(2 * np.pi * 0.2**2)
  np.testing.assert_allclose(gaussians.log_prob(np.array([[2.0, 0.0]])), [expected], rtol=1e-6)


def test_unknown_toy_lists_choices():
  with pytest.raises(ValueError, match='checkerboard'):
    toy_data.make_toy('spiral')


# ----------------------------------------------------------------------------- digits


def test_digits_split_scale_and_upsampling():
  raw = load_digits().images
  train = image_sources.digits_images('train')
  test = image_sources.digits_images('test', image_size=8)
  assert train.shape == (1500, 8, 8, 1) and test.shape == (297, 8, 8, 1)
  np.testing.assert_array_equal(test[..., 0], raw[1500:])
  big = image_sources.digits_images('train', image_size=16)
  np.testing.assert_array_equal(big[:, ::2, ::2], train)
  np.testing.assert_array_equal(big[:, 1::2, 1::2], train)
  with pytest.raises(ValueError, match='multiples of 8'):
    image_sources.digits_images('train', image_size=12)

  ds = datasets.make_dataset('digits', split='test', batch_size=4, image_size=8, shuffle=False,
                             num_threads=0)
  assert ds.element_shape == (8, 8, 1) and ds.num_examples == 297 and ds.num_levels == 17
  np.testing.assert_allclose(ds.batch_at(1)['image'][..., 0], raw[1504:1508] / 16.0, atol=1e-7)


def test_dequantization_keeps_levels_and_centering_maps_to_unit_interval():
  kwargs = dict(split='test', batch_size=8, image_size=8, shuffle=False, num_threads=0)
  plain = datasets.make_dataset('digits', **kwargs).batch_at(0)['image']
  deq = datasets.make_dataset('digits', uniform_dequantization=True, centered=True,
                              **kwargs).batch_at(0)['image']
  assert deq.min() >= -1.0 and deq.max() < 1.0
  levels = np.floor((deq + 1.0) / 2.0 * 17.0)  # (v + u) / 17 with u in [0, 1) -> v
  np.testing.assert_array_equal(levels, np.round(plain * 16.0))
  assert np.std((deq + 1.0) / 2.0 * 17.0 - levels) > 0.2  # uniform noise: std 0.29


# ----------------------------------------------------------------------------- determinism


def _image_kwargs(**overrides):
  kwargs = dict(split='train', batch_size=8, image_size=8, random_flip=True,
                uniform_dequantization=True, centered=True, seed=7, num_threads=0)
  kwargs.update(overrides)
  return kwargs


@pytest.mark.parametrize('name', ['digits', 'two_moons'])
def test_process_shards_concatenate_to_the_global_batch(name):
  single = datasets.make_dataset(name, **_image_kwargs())
  shards = [datasets.make_dataset(name, process_index=i, process_count=4, **_image_kwargs())
            for i in range(4)]
  assert shards[0].host_batch_size == 2
  for step in (0, 3, 187, 250):  # 187 straddles the first two epochs of the 1500 digits
    together = np.concatenate([shard.batch_at(step)['image'] for shard in shards])
    np.testing.assert_array_equal(together, single.batch_at(step)['image'])
  with pytest.raises(ValueError, match='divisible'):
    datasets.make_dataset(name, process_index=0, process_count=3, **_image_kwargs())


@pytest.mark.parametrize('name', ['digits', 'checkerboard'])
def test_batches_are_a_function_of_seed_and_step(name):
  a = datasets.make_dataset(name, **_image_kwargs())
  b = datasets.make_dataset(name, **_image_kwargs())
  other = datasets.make_dataset(name, **_image_kwargs(seed=8))
  np.testing.assert_array_equal(a.batch_at(5)['image'], b.batch_at(5)['image'])
  assert not np.array_equal(a.batch_at(5)['image'], a.batch_at(6)['image'])
  assert not np.array_equal(a.batch_at(5)['image'], other.batch_at(5)['image'])
  test = datasets.make_dataset(name, **_image_kwargs(split='test'))
  assert not np.array_equal(a.batch_at(0)['image'][0], test.batch_at(0)['image'][0])


def test_each_epoch_is_a_new_permutation_of_the_split():
  ds = datasets.make_dataset('digits', split='test', batch_size=9, image_size=8, seed=1,
                             num_epochs=2, num_threads=2)
  assert ds.num_steps == 66
  batches = np.concatenate([batch['image'] for batch in ds]).reshape(2, 297, 64)
  reference = image_sources.digits_images('test').reshape(297, 64) / 16.0
  for epoch in batches:
    np.testing.assert_allclose(np.unique(epoch, axis=0), np.unique(reference, axis=0),
                               atol=1e-7)
    assert len(np.unique(epoch, axis=0)) == len(np.unique(reference, axis=0))
  assert not np.array_equal(batches[0], batches[1])
  assert not np.array_equal(batches[0], reference.astype(np.float32))
  with pytest.raises(IndexError):
    ds.batch_at(66)


def test_position_uniforms_are_uniform_and_keyed_by_position():
  """100k draws: mean and bin masses within ~5 standard errors of U[0, 1) (se 0.0009 for
  the mean, 0.00095 for a bin of mass 0.1); rows depend on the position only."""
  positions = np.arange(1000, 2000, dtype=np.int64)
  u = datasets.position_uniforms(7, 2, positions, 100)
  assert u.dtype == np.float32 and u.shape == (1000, 100)
  assert u.min() >= 0.0 and u.max() < 1.0
  assert abs(u.mean() - 0.5) < 0.005
  np.testing.assert_allclose(np.histogram(u, bins=10, range=(0, 1))[0] / u.size, 0.1, atol=0.005)
  assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 0.02
  np.testing.assert_array_equal(datasets.position_uniforms(7, 2, positions[::-1], 100), u[::-1])
  for other in (datasets.position_uniforms(8, 2, positions, 100),
                datasets.position_uniforms(7, 1, positions, 100)):
    assert abs(np.corrcoef(u.ravel(), other.ravel())[0, 1]) < 0.02


def test_flip_is_a_horizontal_mirror_of_the_same_image():
  kwargs = _image_kwargs(uniform_dequantization=False, centered=False, batch_size=64)
  plain = datasets.make_dataset('digits', **{**kwargs, 'random_flip': False}).batch_at(2)
  flipped = datasets.make_dataset('digits', **kwargs).batch_at(2)
  same = np.all(plain['image'] == flipped['image'], axis=(1, 2, 3))
  mirrored = np.all(plain['image'][:, :, ::-1] == flipped['image'], axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert 10 < np.sum(mirrored & ~same) < 54  # about half of 64 are flipped


def test_iterator_resumes_at_the_exact_batch():
  ds = datasets.make_dataset('digits', **_image_kwargs(num_threads=2))
  iterator = ds.iterator()
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  assert state == {'step': 3}
  expected = [next(iterator)['image'] for _ in range(2)]
  resumed = ds.iterator()
  resumed.set_state(json.loads(json.dumps(state)))  # states survive a JSON checkpoint
  for batch in expected:
    np.testing.assert_array_equal(next(resumed)['image'], batch)
  np.testing.assert_array_equal(next(ds.iterator(start_step=5))['image'],
                                ds.batch_at(5)['image'])


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="valid choices: .*cifar10.*digits"):
    datasets.make_dataset('mnist', split='train', batch_size=4)
  with pytest.raises(ValueError, match='split'):
    datasets.make_dataset('digits', split='validation', batch_size=4, image_size=8)
  with pytest.raises(ValueError, match='num_channels'):
    datasets.make_dataset('digits', split='train', batch_size=4, image_size=8, num_channels=3)


# ----------------------------------------------------------------------------- tfds


def test_unprepared_tfds_dataset_fails_fast_without_writing(tmp_path):
  data_dir = tmp_path / 'tfds'
  start = time.monotonic()
  with pytest.raises(datasets.DatasetNotPreparedError, match='tfds build cifar10') as error:
    datasets.make_dataset('cifar10', split='train', batch_size=4, data_dir=str(data_dir))
  assert time.monotonic() - start < 30  # a download attempt retries for minutes offline
  assert 'data.data_dir' in str(error.value)
  assert not data_dir.exists() and list(tmp_path.iterdir()) == []


def test_tfds_cifar10_reads_the_prepared_array_records(tiny_cifar10_dir):
  ds = datasets.make_dataset('cifar10', split='eval', batch_size=4, image_size=32,
                             shuffle=False, data_dir=tiny_cifar10_dir, num_epochs=1,
                             num_channels=3)
  assert ds.num_examples == 4 and ds.num_steps == 1 and ds.element_shape == (32, 32, 3)
  (batch,) = list(ds)
  # tfds stores examples in a hashed order: compare the images as a set, bit for bit.
  read = np.round(batch['image'] * 255.0).reshape(4, -1)
  np.testing.assert_allclose(batch['image'] * 255.0, np.round(batch['image'] * 255.0), atol=1e-4)
  np.testing.assert_array_equal(np.unique(read, axis=0),
                                np.unique(tiny_cifar_images('test').reshape(4, -1), axis=0))

  kwargs = dict(split='train', batch_size=4, image_size=16, data_dir=tiny_cifar10_dir,
                random_flip=True, uniform_dequantization=True, seed=2, num_threads=0)
  single = datasets.make_dataset('cifar10', **kwargs)
  assert single.element_shape == (16, 16, 3)
  shards = [datasets.make_dataset('cifar10', process_index=i, process_count=2, **kwargs)
            for i in range(2)]
  for step in (0, 4):  # step 4 is in the second epoch of 12 images
    together = np.concatenate([shard.batch_at(step)['image'] for shard in shards])
    np.testing.assert_array_equal(together, single.batch_at(step)['image'])
  assert single.batch_at(4)['image'].shape == (4, 16, 16, 3) and single.num_levels == 256
  with pytest.raises(ValueError, match="valid choices: \\['test', 'train'\\]"):
    datasets.make_dataset('cifar10', split='validation', batch_size=4,
                          data_dir=tiny_cifar10_dir)


def test_tfds_labels_follow_their_images(tiny_cifar10_dir):
  """`with_labels`: each row's label is the one stored with its image (label = index % 10)."""
  ds = datasets.make_dataset('cifar10', split='train', batch_size=6, image_size=32, seed=3,
                             data_dir=tiny_cifar10_dir, num_threads=0, with_labels=True)
  assert ds.num_classes == 10
  stored = tiny_cifar_images('train').reshape(12, -1).astype(np.float32)
  for step in (0, 3):
    batch = ds.batch_at(step)
    assert batch['label'].dtype == np.int32 and batch['label'].shape == (6,)
    read = np.round(batch['image'] * 255.0).reshape(6, -1)
    index = [int(np.flatnonzero((stored == row).all(1))[0]) for row in read]
    np.testing.assert_array_equal(batch['label'], np.asarray(index) % 10)
  # Without the flag batches are unchanged.
  plain = datasets.make_dataset('cifar10', split='train', batch_size=6, image_size=32, seed=3,
                                data_dir=tiny_cifar10_dir, num_threads=0)
  assert set(plain.batch_at(0)) == {'image'} and plain.num_classes is None
  np.testing.assert_array_equal(plain.batch_at(3)['image'], ds.batch_at(3)['image'])


def test_digits_labels_and_unlabelled_datasets():
  ds = datasets.make_dataset('digits', split='test', batch_size=32, image_size=8, shuffle=False,
                             num_epochs=1, with_labels=True)
  images, labels = digits_classifier.digits_with_labels('test')
  batch = ds.batch_at(1)
  np.testing.assert_array_equal(batch['label'], labels[32:64])
  np.testing.assert_allclose(batch['image'], images[32:64], atol=1e-6)
  for name in ('two_moons', 'image_folder'):
    with pytest.raises(ValueError, match=r"has no class labels; labelled datasets: \['cifar10'"):
      datasets.make_dataset(name, split='train', batch_size=4, with_labels=True, data_dir='x')


def test_tfds_dataset_in_tfrecord_format_is_refused(tiny_cifar10_dir, tmp_path):
  data_dir = tmp_path / 'data'
  shutil.copytree(tiny_cifar10_dir, data_dir)
  info_path = data_dir / 'cifar10' / '3.0.2' / 'dataset_info.json'
  info = json.loads(info_path.read_text())
  info['fileFormat'] = 'tfrecord'
  info_path.write_text(json.dumps(info))
  with pytest.raises(datasets.DatasetNotPreparedError, match='--file_format=array_record'):
    datasets.make_dataset('cifar10', split='train', batch_size=4, data_dir=str(data_dir))


# ----------------------------------------------------------------------------- folders


def test_resize_ops_follow_score_sde():
  image = np.arange(218 * 178 * 3, dtype=np.int64).reshape(218, 178, 3) % 251
  image = image.astype(np.uint8)
  crop = image_sources.central_crop(image, 140)
  np.testing.assert_array_equal(crop, image[39:179, 19:159])
  assert image_sources.crop_140_resize(image, 64).shape == (64, 64, 3)
  assert image_sources.resize_small(image, 64).shape == (78, 64, 3)
  assert image_sources.resize_small_crop(image, 64).shape == (64, 64, 3)
  flat = np.full((40, 60, 3), 77, np.uint8)  # a constant image stays constant
  np.testing.assert_array_equal(image_sources.resize_small_crop(flat, 20), 77)


def test_image_folder_dataset(tmp_path):
  rng = np.random.default_rng(0)
  images = {}
  for i, shape in enumerate([(16, 16, 3), (20, 16, 3), (16, 24), (16, 16, 3)]):
    images[i] = rng.integers(0, 256, shape, dtype=np.uint8)
    folder = tmp_path / ('a' if i < 2 else 'b')
    folder.mkdir(exist_ok=True)
    Image.fromarray(images[i]).save(folder / f'{i}.png')
  (tmp_path / 'test').mkdir()
  Image.fromarray(images[0]).save(tmp_path / 'test' / 'only.jpg')
  ds = datasets.make_dataset('lsun', split='train', batch_size=4, image_size=16, shuffle=False,
                             data_dir=str(tmp_path), num_epochs=1, num_threads=0)
  assert ds.num_examples == 4 and ds.element_shape == (16, 16, 3)
  batch = ds.batch_at(0)['image']
  np.testing.assert_allclose(batch[0], images[0] / 255.0, atol=1e-7)
  np.testing.assert_allclose(batch[2], np.repeat(images[2][:, 4:20, None], 3, -1) / 255.0,
                             atol=1e-7)  # grayscale -> RGB, centre crop of the wide image
  test = datasets.make_dataset('lsun', split='eval', batch_size=1, image_size=16,
                               data_dir=str(tmp_path), num_threads=0)
  assert test.num_examples == 1 and test.batch_at(0)['image'].shape == (1, 16, 16, 3)
  with pytest.raises(datasets.DatasetNotPreparedError, match='does not exist'):
    datasets.make_dataset('ffhq', split='train', batch_size=1, data_dir=str(tmp_path / 'x'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(datasets.DatasetNotPreparedError, match='no image files'):
    datasets.make_dataset('ffhq', split='train', batch_size=1, data_dir=str(tmp_path / 'empty'))
