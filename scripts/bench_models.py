"""Times the score networks (forward and train step) and records them in `docs/benchmarks.md`.

Cases, batch 8, float32, matmul precision 'highest' (as the tests): the CIFAR-10 DDPM++
of `presets.ddpmpp_cifar10()` (32x32, 61.8M parameters) and the two small golden networks
of `tests/data/*_config.json` (16x16, nf=32). For each:

- `forward`: one jitted `model.apply(variables, x, labels, train=False)`;
- `train step`: one jitted, state-donating step of `scorejax.train.make_train_step`
  (continuous SDE loss with dropout, global-norm clipping, Adam, EMA), the same step
  the train driver runs.

Times are the best of `--repeats` calls after a warm-up call (the machine is shared: other
jobs' load only adds time). GFLOP per call come from
XLA's cost analysis of the compiled program (per call, all devices together), and
GFLOP/s is that divided by the time. For scale: the issue estimated the 2-core CPU of the
development machine at ~150 GFLOP/s float32 through XLA; single 3x3 convolutions reach
~175 GFLOP/s in XLA and ~190-210 in PyTorch there, and PyTorch's CIFAR-10 DDPM++ train step
(4.9e11 FLOP in 3.94 s) runs at ~125 GFLOP/s.
For the DDPM++ cases, when torch imports, a PyTorch DDPM++ (`scripts/torch_ddpmpp.py`,
checked against the reference's golden output first) is timed interleaved with every JAX
row (one JAX call, one PyTorch call, `--repeats` rounds, best of each), so that the VM's
drift hits both alike: forward (eval, no grad) and the same train step (continuous VP loss,
dropout, clipping, Adam, EMA), random weights. The numbers measured once for the issue
(score_sde_pytorch, `TORCH_REFERENCE`) are in the notes.

Usage:
  python scripts/bench_models.py [--repeats 5] [--cases ddpmpp_cifar10,ddpmpp_small]
                                 [--no_write]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scorejax import host_memory, losses, train, train_state
from scorejax import sde as sde_lib
from scorejax.models import make_model, presets

ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH = 8
# score_sde_pytorch on the same CPU, batch 8 (seconds): (forward, train step), measured
# once for the issue; the table shows scripts/torch_ddpmpp.py timed in the same run.
TORCH_REFERENCE = {'ddpmpp_cifar10': (1.09, 3.94), 'ddpmpp_small': (0.042, 0.157)}


def _case(name: str):
  if name == 'ddpmpp_cifar10':
    config = {'model': presets.ddpmpp_cifar10().to_dict(),
              'data': {'image_size': 32, 'num_channels': 3, 'centered': True}}
  else:
    config = json.loads((ROOT / 'tests' / 'data' / f'{name}_config.json').read_text())
  sde_name = 'vesde' if config['model'].get('scale_by_sigma') else 'vpsde'
  return config, sde_lib.make_sde(sde_name)


def _param_shapes(model, x, labels):
  return jax.eval_shape(model.init, jax.random.key(0), x, labels)['params']


def _random_params(model, x, labels, seed=0):
  """Random weights from the parameter shapes (no compiled initializer)."""
  shapes = _param_shapes(model, x, labels)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype),
                      shapes)


def _is_vp(sde) -> bool:
  return isinstance(sde, sde_lib.VariancePreservingSDE | sde_lib.SubVPSDE)


def _interleaved_best(calls: dict, repeats: int) -> dict[str, float]:
  """Fastest of `repeats` calls of each of `calls` after a warm-up, taken in alternation (one
  call of each per round), so that the machine's drift hits them alike."""
  for fn in calls.values():
    jax.block_until_ready(fn())
  times = {k: [] for k in calls}
  for _ in range(repeats):
    for k, fn in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - start)
  return {k: float(np.min(v)) for k, v in times.items()}


def _best_time(fn, repeats: int) -> float:
  """Fastest of `repeats` calls after a warm-up (other jobs' load only adds time)."""
  return _interleaved_best({'fn': fn}, repeats)['fn']


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
  return float(analysis.get('flops', float('nan')))


def _inputs(name: str, params: bool = True):
  """`(model, sde, x, labels, params)` of case `name`; `params` are random weights, or
  only their shapes when `params=False`."""
  config, sde = _case(name)
  model = make_model(config)
  size, channels = config['data']['image_size'], config['data']['num_channels']
  x = jax.random.uniform(jax.random.key(1), (BATCH, size, size, channels))
  t = jnp.linspace(0.1, 0.9, BATCH)
  # The labels make_score_fn feeds: 999 t (VP), sigma(t) (VE).
  labels = t * 999.0 if _is_vp(sde) else sde.marginal_prob(x, t)[1]
  weights = (_random_params if params else _param_shapes)(model, x, labels)
  return model, sde, x, labels, weights


def build(name: str, what: str, devices: int = 1):
  """`(call, compiled)` for `what` = 'forward' or 'step' of case `name`, the batch split
  over the first `devices` devices (parameters replicated) as the train driver does.
  `call()` runs the compiled program once on fixed inputs (a step updates its state)."""
  model, sde, x, labels, params = _inputs(name)
  mesh = Mesh(np.asarray(jax.devices()[:devices]), ('data',))
  replicated = NamedSharding(mesh, PartitionSpec())
  split = NamedSharding(mesh, PartitionSpec('data'))
  x, labels = jax.device_put(x, split), jax.device_put(labels, split)
  params = jax.device_put(params, replicated)
  if what == 'forward':
    variables = {'params': params}
    forward = jax.jit(lambda v, x, l: model.apply(v, x, l, train=False),
                      out_shardings=split)
    compiled = forward.lower(variables, x, labels).compile()
    return (lambda: compiled(variables, x, labels)), compiled
  optimizer = train_state.make_optimizer('Adam', lr=2e-4, warmup=5000, grad_clip=1.0)
  loss_fn = losses.make_loss_fn(sde, model, train=True, reduce_mean=_is_vp(sde),
                                continuous=True)
  step_fn = train.make_train_step(lambda key, p, b: loss_fn(p, key, b), optimizer,
                                  ema_rate=0.9999)
  state = jax.device_put(train_state.create_train_state(params, optimizer), replicated)
  batches = jax.device_put(x[None], NamedSharding(mesh, PartitionSpec(None, 'data')))
  key = jax.device_put(jax.random.key(2), replicated)
  step = jax.jit(step_fn, donate_argnums=0, out_shardings=(replicated, replicated))
  compiled = step.lower(state, batches, key).compile()
  holder = {'state': state}

  def call():
    holder['state'], metrics = compiled(holder['state'], batches, key)
    return metrics['loss']

  return call, compiled


def torch_calls(name: str) -> dict | None:
  """PyTorch DDPM++ calls `{'forward': fn, 'step': fn}` of case `name`, batch `BATCH`, or
  None when torch is missing or the case has no PyTorch twin. Runs the golden-output check
  first."""
  if name not in TORCH_REFERENCE:
    return None
  try:
    import torch  # noqa: F401
  except ImportError:
    return None
  import importlib.util

  spec = importlib.util.spec_from_file_location('torch_ddpmpp',
                                                ROOT / 'scripts' / 'torch_ddpmpp.py')
  torch_ddpmpp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(torch_ddpmpp)
  torch_ddpmpp.check()
  config, _ = _case(name)
  return {'forward': torch_ddpmpp.make_forward(config, BATCH),
          'step': torch_ddpmpp.make_train_step(config, BATCH)}


def bench(name: str, repeats: int, devices: int = 1, torch: dict | None = None) -> dict:
  """JAX forward and train step of case `name`; with `torch` (`torch_calls`), its twin's
  forward and step are timed interleaved with them (keys `torch_forward_s`, ...)."""
  timings = {}
  for what in ('forward', 'step'):
    start = time.perf_counter()
    call, compiled = build(name, what, devices)
    timings[f'{what}_compile_s'] = time.perf_counter() - start
    calls = {'jax': call, **({'torch': torch[what]} if torch else {})}
    best = _interleaved_best(calls, repeats)
    timings[f'{what}_s'] = best['jax']
    if torch:
      timings[f'torch_{what}_s'] = best['torch']
    timings[f'{what}_gflop'] = _flops(compiled) / 1e9 * devices
    del call, compiled
  params = _inputs(name, params=False)[-1]
  return {'name': name, 'devices': devices,
          'params': sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)), **timings}


NOTES = '''Where the time went (`scripts/profile_step.py` sums XLA:CPU's per-op trace events
by layer and operation; batch 8, single layers timed in and outside `lax.scan`):
- XLA:CPU runs a convolution on its fast library path only in the canonical NHWC / HWIO
  layout. Inside a `while` body (score_sde's scanned `n_jitted_steps`, in-graph solvers)
  it does not transpose gradient convolutions into it and falls back to a loop nest
  (jax-ml/jax#12868; 3x3 128->128 on 8x32x32: kernel gradient 20 ms outside a scan,
  1530 ms inside), which made score_sde's JAX step 4-5x slower than PyTorch.
  `scorejax.models.conv` makes the convolution a bilinear primitive whose JVP and
  transposes are themselves canonical convolutions: per layer (8x32x32, 256->256) forward
  52 ms, input gradient 52 ms, kernel gradient 59-68 ms, against PyTorch's 42 / 44 / 53 ms,
  the same inside and outside loops, and forward mode works (likelihood, sliced score
  matching).
- Residual dropout: JAX lowers its Threefry hash on CPU as a `while` loop over the whole
  mask; `scorejax.models.dropout` writes the 20 rounds unrolled (same bits, same masks as
  `nn.Dropout`), fused into one pass: 7.0 -> 1.05 ms per 8x32x32x128 mask, and the CIFAR-10
  step 5.03 -> 4.26 s in an interleaved A/B on a busy machine.
- GroupNorm from per-channel sums (the `[B, H, W, G, C/G]` reduction of `nn.GroupNorm` is
  ~5x slower on XLA:CPU), and a non-finite update skipped with `lax.cond` instead of a
  select over the whole state (clip + Adam + EMA of 61.8M parameters: 0.47 -> 0.26 s).
- Winograd F(2x2, 3x3) on CPU (`scorejax.models.winograd`, 2026-11-22): XLA:CPU's
  convolution kernel (YNNPACK; Eigen and the oneDNN / YNN flags of this jaxlib measured
  the same) runs 3x3 layers at ~190-200 GFLOP/s, oneDNN at ~220-250. 3x3 stride-1 'SAME'
  layers from 2^26 FLOPs up now run as 16 matrix products between cheap tile transforms
  (2.25x fewer FLOPs), the batch chunked to keep the transformed operands in cache: per
  layer 1.1-1.9x faster (8x32x32, 256->256: forward 51 -> 31 ms, kernel gradient 63 -> 44
  ms). The kernel gradient, as F(3x3, 2x2) products summed over tiles, needs no
  `[C, H, W, B]` transpose of the activations. Compiling the CIFAR-10 step takes ~2x longer
  (~100 s). XLA's cost analysis counts the Winograd programs' own FLOPs, so the CIFAR-10
  rows' GFLOP columns are lower than the direct convolutions' (forward 163, train step 494
  GFLOP).
- Winograd, second round (2026-11-23, interleaved A/B runs of the CIFAR-10 DDPM++, median
  of 8): (1) the kernel gradient's `dy` tile views come from a padded copy: XLA had fused
  `dy`'s producer (in the backward pass a sum of up to ~30 cotangent terms of the U-Net's
  skips) into each of the 16 transform outputs, evaluating it 16 times (one layer's
  transform took 16 ms per output): step 3.56 -> 3.22 s; (2) the 16 transformed operands
  stay 16 arrays with a matrix product each instead of one stacked batched product (no
  stacking copies; XLA:CPU's batched kernel-gradient product was 1.1-2.3x slower than 16
  separate ones): step 3.67 -> 3.45 s, forward 0.90 -> 0.82 s; (3) with both, Winograd
  wins down to 2^26-FLOP layers, so the thresholds went from 2^28 / 2^27 to 2^26: the
  small DDPM++ forward ~10% faster. Computing the kernel transform as 16 fused sums instead
  of one small matrix product made the forward ~5% faster but the step ~7% slower (the
  input gradient's flipped, transposed kernel): not kept. Nor was an input gradient that
  never transposes the kernel (the spatial flip permutes the transformed kernel's tiles;
  the products contract over the output channels): per layer equal, up to 1.27x faster at
  8x8x256, but no change of the step beyond the noise in two A/B runs. Chunk sizes 2^16 /
  2^17 / 2^18 elements measured the same.
- Third round (2026-11-23, session 5), from the step's op profile and its system time:
  (1) the 1x1 skip convolutions of the BigGAN blocks that change the channel count ran as
  XLA convolutions, their kernel gradient as a convolution with a 32x32 window at 18-27
  GFLOP/s (30 ms for 0.54 GFLOP). On CPU they are now matrix products (forward, input and
  kernel gradient): per layer (8x32x32, 384 -> 128) kernel gradient 31.7 -> 12.0 ms,
  forward 11.3 -> 6.5 ms, input gradient 12.2 -> 10.3 ms. (2) XLA:CPU allocates a call's
  temporaries as one block (1.71 GB for this step), requested from one of its threads;
  glibc maps such a block fresh (`mmap`) and unmaps it when the call ends (strace: one
  1,713,401,856-byte mmap / munmap per step), so every step faulted 1.7 GB in again in 4 KiB
  pages: ~420,000 page faults and 0.9-4 s of system time per step, against 0-30,000 faults
  for PyTorch. `scorejax.host_memory` (main.py and these scripts call it first) re-runs the
  command with glibc tunables that keep the block on the heap between calls, on 2 MiB
  pages: no faults, ~0.05 s of system time. In separate processes, JAX and PyTorch
  interleaved in each (CIFAR-10 step, 1 device, 2 x 4-5 steps after warm-up): default
  malloc JAX 3.19-5.34 s, PyTorch 3.45-3.96 s; tuned JAX 2.60-3.29 s (best 2.60), PyTorch
  3.28-3.79 s. Keeping the block without huge pages (`arena_max=1:mmap_max=0` alone) was no
  faster than the default (3.2-4.2 s), and huge pages without keeping it (`hugetlb=1` alone)
  pay the kernel's compaction every step (JAX 3.2-5.4 s with PyTorch in the process): the
  two together help. `SCOREJAX_TUNE_MALLOC=0` turns it off. (3) Winograd F(4x4, 3x3) was
  tried: 1.78x fewer products than F(2x2, 3x3), but ~1e-5 of the output's scale float32
  error (F(2x2, 3x3): ~5e-7; direct: ~5e-7) and per layer from 1.3x faster (16x16, 256 ->
  256) to slower (the 36 tile transforms cost more and its products are smaller): not kept.
- What is left in the train step: GEMM-bound layers (the Winograd products and small convolutions),
  the tile transforms (memory-bound), elementwise backward fusions of GroupNorm / SiLU / attention,
  and the optimizer and EMA (~0.25 s, memory-bound). Two virtual devices help the small networks'
  forward but not the CIFAR-10 step. This VM's speed drifts by up to ~30% over minutes with nothing
  else running (one build measured 1.00 s / 3.86 s per CIFAR-10 forward / step, and an hour later
  1.29 s / 5.0 s, compile times up by the same factor): compare rows of one run, interleaved timings
  (the PyTorch column) or interleaved A/B runs.
- The "PyTorch forward / step" column is `scripts/torch_ddpmpp.py` timed interleaved with
  the row's JAX calls (same DDPM++, golden-checked against score_sde_pytorch). The issue's
  one-off score_sde_pytorch numbers (batch 8, forward / step s): ''' + '; '.join(
    f'{k} {v[0]:.3f} / {v[1]:.3f}' for k, v in TORCH_REFERENCE.items()) + '.'


def calibration_ms(repeats: int) -> dict[str, float]:
  """One 3x3 conv, 128 -> 128 on 8x32x32, forward + both gradients: this package (one jitted
  `jax.grad`) and PyTorch (autograd) when installed, best of `repeats`. On the idle
  development machine: ~50-56 ms (JAX) and ~42-45 ms (PyTorch) with glibc's default malloc,
  ~31 ms (JAX) and ~38-40 ms (PyTorch) with `scorejax.host_memory`'s tuning. The PyTorch
  number is taken again after every row ("speed check ms"); it did not move when this VM's
  XLA timings drifted by ~25% (see docs/benchmarks.md), so it rules out other load, not the
  drift."""
  from scorejax.models.conv import conv2d

  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 128))
  w = 0.05 * jax.random.normal(jax.random.key(1), (3, 3, 128, 128))
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv2d(x, w, (1, 1), ((1, 1), (1, 1))) ** 2),
                          (0, 1)))
  out = {'jax': 1e3 * _best_time(lambda: grad(x, w), repeats)}
  try:
    import torch
  except ImportError:
    return out
  torch.set_num_threads(os.cpu_count() or 1)
  xt = torch.randn(8, 128, 32, 32, requires_grad=True)
  wt = (0.05 * torch.randn(128, 128, 3, 3)).requires_grad_()

  def torch_step():
    (torch.nn.functional.conv2d(xt, wt, padding=1) ** 2).sum().backward()
    return 0

  out['torch'] = 1e3 * _best_time(torch_step, repeats)
  return out


def _table(results: list[dict]) -> str:
  rows = ['| network | devices | params | forward s | fwd images/s | fwd GFLOP | fwd GFLOP/s '
          '| train step s | step images/s | step GFLOP | step GFLOP/s '
          '| PyTorch forward / step s (interleaved) | compile s (fwd / step) | speed check ms |',
          '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    ref = (r['torch_forward_s'], r['torch_step_s']) if 'torch_step_s' in r else None
    rows.append(
        f"| {r['name']} | {r['devices']} | {r['params'] / 1e6:.2f}M | {r['forward_s']:.3f} "
        f"| {BATCH / r['forward_s']:.1f} | {r['forward_gflop']:.1f} "
        f"| {r['forward_gflop'] / r['forward_s']:.0f} | {r['step_s']:.3f} "
        f"| {BATCH / r['step_s']:.1f} | {r['step_gflop']:.1f} "
        f"| {r['step_gflop'] / r['step_s']:.0f} "
        f"| {f'{ref[0]:.3f} / {ref[1]:.3f}' if ref else '-'} "
        f"| {r['forward_compile_s']:.0f} / {r['step_compile_s']:.0f} "
        f"| {r.get('check_ms', float('nan')):.1f} |")
  return '\n'.join(rows)


def _write(section: str) -> None:
  path = ROOT / 'docs' / 'benchmarks.md'
  text = path.read_text() if path.exists() else '# scorejax benchmarks\n'
  begin, end = '<!-- bench_models:begin -->', '<!-- bench_models:end -->'
  block = f'{begin}\n{section}\n{end}'
  pattern = re.compile(re.escape(begin) + '.*?' + re.escape(end), re.S)
  text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
      text.rstrip('\n') + '\n\n' + block + '\n')
  path.write_text(text)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default='ddpmpp_cifar10,ncsnpp_small,ddpmpp_small')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--devices', default='1,2',
                      help='comma-separated virtual CPU device counts to split the batch over')
  parser.add_argument('--no_write', action='store_true')
  args = parser.parse_args()
  host_memory.reexec_with_tuned_malloc()
  device_counts = [int(d) for d in args.devices.split(',')]
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={max(device_counts)}')
  jax.config.update('jax_default_matmul_precision', 'highest')

  load_before = os.getloadavg()[0]
  calibration = calibration_ms(args.repeats)
  print(json.dumps({'calibration_ms': calibration}), flush=True)
  results = []
  for name in args.cases.split(','):
    twin = torch_calls(name)
    for devices in device_counts:
      results.append(bench(name, args.repeats, devices, twin))
      # The machine's speed right after the row (it drifts): PyTorch's one-conv step.
      results[-1]['check_ms'] = calibration_ms(args.repeats).get('torch', float('nan'))
      print(json.dumps(results[-1]), flush=True)
    del twin
  table = _table(results)
  print(table)
  if not args.no_write:
    machine = f'{platform.machine()}, {os.cpu_count()} CPU cores'
    load = f'{load_before:.1f} / {os.getloadavg()[0]:.1f}'
    speed = ', '.join(f'{k} {v:.1f} ms' for k, v in calibration.items())
    _write('## Models (`scripts/bench_models.py`)\n\n'
           f'Machine: {machine}, 1-minute load average before / after: {load} (a load above '
           f'1 means other jobs were running); speed check (one 3x3 conv 128->128 on 8x32x32, '
           f'forward + gradients, see `calibration_ms`): {speed} before the first row; '
           f'batch {BATCH}, float32, precision "highest"; '
           f'JAX {jax.__version__}; {host_memory.describe()}, PyTorch in the same process. '
           'Command: `python scripts/bench_models.py '
           f'--repeats {args.repeats} --devices {args.devices}`.\n\n{table}\n\n{NOTES}')


if __name__ == '__main__':
  main()
