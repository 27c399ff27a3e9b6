"""Benchmark: memory and speed of the train step against `training.grad_accum_steps`.

Gradient accumulation computes the update over a global batch of `B` rows from `k`
micro-batches of `B / k` rows, one after the other, so only one micro-batch's activations are
alive at a time. For each `k` this compiles the train step as `main.py --mode=train` does
(`run_train`: sharded over every device, state donated) and reports, each `k` in a process
of its own:

- XLA's temporary buffer of the compiled step (`memory_analysis().temp_size_in_bytes`:
  activations, gradients and workspace; parameters and optimizer state are the arguments),
- the process's peak resident memory after the timed steps (`ru_maxrss`),
- compile time, and seconds per update (median of `--steps` timed updates after a first
  call) with images/s.

CIFAR-10 configs read bench_train's synthetic in-memory source of CIFAR-10's shape (no
download).

  python scripts/bench_grad_accum.py --config=vp_cifar --batch_size=64 --accum=1,4,16 \
      --steps=1 --write

`--write` replaces the `## Gradient accumulation` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'scripts'))

import bench_train  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from scorejax import host_memory, run_train  # noqa: E402

SECTION = '## Gradient accumulation'


def measure(config_name: str, batch_size: int, accum: int, steps: int) -> dict:
  """Compiles and times the sharded train step with `accum` micro-batches (this process)."""
  config = bench_train.load_config(config_name, batch_size, steps, None)
  config.training.grad_accum_steps = accum
  bench_train.use_synthetic_cifar10(config)
  run_train.validate(config, '/nonexistent-workdir')
  step_fn, state, batches = bench_train.sharded_train_step(config, 2)
  key = jax.random.key(1)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batches[0], key).compile()
  compile_seconds = time.perf_counter() - start
  compile_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  memory = compiled.memory_analysis()
  state, metrics = compiled(state, batches[0], key)
  jax.block_until_ready(metrics)
  seconds = []
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2], key)
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
  return dict(
      accum=accum, micro=batch_size // accum, temp_mb=memory.temp_size_in_bytes / 2**20,
      argument_mb=memory.argument_size_in_bytes / 2**20,
      compile_rss_mb=compile_rss,
      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      compile_s=compile_seconds, step_s=float(np.median(seconds)),
      loss=float(np.asarray(metrics['loss'])[-1]), model=config.model.name,
      dataset=('synthetic CIFAR-10' if config.data.dataset == 'cifar10'
               else config.data.dataset),
      parameters=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='vp_cifar')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--accum', default='1,2,4,8', help='grad_accum_steps values')
  parser.add_argument('--steps', type=int, default=2, help='timed updates per setting')
  parser.add_argument('--write', action='store_true', help='update docs/benchmarks.md')
  parser.add_argument('--child', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  host_memory.reexec_with_tuned_malloc()
  if args.child:
    print('RESULT ' + json.dumps(measure(args.config, args.batch_size, args.child, args.steps)),
          flush=True)
    return
  rows = []
  start = time.time()
  for accum in (int(a) for a in args.accum.split(',')):
    out = subprocess.run(
        [sys.executable, __file__, f'--config={args.config}', f'--batch_size={args.batch_size}',
         f'--steps={args.steps}', f'--child={accum}'],
        capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith('RESULT ')]
    if out.returncode or not lines:
      raise SystemExit(f'grad_accum_steps={accum} failed:\n{out.stderr[-3000:]}')
    rows.append(json.loads(lines[-1][len('RESULT '):]))
    print(rows[-1], flush=True)
  first = rows[0]
  table = [
      SECTION,
      '',
      f'`python scripts/bench_grad_accum.py --config={args.config} '
      f'--batch_size={args.batch_size} --accum={args.accum} '
      f'--steps={args.steps} --write` on '
      f'{platform.node() or "this machine"} ({os.cpu_count()} CPU cores, '
      f'{jax.device_count()} JAX {jax.default_backend()} devices, JAX {jax.__version__}; '
      f'{host_memory.describe()}), {time.strftime("%Y-%m-%d")}, '
      f'{(time.time() - start) / 60:.1f} min in all. Network: {first["model"]} '
      f'({first["parameters"]:,} parameters), global batch {args.batch_size} of '
      f'{first["dataset"]}, the train step as `main.py --mode=train` compiles it (sharded over the '
      'devices, state donated); each row in a process of its own. "XLA temp": the compiled '
      "step's temporary buffer (activations, gradients, workspace); parameters, EMA and Adam "
      f'state are its arguments ({first["argument_mb"]:.0f} MiB). RSS: the process\'s peak '
      'resident memory after compiling and after the timed updates (malloc keeps freed '
      'memory: each includes what came before). Seconds per update: median of the timed '
      'updates after a first call.',
      '',
      '| grad_accum_steps | micro-batch | XLA temp MiB | RSS compiled MiB | '
      'RSS run MiB | compile s | s / update | images/s |',
      '|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  table += [f'| {r["accum"]} | {r["micro"]} | {r["temp_mb"]:.0f} | {r["compile_rss_mb"]:.0f} | '
            f'{r["peak_rss_mb"]:.0f} | '
            f'{r["compile_s"]:.0f} | {r["step_s"]:.2f} | {args.batch_size / r["step_s"]:.2f} |'
            for r in rows]
  text = '\n'.join(table) + '\n'
  print(text)
  if args.write:
    bench_train.write_section(SECTION, text)


if __name__ == '__main__':
  main()
