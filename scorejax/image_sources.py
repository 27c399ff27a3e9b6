"""Random-access image sources: tfds array_record datasets, image folders, scikit-learn digits.

Owns where raw images come from and how they are brought to `image_size` (as `score_sde`
does, per dataset), not how they are shuffled, augmented or batched (`datasets.py`). A
source is a sequence of integer images `[H, W, C]` (`uint8`, values `0..max_value`) with
`len()` and `[i]`, so grain can read it by index from any host in any order.

- tfds (`cifar10`, `svhn_cropped`, `celeb_a`): read through `tfds.data_source`
  (array_record files, no TensorFlow needed). Whether the dataset is prepared is checked
  first, so an offline machine fails at once with instructions instead of retrying a
  download.
- image folders (LSUN / CelebA-HQ / FFHQ style): PNG / JPEG files under a directory,
  decoded with PIL.
- digits: the 1797 8x8 handwritten digits shipped with scikit-learn (values 0..16).

References:
  Song et al. 2021, ICLR, Appendix H (datasets and preprocessing); `score_sde/datasets.py`
  (`central_crop`, `resize_small`, per-dataset resize ops).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

ResizeFn = Callable[[np.ndarray, int], np.ndarray]

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
DIGITS_NUM_TEST = 297  # the last 297 of the 1797 digits; the first 1500 are for training


class DatasetNotPreparedError(RuntimeError):
  """The dataset is not available locally; the message says how to prepare it."""


def _pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Antialiased bilinear resize of an integer image `[H, W, C]`, keeping its dtype."""
  if image.shape[:2] == (height, width):
    return image
  if image.dtype == np.uint8 and image.shape[-1] in (1, 3):  # one PIL image, 'L' or 'RGB'
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((width, height), Image.BILINEAR))
    return resized.reshape(height, width, image.shape[-1])
  channels = [Image.fromarray(image[..., c]) for c in range(image.shape[-1])]
  resized = [np.asarray(c.resize((width, height), Image.BILINEAR)) for c in channels]
  return np.stack(resized, axis=-1).astype(image.dtype)


def central_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Crops the central `size x size` square of `image [H, W, C]`."""
  top = (image.shape[0] - size) // 2
  left = (image.shape[1] - size) // 2
  return image[top:top + size, left:left + size]


def resize_small(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes `image [H, W, C]` so that its shorter side is `size`, keeping the aspect."""
  height, width = image.shape[:2]
  ratio = size / min(height, width)
  return _pil_resize(image, round(height * ratio), round(width * ratio))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes to `size x size` (CIFAR-10, SVHN; a no-op at their native 32)."""
  return _pil_resize(image, size, size)


def crop_140_resize(image: np.ndarray, size: int) -> np.ndarray:
  """CelebA: central 140x140 crop, then resize to `size` (as score_sde)."""
  return resize_small(central_crop(image, 140), size)


def resize_small_crop(image: np.ndarray, size: int) -> np.ndarray:
  """LSUN / image folders: shorter side to `size`, then central crop (as score_sde)."""
  return central_crop(resize_small(image, size), size)


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """A random-access sequence of integer images with its preprocessing facts.

  Attributes:
    records: sequence with `len()` and `[i] -> [H, W, C]` integer image.
    max_value: the largest pixel value (255, or 16 for digits); images are scaled by it.
    num_channels: `C` after loading.
    resize_fn: `(image, image_size) -> [image_size, image_size, C]` image.
    native_size: the stored side length when all images share it, else None.
    labels: `[i] -> int` class of image `i` (aligned with `records`), or None when the
      dataset has no class labels.
    num_classes: number of classes when `labels` is given.
  """

  records: Sequence[np.ndarray]
  max_value: int
  num_channels: int
  resize_fn: ResizeFn
  native_size: int | None = None
  labels: Sequence[int] | np.ndarray | None = None
  num_classes: int | None = None


# ----------------------------------------------------------------------------- digits


def digits_images(split: str, image_size: int = 8) -> np.ndarray:
  """scikit-learn's handwritten digits as `uint8 [N, image_size, image_size, 1]` in 0..16.

  The split is fixed: the first 1500 images are `train`, the last 297 `test` (`eval` is an
  alias). `image_size` must be a multiple of 8; sizes above 8 repeat every pixel
  (nearest-neighbour upsampling, exact, so dequantization still sees 17 levels), which
  lets U-Nets with more down-samplings run on them.

  Raises:
    ValueError: for an unknown split or an `image_size` that is not a multiple of 8.
  """
  from sklearn.datasets import load_digits  # ships with scikit-learn: no download

  if image_size <= 0 or image_size % 8:
    raise ValueError(f'data.image_size={image_size} is invalid for digits: valid sizes are '
                     'multiples of 8 (8 = native, 16, 32 upsample by pixel repetition).')
  images = load_digits().images.astype(np.uint8)  # [1797, 8, 8], values 0..16
  num_train = len(images) - DIGITS_NUM_TEST
  if split == 'train':
    images = images[:num_train]
  elif split in ('test', 'eval'):
    images = images[num_train:]
  else:
    raise ValueError(f"Unknown split {split!r} for digits; valid choices: ['eval', 'test', "
                     "'train'].")
  factor = image_size // 8
  images = np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)
  return np.ascontiguousarray(images[..., None])


def digits_labels(split: str) -> np.ndarray:
  """The digit (0-9) shown by each image of `digits_images(split)`, `int32 [N]`."""
  from sklearn.datasets import load_digits

  targets = load_digits().target.astype(np.int32)
  num_train = len(targets) - DIGITS_NUM_TEST
  return targets[:num_train] if split == 'train' else targets[num_train:]


def digits_source(split: str, image_size: int) -> ImageSource:
  """The digits as an `ImageSource` (already at `image_size`), labelled 0-9."""
  images = digits_images(split, image_size)
  return ImageSource(records=images, max_value=16, num_channels=1,
                     resize_fn=lambda image, size: image, native_size=image_size,
                     labels=digits_labels(split), num_classes=10)


# ----------------------------------------------------------------------------- tfds


def _prepare_hint(tfds_name: str, data_dir: str | None) -> str:
  where = data_dir or '~/tensorflow_datasets'
  return (f"on a machine with network run `tfds build {tfds_name} --data_dir={where} "
          f"--file_format=array_record` (or `python -m tensorflow_datasets.scripts."
          f"download_and_prepare --datasets={tfds_name} --data_dir={where} "
          f"--file_format=array_record`) and copy the folder here; or set data.data_dir "
          f"to a folder that holds it.")


class _FeatureColumn(Sequence):
  """`records[i]` is `source[i][feature]`: the decoded image of a tfds data source."""

  def __init__(self, source, feature: str):
    self._source = source
    self._feature = feature

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    return np.asarray(self._source[index][self._feature])

  def __getitems__(self, indices: Sequence[int]) -> list[np.ndarray]:
    # One batched array_record read instead of one read per index.
    return [np.asarray(example[self._feature])
            for example in self._source.__getitems__(list(indices))]


def tfds_source(tfds_name: str, split: str, data_dir: str | None,
                resize_fn: ResizeFn) -> ImageSource:
  """A prepared tfds dataset read through its array_record data source.

  Never downloads: the builder is only asked whether it is prepared.

  Raises:
    DatasetNotPreparedError: if the dataset is not prepared under `data_dir`, or is
      prepared in a format other than array_record.
  """
  import tensorflow_datasets as tfds  # heavy; only the image datasets need it

  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    prepared = builder.is_prepared()
  except tfds.core.registered.DatasetNotFoundError as error:
    raise DatasetNotPreparedError(f'dataset {tfds_name!r} is not known to tfds: {error}') from None
  if not prepared:
    raise DatasetNotPreparedError(
        f"dataset {tfds_name!r} is not prepared in {builder.data_dir_root}; "
        + _prepare_hint(tfds_name, data_dir))
  file_format = str(getattr(builder.info.file_format, 'value', builder.info.file_format))
  if file_format != 'array_record':
    raise DatasetNotPreparedError(
        f"dataset {tfds_name!r} in {builder.data_dir} is stored as {file_format}, but random "
        f"access needs array_record; convert it with `tfds convert_format "
        f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record "
        f"--out_dir=NEW_DIR` (then move NEW_DIR in its place), or "
        + _prepare_hint(tfds_name, data_dir))
  if split not in builder.info.splits:
    raise ValueError(f'Unknown split {split!r} for {tfds_name!r}; valid choices: '
                     f'{sorted(builder.info.splits)}.')
  image_feature = builder.info.features['image']
  source = builder.as_data_source(split=split)
  labels, num_classes = None, None
  features = builder.info.features
  label_feature = features['label'] if 'label' in features else None
  if isinstance(label_feature, tfds.features.ClassLabel):
    # A second view of the records that leaves the image encoded: labels cost no decoding.
    label_source = builder.as_data_source(
        split=split, decoders={'image': tfds.decode.SkipDecoding()})
    labels, num_classes = _FeatureColumn(label_source, 'label'), label_feature.num_classes
  return ImageSource(records=_FeatureColumn(source, 'image'), max_value=255,
                     num_channels=int(image_feature.shape[-1]), resize_fn=resize_fn,
                     native_size=image_feature.shape[0], labels=labels,
                     num_classes=num_classes)


# ----------------------------------------------------------------------------- folders


class _ImageFiles(Sequence):
  """`records[i]` decodes the i-th image file (sorted paths) to RGB `uint8 [H, W, 3]`."""

  def __init__(self, paths: Sequence[str]):
    self._paths = list(paths)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index):
    with Image.open(self._paths[index]) as image:
      return np.asarray(image.convert('RGB'))


def image_folder_source(data_dir: str | None, split: str,
                        resize_fn: ResizeFn = resize_small_crop) -> ImageSource:
  """PNG / JPEG images under `data_dir/split` (or directly under `data_dir` for `train`).

  Files are found recursively and sorted by path, so the order (and the shuffle built on
  it) is the same on every host.

  Raises:
    DatasetNotPreparedError: if the folder does not exist or holds no images.
  """
  if not data_dir:
    raise DatasetNotPreparedError(
        'image-folder datasets need data.data_dir: a folder of PNG/JPEG files, with '
        "optional 'train' / 'test' sub-folders.")
  root = pathlib.Path(data_dir)
  if not root.is_dir():
    raise DatasetNotPreparedError(f'image folder {root} (data.data_dir) does not exist; put the '
                                  "PNG/JPEG files there, with optional 'train' / 'test' "
                                  'sub-folders.')
  folder = root / split
  if not folder.is_dir():
    if split != 'train':
      raise DatasetNotPreparedError(
          f"no '{split}' sub-folder in {root}; put the {split} images in {folder}.")
    folder = root
  paths = sorted(str(path) for path in folder.rglob('*')
                 if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())
  if split == 'train' and folder == root:
    # Without split sub-folders the whole tree is the training set, except 'test' & co.
    excluded = tuple(str(root / name) + os.sep for name in ('test', 'eval', 'validation'))
    paths = [path for path in paths if not path.startswith(excluded)]
  if not paths:
    raise DatasetNotPreparedError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) found in '
                                  f'{folder}; prepare the image folder or set data.data_dir.')
  return ImageSource(records=_ImageFiles(paths), max_value=255, num_channels=3,
                     resize_fn=resize_fn)
