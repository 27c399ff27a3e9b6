"""Benchmark: images/s of the full train loop versus the bare jitted train step.

The loop (`run_train.run`: data pipeline, host->device transfer, metric logging,
checkpointing at its configured frequencies, progress bar) should reach >= 0.95 of the
throughput of the same jitted step called back to back on batches already on device.
The loop's rate is read from its own `metrics.jsonl` (`images_per_sec`), skipping the
first log interval (compilation).

CIFAR-10 configs read a synthetic in-memory source of CIFAR-10's shape (1024 random
uint8 32x32x3 images, gathered, flipped and scaled per batch like the real in-memory
pipeline), so they need no download; `--cifar_source=folder` reads a folder of random
PNGs through grain's reader threads instead (`data.dataset=image_folder`).

On a shared machine other jobs' load makes single measurements noisy: loop and bare step
are measured alternately `--repeats` times and the best rate of each is reported.

  python scripts/bench_train.py --configs=default,vp_cifar --steps=300,8 \
      --batch_sizes=128,8 --write

`--write` replaces the `## Train loop` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from scorejax import datasets, distributed, host_memory, run_common, run_train  # noqa: E402
from scorejax.logging_utils import read_jsonl  # noqa: E402
from scorejax.models import make_model  # noqa: E402
from scorejax.train import make_train_step  # noqa: E402
from scorejax.train_state import create_train_state  # noqa: E402

SECTION = '## Train loop'


def load_config(name: str, batch_size: int, steps: int, image_dir: str | None):
  spec = importlib.util.spec_from_file_location(f'configs.{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  training = config.training
  training.batch_size = batch_size
  training.n_iters = steps
  training.n_jitted_steps = 1
  training.log_freq = max(1, steps // 6)
  training.eval_freq = 10**9
  training.snapshot_freq = 10**9
  training.snapshot_freq_for_preemption = 10**9
  training.snapshot_sampling = False
  if config.data.dataset == 'cifar10' and image_dir:
    config.data.dataset = 'image_folder'
    config.data.data_dir = image_dir
  return config


def synthetic_cifar10(config, split: str, batch_size: int, **kwargs) -> datasets.Dataset:
  """An in-memory stand-in of CIFAR-10 (random pixels), read in the caller's thread."""
  del split, kwargs
  pool = np.random.default_rng(0).integers(0, 256, (1024, 32, 32, 3), dtype=np.uint8)

  def batch_fn(step: int) -> dict:
    rng = np.random.default_rng([config.seed, step])
    images = pool[rng.integers(0, len(pool), batch_size)]
    flip = rng.random(batch_size) < 0.5
    images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    return {'image': images.astype(np.float32) / 255.0}

  return datasets.Dataset(name='synthetic_cifar10', element_shape=(32, 32, 3),
                          batch_size=batch_size, host_batch_size=batch_size, num_examples=None,
                          num_steps=None, batch_fn=batch_fn, num_levels=256, num_threads=0)


def use_synthetic_cifar10(config) -> None:
  """Makes the drivers read `synthetic_cifar10` for a cifar10 config (bench only)."""
  original = run_common.make_data

  def make_data(cfg, split, batch_size, **kwargs):
    if cfg.data.dataset == 'cifar10':
      return synthetic_cifar10(cfg, split, batch_size, **kwargs)
    return original(cfg, split, batch_size, **kwargs)

  if config.data.dataset == 'cifar10' and not hasattr(original, 'synthetic'):
    make_data.synthetic = True
    run_common.make_data = make_data


def write_random_images(directory: pathlib.Path, count: int = 256, size: int = 32) -> None:
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    (directory / split).mkdir(parents=True, exist_ok=True)
    for i in range(count):
      pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(directory / split / f'{i}.png')


def sharded_train_step(config, num_batches: int):
  """`(step_fn, state, batches)`: the train step jitted as `run_train` does (state replicated
  and donated, the batch split over every device; `training.grad_accum_steps` micro-batches),
  a fresh state and `num_batches` device-resident single-update batches."""
  mesh = distributed.make_mesh()
  replicated = distributed.replicated_sharding(mesh)
  stacked = distributed.batch_sharding(mesh, leading_axes=1)
  data = run_common.make_data(config, 'train', config.training.batch_size)
  model = make_model(config)
  optimizer, schedule = run_train.make_optimizer_from_config(config)
  state = jax.jit(lambda k: create_train_state(
      run_common.init_params(model, k, data.element_shape), optimizer),
      out_shardings=replicated)(jax.random.key(0))
  step_fn = jax.jit(
      make_train_step(run_common.make_loss_fn(config, model, run_common.make_sde(config)),
                      optimizer, ema_rate=config.model.ema_rate, lr_schedule=schedule,
                      accum_steps=config.training.grad_accum_steps),
      in_shardings=(replicated, stacked, replicated), out_shardings=(replicated, replicated),
      donate_argnums=0)
  batches = [distributed.global_batch(run_train._stack([data.batch_at(i)]), stacked, 1)
             for i in range(num_batches)]
  return step_fn, state, batches


def bare_step_rate(config, steps: int) -> float:
  """Images/s of the jitted step alone, on device-resident batches (same sharding)."""
  step_fn, state, batches = sharded_train_step(config, 4)
  key = jax.random.key(1)
  state, metrics = step_fn(state, batches[0], key)  # compile
  jax.block_until_ready(metrics)
  interval = config.training.log_freq
  rates = []
  for _ in range(max(1, steps // interval)):
    start = time.perf_counter()
    for i in range(interval):
      state, metrics = step_fn(state, batches[i % len(batches)], key)
      jax.block_until_ready(metrics['loss'])  # as the loop: one step in flight
    rates.append(interval * config.training.batch_size / (time.perf_counter() - start))
  return float(np.median(rates))


def loop_rate(config, workdir: str) -> float:
  run_train.run(config, workdir)
  records = [r for r in read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl')
             if 'images_per_sec' in r]
  rates = [r['images_per_sec'] for r in records[1:]]  # the first interval compiles
  return float(np.median(rates))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', default='default,vp_cifar')
  parser.add_argument('--steps', default='300,6', help='loop steps per config')
  parser.add_argument('--batch_sizes', default='128,4')
  parser.add_argument('--repeats', type=int, default=2, help='alternate measurements')
  parser.add_argument('--cifar_source', choices=['synthetic', 'folder'], default='synthetic')
  parser.add_argument('--write', action='store_true', help='update docs/benchmarks.md')
  args = parser.parse_args()
  host_memory.reexec_with_tuned_malloc()
  names = args.configs.split(',')
  steps = [int(s) for s in args.steps.split(',')]
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    image_dir = None
    if args.cifar_source == 'folder':
      image_dir = pathlib.Path(tmp) / 'images'
      write_random_images(image_dir)
    for name, n, batch in zip(names, steps, batch_sizes, strict=True):
      config = load_config(name, batch, n, image_dir and str(image_dir))
      use_synthetic_cifar10(config)
      loops, bares = [], []
      for repeat in range(args.repeats):
        loops.append(loop_rate(config, str(pathlib.Path(tmp) / f'{name}_{repeat}')))
        bares.append(bare_step_rate(config, n))
        print(f'{name} #{repeat}: loop {loops[-1]:.1f} img/s, bare step {bares[-1]:.1f} img/s',
              flush=True)
      loop, bare = max(loops), max(bares)
      rows.append((name, config.model.name, batch, n, loop, bare, loop / bare))
      print(f'{name}: loop {loop:.1f} img/s, bare step {bare:.1f} img/s, ratio {loop / bare:.3f}',
            flush=True)
  table = [
      SECTION,
      '',
      f'`python scripts/bench_train.py --configs={args.configs} --steps={args.steps} '
      f'--batch_sizes={args.batch_sizes} --repeats={args.repeats} '
      f'--cifar_source={args.cifar_source} --write` on {platform.node() or "this machine"} '
      f'({os.cpu_count()} CPU cores, {jax.device_count()} JAX {jax.default_backend()} devices, '
      f'JAX {jax.__version__}; {host_memory.describe()}), {time.strftime("%Y-%m-%d")}. '
      'Loop: median images/s of '
      '`run_train.run` log intervals after the first (data pipeline, host-to-device transfer, '
      'metrics, progress bar; checkpoints and snapshots off); bare: the same jitted, sharded, '
      'donated step called back to back on device-resident batches, one step in flight as in '
      'the loop, median over intervals of the same length. Best of the alternating repeats. '
      'CIFAR-10 configs read a synthetic in-memory source of its shape. Goal: ratio >= 0.95.',
      '',
      '| config | model | batch | loop steps | loop img/s | bare step img/s | ratio |',
      '|---|---|---:|---:|---:|---:|---:|',
  ]
  table += [f'| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.3f} |'
            for r in rows]
  text = '\n'.join(table) + '\n'
  print(text)
  if args.write:
    write_section(SECTION, text)


def write_section(section: str, text: str) -> None:
  """Replaces `section` of docs/benchmarks.md (from its heading to the next `## ` heading or
  `<!--` marker) by `text`, or appends `text` when the section is missing."""
  path = ROOT / 'docs' / 'benchmarks.md'
  existing = path.read_text() if path.exists() else '# Benchmarks\n'
  if section in existing:
    head, _, rest = existing.partition(section)
    ends = [i for i in (rest.find('\n## '), rest.find('\n<!--')) if i >= 0]
    existing = head.rstrip('\n') + '\n\n' + text + (rest[min(ends):] if ends else '')
  else:
    existing = existing.rstrip('\n') + '\n\n' + text
  path.write_text(existing)


if __name__ == '__main__':
  main()
