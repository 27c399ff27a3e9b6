"""Times the input pipelines and records the numbers in `docs/benchmarks.md`.

For each case: `batch_at` (one synchronous per-host batch, the pure function) and the
prefetching iterator (grain threads), in milliseconds per batch and examples per second.
Image folders are PNG files written to a temporary directory (decoded with PIL, as tfds'
array_record images are without TensorFlow).

Usage:
  python scripts/bench_datasets.py [--batch_size 128] [--steps 30] [--no_write]
"""

import argparse
import os
import pathlib
import platform
import re
import tempfile
import time

import numpy as np
from PIL import Image

from scorejax import datasets

_BEGIN, _END = '<!-- bench_datasets:begin -->', '<!-- bench_datasets:end -->'


def _time(fn, steps: int) -> float:
  fn(0)  # warm caches (epoch permutation, imports)
  start = time.perf_counter()
  for step in range(1, steps + 1):
    fn(step)
  return (time.perf_counter() - start) / steps


def _iterate(ds: datasets.Dataset, steps: int) -> float:
  iterator = ds.iterator()
  next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return (time.perf_counter() - start) / steps


def _write_pngs(folder: pathlib.Path, count: int, size: int) -> None:
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        folder / f'{i:05d}.png')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--no_write', action='store_true')
  args = parser.parse_args()
  batch = args.batch_size
  augment = dict(random_flip=True, uniform_dequantization=True, centered=True, seed=0)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    _write_pngs(pathlib.Path(tmp) / 'train', 4 * batch, 32)
    _write_pngs(pathlib.Path(tmp) / 'big' / 'train', 2 * batch, 80)
    cases = [
        ('digits 8x8', dict(name='digits', image_size=8, **augment)),
        ('digits 32x32 (upsampled)', dict(name='digits', image_size=32, **augment)),
        ('image folder 32x32 PNG', dict(name='image_folder', image_size=32, data_dir=tmp,
                                         **augment)),
        ('image folder 80x80 PNG -> 64 (resize + crop)',
         dict(name='lsun', image_size=64, data_dir=os.path.join(tmp, 'big'), **augment)),
        ('two_moons', dict(name='two_moons', seed=0)),
    ]
    for label, kwargs in cases:
      ds = datasets.make_dataset(split='train', batch_size=batch, num_threads=2, **kwargs)
      sync = _time(ds.batch_at, args.steps)
      threaded = _iterate(ds, args.steps) if ds.num_threads else sync
      rows.append((label, sync, threaded))
      print(f'{label:48s} batch_at {sync * 1e3:7.2f} ms   iterator {threaded * 1e3:7.2f} ms'
            f'   ({batch / threaded:,.0f} examples/s)')

  if args.no_write:
    return
  lines = [
      _BEGIN,
      '## Input pipelines (`scripts/bench_datasets.py`)',
      '',
      f'Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores '
      f'(shared with other jobs while measured); global batch {batch}, one process; '
      f'flip + uniform dequantization + centering on. Command: '
      f'`python scripts/bench_datasets.py --batch_size {batch} --steps {args.steps}`.',
      '',
      '| case | `batch_at` ms/batch | iterator (2 grain threads) ms/batch | examples/s |',
      '|---|---|---|---|',
  ]
  lines += [f'| {label} | {sync * 1e3:.2f} | {threaded * 1e3:.2f} | {batch / threaded:,.0f} |'
            for label, sync, threaded in rows]
  lines.append(_END)
  section = '\n'.join(lines)
  path = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'benchmarks.md'
  text = path.read_text() if path.exists() else '# scorejax benchmarks\n'
  pattern = re.compile(re.escape(_BEGIN) + '.*?' + re.escape(_END), re.S)
  text = pattern.sub(lambda _: section, text) if pattern.search(text) else (
      text.rstrip('\n') + '\n\n' + section + '\n')
  path.write_text(text)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
