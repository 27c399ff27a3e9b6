"""Input pipelines: deterministic, resumable, per-host batches for every dataset.

Owns the data scalers and the one factory the drivers call, `make_dataset(name, ...)`,
which returns a `Dataset` of per-host numpy batches `{'image': float32 [B_host, H, W, C]}`
(images) or `{'image': float32 [B_host, 2]}` (2-D toys); `with_labels=True` adds the class
of each image, `'label': int32 [B_host]` (digits, and tfds datasets with a class label).
Sources live in `image_sources.py` (tfds, image folders, digits) and `toy_data.py` (2-D toys).

Determinism: the batch of global step `s` is a pure function of `(seed, s)`; with `n`
processes of the same global batch size `B`, process `i` gets rows `[i B / n, (i + 1) B / n)`
of that global batch. Row `r` of step `s` is stream position `p = s B + r`; position `p`
reads example `perm_e[p mod N]` of epoch `e = p // N` (a fresh permutation per epoch, a
function of `(seed, e)`) and draws its flip and dequantization noise from a counter-based
hash of `(seed, p)`. So `batch_at(step)` needs no state and is vectorised over the batch,
and resuming is `dataset.iterator(start_step=step)` (or `iterator.set_state({'step':
step})`). Iterating prefetches whole batches in a few grain threads (`MapDataset.range ->
map(batch_at) -> to_iter_dataset`) without changing the order. (grain's per-element
`shuffle` / `random_map` cost ~0.1-0.4 ms per example here, a batch of 128 ~40 ms, hence the
vectorised sampler.)

Values: images are scaled to `[0, 1]` (or `[-1, 1]` when `centered`, i.e. already passed
through `get_data_scaler(centered)`: drivers must not scale again); with
`uniform_dequantization` each integer level `v` of `L` levels becomes `(v + u) / L`,
`u ~ U[0, 1)`. Toys are in their natural coordinates (no scaling, no augmentation).

References:
  Song et al. 2021, ICLR, Appendix H; `score_sde/datasets.py` (`get_data_scaler`,
  `get_data_inverse_scaler`, `preprocess_fn`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Callable, Iterator

import grain
import jax
import numpy as np

from scorejax import image_sources, toy_data
from scorejax.image_sources import DatasetNotPreparedError

__all__ = ['DATASETS', 'Dataset', 'BatchIterator', 'DatasetNotPreparedError', 'make_dataset',
           'labelled_datasets', 'get_data_scaler', 'get_data_inverse_scaler', 'position_uniforms']

Batch = dict[str, np.ndarray]


def get_data_scaler(centered: bool) -> Callable:
  """Maps data in `[0, 1]` to the model's range: `[-1, 1]` if `centered`, else unchanged."""
  if centered:
    return lambda x: x * 2.0 - 1.0
  return lambda x: x


def get_data_inverse_scaler(centered: bool) -> Callable:
  """Inverse of `get_data_scaler(centered)`: maps model-range data back to `[0, 1]`."""
  if centered:
    return lambda x: (x + 1.0) / 2.0
  return lambda x: x


# tfds datasets: name -> (tfds name, {split alias -> tfds split}, resize function).
_TFDS = {
    'cifar10': ('cifar10', {'eval': 'test'}, image_sources.resize_square),
    'svhn': ('svhn_cropped', {'eval': 'test'}, image_sources.resize_square),
    'celeba': ('celeb_a', {'eval': 'validation'}, image_sources.crop_140_resize),
}
_FOLDERS = ('image_folder', 'lsun', 'celebahq', 'ffhq')

DATASETS = {
    **{name: 'toy' for name in toy_data.TOYS},
    'digits': 'embedded',
    **{name: 'tfds' for name in _TFDS},
    **{name: 'image_folder' for name in _FOLDERS},
}


def labelled_datasets() -> list[str]:
  """The datasets whose images carry class labels (`make_dataset(..., with_labels=True)`)."""
  return sorted(['digits', 'cifar10', 'svhn'])  # tfds celeb_a has attributes, no class


def _host_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
  if batch_size % process_count:
    raise ValueError(f'global batch_size={batch_size} must be divisible by the number of '
                     f'processes ({process_count}).')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  per_host = batch_size // process_count
  return process_index * per_host, per_host


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Per-host batches of one split; `batch_at(step)` is pure, iteration is resumable.

  Attributes:
    name: dataset name (a key of `DATASETS`).
    element_shape: shape of one example, `(H, W, C)` or `(D,)`.
    batch_size: global batch size `B` (all processes together).
    host_batch_size: rows per process, `B / process_count`.
    num_examples: examples in the split (None for the infinite toy streams).
    num_steps: batches until the end (`num_epochs * num_examples // B`, remainder dropped),
      None when infinite.
    batch_fn: `step -> batch`, the pure per-host batch function.
    num_levels: integer levels per pixel before scaling (256, or 17 for digits; None for
      toys): uniform dequantization maps level `v` to `(v + u) / num_levels`.
    num_threads: grain threads that prefetch batches while iterating (0 = synchronous).
    prefetch: batches read ahead while iterating.
    num_classes: classes of the `'label'` entries (None when batches carry no labels).
  """

  name: str
  element_shape: tuple[int, ...]
  batch_size: int
  host_batch_size: int
  num_examples: int | None
  num_steps: int | None
  batch_fn: Callable[[int], Batch]
  num_levels: int | None = None
  num_threads: int = 2
  prefetch: int = 4
  num_classes: int | None = None

  @property
  def steps_per_epoch(self) -> int | None:
    return None if self.num_examples is None else self.num_examples // self.batch_size

  def batch_at(self, step: int) -> Batch:
    """The per-host batch `{'image': float32 [B_host, *element_shape]}` of global `step`."""
    if step < 0 or (self.num_steps is not None and step >= self.num_steps):
      raise IndexError(f'step {step} outside [0, {self.num_steps}).')
    return self.batch_fn(step)

  def iterator(self, start_step: int = 0) -> BatchIterator:
    """An iterator over the batches of steps `start_step, start_step + 1, ...`."""
    return BatchIterator(self, start_step)

  def __iter__(self) -> Iterator[Batch]:
    return self.iterator()


class BatchIterator(Iterator[Batch]):
  """Iterates `Dataset.batch_at(step)` from a start step with grain thread prefetching.

  Its state is `{'step': next step}`; `set_state` continues from exactly that batch.
  """

  def __init__(self, dataset: Dataset, start_step: int = 0):
    self._dataset = dataset
    self.set_state({'step': start_step})

  def _make_iterator(self, start: int) -> Iterator[Batch]:
    stop = self._dataset.num_steps
    stop = sys.maxsize if stop is None else stop
    if self._dataset.num_threads <= 0:
      return map(self._dataset.batch_fn, range(start, max(start, stop)))
    steps = grain.MapDataset.range(start, max(start, stop)).map(self._dataset.batch_fn)
    options = grain.ReadOptions(num_threads=self._dataset.num_threads,
                                prefetch_buffer_size=self._dataset.prefetch)
    return iter(steps.to_iter_dataset(options))

  @property
  def step(self) -> int:
    """The global step of the next batch."""
    return self._step

  def get_state(self) -> dict[str, int]:
    return {'step': self._step}

  def set_state(self, state: dict[str, int]) -> None:
    self._step = int(state['step'])
    if self._step < 0:
      raise ValueError(f'step must be >= 0, got {self._step}.')
    self._iterator = self._make_iterator(self._step)

  def __next__(self) -> Batch:
    batch = next(self._iterator)
    self._step += 1
    return batch


def _toy_dataset(name, *, split, batch_size, seed, row_start, per_host, **_) -> Dataset:
  distribution = toy_data.make_toy(name)
  if split not in ('train', 'test', 'eval'):
    raise ValueError(f"Unknown split {split!r} for {name}; valid choices: ['eval', 'test', "
                     "'train'].")
  stream = 0 if split == 'train' else 1  # train and test never share samples

  def batch_fn(step: int) -> Batch:
    rng = np.random.default_rng([seed, stream, step])
    x = distribution.sample(rng, batch_size)
    return {'image': x[row_start:row_start + per_host]}

  return Dataset(name=name, element_shape=(distribution.dim,), batch_size=batch_size,
                 host_batch_size=per_host, num_examples=None, num_steps=None, batch_fn=batch_fn,
                 num_threads=0)


def _image_source(name: str, split: str, image_size: int, data_dir: str | None):
  if name == 'digits':
    return image_sources.digits_source(split, image_size)
  if name in _TFDS:
    tfds_name, aliases, resize_fn = _TFDS[name]
    return image_sources.tfds_source(tfds_name, aliases.get(split, split), data_dir, resize_fn)
  if split == 'eval' and data_dir and not os.path.isdir(os.path.join(data_dir, 'eval')):
    split = 'test'
  return image_sources.image_folder_source(data_dir, split)


_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
  """SplitMix64's output function: a bijective, well-mixed hash of uint64 counters."""
  z = z + _GOLDEN_GAMMA
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def position_uniforms(seed: int, stream: int, positions: np.ndarray, size: int) -> np.ndarray:
  """Counter-based `U[0, 1)` numbers `[len(positions), size]`, float32.

  Row `r` depends only on `(seed, stream, positions[r])`, so an example's augmentation is
  the same whichever host reads it and in whatever batch it lands; it is vectorised over
  the whole batch (no per-example generator).
  """
  key = _splitmix64(np.array([seed * 8 + stream], np.uint64))
  counters = positions.astype(np.uint64)[:, None] * np.uint64(size) + np.arange(
      size, dtype=np.uint64)
  bits = _splitmix64(counters ^ key)
  return ((bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24))


class _IndexSampler:
  """Position `p` of the stream -> example index: epoch `p // N` is a fresh permutation.

  The permutation of epoch `e` is `default_rng([seed, e]).permutation(N)`: a pure function
  of `(seed, e)`, computed once per epoch (vectorised lookups; a handful of epochs cached).
  """

  def __init__(self, num_examples: int, seed: int, shuffle: bool):
    self._num_examples = num_examples
    self._seed = seed
    self._shuffle = shuffle
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()  # grain threads build batches concurrently

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      permutation = self._cache.get(epoch)
      if permutation is None:
        rng = np.random.default_rng([self._seed, epoch])
        permutation = rng.permutation(self._num_examples)
        if len(self._cache) >= 4:
          self._cache.pop(next(iter(self._cache)))
        self._cache[epoch] = permutation
    return permutation

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    epochs, within = np.divmod(positions, self._num_examples)
    if not self._shuffle:
      return within
    indices = np.empty_like(within)
    for epoch in np.unique(epochs):
      mask = epochs == epoch
      indices[mask] = self._permutation(int(epoch))[within[mask]]
    return indices


def _read(records, indices: np.ndarray) -> list[np.ndarray] | np.ndarray:
  if isinstance(records, np.ndarray):
    return records[indices]
  getitems = getattr(records, '__getitems__', None)
  if getitems is not None:
    return getitems([int(i) for i in indices])
  return [records[int(i)] for i in indices]


def _image_batch_fn(source, *, sampler, seed, batch_size, row_start, per_host, image_size,
                    centered, random_flip, uniform_dequantization,
                    with_labels=False) -> Callable[[int], Batch]:
  """`step -> batch`: read, resize, flip, dequantize, scale (score_sde's order); labels."""
  scaler = get_data_scaler(centered)
  max_value = np.float32(source.max_value)
  shape = (image_size, image_size, source.num_channels)

  def batch_fn(step: int) -> Batch:
    positions = step * batch_size + row_start + np.arange(per_host, dtype=np.int64)
    indices = sampler(positions)
    images = [source.resize_fn(np.asarray(image), image_size)
              for image in _read(source.records, indices)]
    for image in images:
      if image.shape != shape:
        raise ValueError(f'{image.shape} image after resizing, expected {shape}.')
    x = np.stack(images).astype(np.float32)
    if random_flip:
      flip = position_uniforms(seed, 1, positions, 1)[:, 0] < 0.5
      x[flip] = x[flip, :, ::-1]
    if uniform_dequantization:
      noise = position_uniforms(seed, 2, positions, int(np.prod(shape))).reshape(x.shape)
      x = (x + noise) / (max_value + 1)
    else:
      x = x / max_value
    batch = {'image': np.ascontiguousarray(scaler(x), dtype=np.float32)}
    if with_labels:
      batch['label'] = np.asarray([int(np.asarray(v)) for v in _read(source.labels, indices)],
                                  np.int32)
    return batch

  return batch_fn


def make_dataset(name: str, *, split: str, batch_size: int, image_size: int = 32,
                 centered: bool = False, random_flip: bool = False,
                 uniform_dequantization: bool = False, seed: int = 0,
                 data_dir: str | None = None, num_epochs: int | None = None,
                 shuffle: bool = True, num_channels: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 num_threads: int | None = None, prefetch: int = 4,
                 with_labels: bool = False) -> Dataset:
  """Builds the per-host input pipeline of one split of dataset `name`.

  Args:
    name: a key of `DATASETS` (case-insensitive): 2-D toys, `digits`, tfds `cifar10` /
      `svhn` / `celeba`, or image folders `image_folder` / `lsun` / `celebahq` / `ffhq`.
    split: `train`, `test` or `eval` (the dataset's evaluation split), or a tfds split.
    batch_size: global batch size over all processes.
    image_size: side of the square images (ignored by toys; digits: a multiple of 8).
    centered: scale images to `[-1, 1]` instead of `[0, 1]`.
    random_flip: flip each image horizontally with probability 1/2.
    uniform_dequantization: add `U[0, 1)` noise to integer levels (likelihood training).
    seed: seed of the shuffle, the augmentations and the toy samples.
    data_dir: tfds data dir, or the image folder (needed for folder datasets).
    num_epochs: passes over the split; None repeats forever (toys are always infinite).
    shuffle: shuffle the order (reshuffled every epoch); False reads in storage order.
    num_channels: if given, checked against the dataset's channels.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    num_threads: grain threads that read batches ahead (0 = read in the caller's thread;
      None = `min(8, cpu count)`); it never changes the batches.
    prefetch: batches read ahead.
    with_labels: add `'label': int32 [B_host]`, the class of each image (datasets with
      class labels only).

  Returns:
    A `Dataset`; iterate it (or `.iterator(start_step)`) for per-host batches
    `{'image': float32 [B / process_count, *element_shape]}`.

  Raises:
    ValueError: unknown name / split, bad sizes, a channel mismatch, or `with_labels` for
      a dataset without class labels.
    DatasetNotPreparedError: the data is not available locally (the message says how to
      prepare it); nothing is downloaded.
  """
  name = name.lower()
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r} (data.dataset); valid choices: '
                     f'{sorted(DATASETS)}.')
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  row_start, per_host = _host_rows(batch_size, process_index, process_count)
  seed = int(seed) % 2**32
  if num_threads is None:
    num_threads = min(8, os.cpu_count() or 1)
  if with_labels and DATASETS[name] in ('toy', 'image_folder'):
    raise ValueError(f'data.dataset={name} has no class labels; labelled datasets: '
                     f'{labelled_datasets()}')
  if DATASETS[name] == 'toy':
    return _toy_dataset(name, split=split, batch_size=batch_size, seed=seed,
                        row_start=row_start, per_host=per_host)

  source = _image_source(name, split, image_size, data_dir)
  if num_channels is not None and num_channels != source.num_channels:
    raise ValueError(f'data.num_channels={num_channels} but {name!r} has '
                     f'{source.num_channels} channels.')
  if with_labels and source.labels is None:
    raise ValueError(f'data.dataset={name} ({split!r}) has no class labels; labelled '
                     f'datasets: {labelled_datasets()}')
  num_examples = len(source.records)
  num_steps = None if num_epochs is None else num_epochs * num_examples // batch_size
  if num_steps == 0:
    raise ValueError(f'batch_size={batch_size} exceeds the {num_epochs * num_examples} '
                     f'examples of {name!r} {split!r}.')
  batch_fn = _image_batch_fn(
      source, sampler=_IndexSampler(num_examples, seed, shuffle), seed=seed,
      batch_size=batch_size, row_start=row_start, per_host=per_host, image_size=image_size,
      centered=centered, random_flip=random_flip,
      uniform_dequantization=uniform_dequantization, with_labels=with_labels)
  return Dataset(name=name, element_shape=(image_size, image_size, source.num_channels),
                 batch_size=batch_size, host_batch_size=per_host, num_examples=num_examples,
                 num_steps=num_steps, batch_fn=batch_fn, num_levels=source.max_value + 1,
                 num_threads=num_threads, prefetch=prefetch,
                 num_classes=source.num_classes if with_labels else None)
