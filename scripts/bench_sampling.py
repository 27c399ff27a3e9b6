"""Times the samplers and the likelihood and records the numbers in `docs/benchmarks.md`.

One network, one batch, one run, side by side:
- `forward`: one jitted score evaluation `score_fn(x, t)`, the unit of the other rows;
- PC sampler (reverse diffusion + Langevin, one compiled `fori_loop`): wall time per NFE in
  forwards;
- probability-flow ODE sampling: in-graph `rk45` (scipy's step control) and Tsit5
  (`scorejax.sampling.ode_sample`) against the reference's way,
  `scipy.integrate.solve_ivp(method='RK45')` on the host calling a jitted drift, at the same
  `rtol` / `atol` from the same prior sample: NFE and wall time per NFE in forwards;
- likelihood (`scorejax.likelihood.log_likelihood`, Rademacher, one JVP or one VJP carrying
  the drift per NFE) against the reference's host loop (RK45; jitted drift, then the drift
  again inside a jitted gradient for the divergence), same data, same Hutchinson noise: NFE,
  wall time per NFE in forwards, and bits/dim of both.

Each count of `--devices` (virtual CPU devices) runs every row in a process of its own, with the
batch split over the devices as `main.py` samples (`distributed.batch_sharded_score_builder`),
the unit forward included; the rows of each case sit side by side in one table. On a machine
with an accelerator the CPU device count changes nothing and one run is kept.

The network is the small DDPM++ of `tests/data/ddpmpp_small_config.json` (16x16x3, nf=32,
VP SDE) built by `scorejax.models.make_model`, with every parameter perturbed by N(0, 0.02^2)
so that the zero-initialised layers do not make the score trivial.

The ratio of a row moves by up to ~0.1 from one process to the next on a 2-core machine:
`--processes N` runs each device count N times and pools the calls; `--cases REGEX` times
only the matching rows (a quick re-measurement, not written to the docs).

Usage:
  python scripts/bench_sampling.py [--batch_size 8] [--pc_steps 50] [--rtol 1e-3]
    [--atol 1e-3] [--devices 1,2] [--processes 1] [--cases REGEX] [--no_write]
    [--doc docs/benchmarks.md] [--tag cpu]
"""

import argparse
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate

from scorejax import adaptive_sampler, distributed, edm_sampler, host_memory, likelihood, sampling
from scorejax import sde as sde_lib
from scorejax.models import make_model, make_score_fn

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _build_score_fn(sde, shape):
  """Returns `(score_fn_builder, variables, description)` for the bench network.

  Parameters are passed to every jitted function as arguments, never closed over: closed-over
  arrays become constants of the program, which XLA CPU handles badly inside loops.
  """
  key = jax.random.key(0)
  x = jnp.zeros(shape)
  labels = jnp.zeros((shape[0],))
  config = json.loads((_ROOT / 'tests' / 'data' / 'ddpmpp_small_config.json').read_text())
  model = make_model(config)
  variables = model.init(key, x, labels, train=False)
  apply = lambda v, x, labels: model.apply(v, x, labels, train=False)
  name = 'DDPM++ small (ddpmpp_small_config.json, make_model)'
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [leaf + 0.02 * jax.random.normal(k, leaf.shape) for leaf, k in
            zip(leaves, keys, strict=True)]
  variables = jax.tree.unflatten(treedef, leaves)
  count = sum(leaf.size for leaf in leaves)
  builder = lambda v: make_score_fn(lambda x, labels: apply(v, x, labels), sde)
  return builder, variables, f'{name}, {count:,} parameters'


def _compiled(fn):
  """Calls `fn` once (compiling it) and returns `() -> (seconds, out)` timing one call."""
  jax.block_until_ready(fn())

  def timed():
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out

  return timed


def _scipy_ode_sample(builder, variables, sde, x0, rtol, atol, eps, rows):
  """The reference's ODE sampler: host RK45 around a jitted probability-flow drift; each
  call copies the state to the devices (split by `rows`) and the drift back."""
  shape = x0.shape
  drift_fn = jax.jit(
      lambda v, x, t: sde.reverse(builder(v), probability_flow=True).sde(x, t)[0])

  def ode_func(t, x):
    x = jax.device_put(x.reshape(shape).astype(np.float32), rows)
    vec_t = jax.device_put(np.full((shape[0],), t, np.float32), rows)
    return np.asarray(drift_fn(variables, x, vec_t)).reshape(-1)

  ode_func(sde.T, np.asarray(x0))  # compile
  start = time.perf_counter()
  solution = integrate.solve_ivp(ode_func, (sde.T, eps), np.asarray(x0).reshape(-1),
                                 rtol=rtol, atol=atol, method='RK45')
  return time.perf_counter() - start, solution.nfev, solution.y[:, -1].reshape(shape)


def _scipy_log_likelihood(builder, variables, sde, x, noise, rtol, atol, eps, rows):
  """The reference's likelihood: host RK45; drift, then the drift again inside a gradient."""
  shape, batch = x.shape, x.shape[0]
  drift = lambda v, x, t: sde.reverse(builder(v), probability_flow=True).sde(x, t)[0]
  drift_fn = jax.jit(drift)

  @jax.jit
  def div_fn(v, x, t, noise):
    grad = jax.grad(lambda y: jnp.sum(drift(v, y, t) * noise))(x)
    return jnp.sum((grad * noise).reshape(batch, -1), axis=-1)

  def ode_func(t, state):
    sample = jax.device_put(state[:-batch].reshape(shape).astype(np.float32), rows)
    vec_t = jax.device_put(np.full((batch,), t, np.float32), rows)
    drift_out = np.asarray(drift_fn(variables, sample, vec_t)).reshape(-1)
    return np.concatenate([drift_out, np.asarray(div_fn(variables, sample, vec_t, noise))])

  init = np.concatenate([np.asarray(x).reshape(-1), np.zeros(batch)])
  ode_func(eps, init)  # compile
  start = time.perf_counter()
  solution = integrate.solve_ivp(ode_func, (eps, sde.T), init, rtol=rtol, atol=atol,
                                 method='RK45')
  elapsed = time.perf_counter() - start
  z = jnp.asarray(solution.y[:-batch, -1].reshape(shape), jnp.float32)
  logp = np.asarray(sde.prior_logp(z)) + solution.y[-batch:, -1]
  return elapsed, solution.nfev, logp


def run(args) -> tuple[str, list[dict]]:
  """Times every case; each row's unit is a forward timed right before and after it.

  The machine is shared and its load swings within seconds, so one forward timed at the start
  would not be the unit of a row timed minutes later: every timed call of a row is divided by
  the mean of two forward medians taken right before and after it (`add`).
  """
  sde = sde_lib.VPSDE()
  shape = (args.batch_size, args.image_size, args.image_size, 3)
  mesh = distributed.make_mesh()
  rows_sharding = distributed.batch_sharding(mesh)
  plain_builder, variables, network = _build_score_fn(sde, shape)
  # As `main.py` samples: the batch split over every device, parameters replicated.
  builder = distributed.batch_sharded_score_builder(plain_builder, mesh)
  variables = jax.device_put(variables, distributed.replicated_sharding(mesh))
  key = jax.random.key(0)
  x = jax.device_put(jax.random.normal(key, shape), rows_sharding)
  t = jax.device_put(jnp.full((shape[0],), 0.5), rows_sharding)
  forward = jax.jit(lambda v, x, t: builder(v)(x, t))
  timed_forward = _compiled(lambda: forward(variables, x, t))
  unit_fn = lambda: float(np.median([timed_forward()[0] for _ in range(9)]))
  rows = _Rows()

  def add(case, nfe, fn, notes='', repeats=1, timed=False):
    """Alternates `repeats` timed calls of `fn` with forward timings and adds the row: each
    call's ratio divides by the forward timed right before and after it (the load swings
    within seconds). `fn() -> out` is compiled by a first call and then timed call by call;
    with `timed`, `fn() -> (seconds, out)` times itself (the host scipy loops). A row that
    `--cases` does not match is skipped before anything compiles (returns None)."""
    if args.cases and not re.search(args.cases, case):
      return None
    timed_fn = fn if timed else _compiled(fn)
    seconds, units, ratios = [], [], []
    before = unit_fn()
    for _ in range(repeats):
      elapsed, out = timed_fn()
      after = unit_fn()
      count = nfe(out) if callable(nfe) else nfe
      seconds.append(elapsed)
      units.append(0.5 * (before + after))
      ratios.append(elapsed / count / units[-1])
      before = after
    rows.append(dict(case=case, nfe=count, seconds=seconds, units=units, ratios=ratios,
                     notes=notes(out) if callable(notes) else notes))
    return out

  loop_steps = 20
  loop = jax.jit(lambda v, x: jax.lax.fori_loop(
      0, loop_steps, lambda i, y: y - 1e-3 * builder(v)(y, t), x))
  add(f'the forward inside a `fori_loop` ({loop_steps} iterations)', loop_steps,
      lambda: loop(variables, x), 'floor of any in-graph loop', args.repeats)
  tol = dict(rtol=args.rtol, atol=args.atol)

  pc_fn = sampling.make_pc_sampler(builder, sde, shape, n_steps=args.pc_steps)
  add(f'PC sampler (reverse diffusion + Langevin, {args.pc_steps} steps)', lambda out: out[1],
      lambda: pc_fn(key, variables), 'goal <= 0.88', args.repeats)
  # The sampler's own work per NFE (noise, norms, updates), with a free score `-x`.
  bare_fn = sampling.make_pc_sampler(
      distributed.batch_sharded_score_builder(lambda v: lambda x, t: -x, mesh), sde, shape,
      n_steps=args.pc_steps)
  add('PC sampler machinery alone (score = -x)', lambda out: out[1],
      lambda: bare_fn(key, variables), 'sampler overhead per NFE', args.repeats)
  for churn in (0.0, 40.0):  # Karras et al. 2022: deterministic, and with churn noise
    edm_fn = edm_sampler.make_edm_sampler(builder, sde, shape, n_steps=args.pc_steps // 2,
                                          s_churn=churn)
    add(f'EDM sampler ({args.pc_steps // 2} Heun steps, s_churn = {churn:g})',
        lambda out: out[1], lambda f=edm_fn: f(key, variables), 'one compiled loop',
        args.repeats)
  # Jolicoeur-Martineau et al. 2021 with per-sample Brownian paths: data-dependent NFE.
  adaptive_fn = adaptive_sampler.make_adaptive_sampler(builder, sde, shape)
  add('adaptive SDE sampler (rtol 0.05, atol 0.0078)', lambda out: int(out[1]),
      lambda: adaptive_fn(key, variables), 'one compiled loop, Brownian paths', args.repeats)

  x_prior = sde.prior_sampling(jax.random.key(1), shape)
  for method in ['rk45', 'tsit5']:
    ode_fn = sampling.make_ode_sampler(builder, sde, shape, method=method, **tol)
    note = 'scipy RK45 controller, in-graph' if method == 'rk45' else 'diffrax'
    add(f'ODE sampler, in-graph `{method}`', lambda out: int(out[1]),
        lambda f=ode_fn: f(jax.random.key(1), variables), note + '; goal <= 1.0',
        args.repeats)
  add('ODE sampler, host scipy RK45 (reference way)', lambda out: out[0],
      lambda: (lambda r: (r[0], r[1:]))(
          _scipy_ode_sample(builder, variables, sde, x_prior, eps=1e-3, rows=rows_sharding,
                            **tol)),
      'reference: 1.03', timed=True)

  pixels = jax.random.randint(jax.random.key(2), shape, 0, 256) / 255.0
  data = 2.0 * (255.0 * pixels + jax.random.uniform(jax.random.key(3), shape)) / 256.0 - 1.0
  data = jax.device_put(data, rows_sharding)
  dim = np.prod(shape[1:])
  to_bpd = lambda logp: float(np.mean(-np.asarray(logp) / (dim * np.log(2)) + 7.0))
  lik_key = jax.random.key(4)
  noise = jax.device_put(jax.random.rademacher(lik_key, shape, jnp.float32), rows_sharding)
  bpds = {}
  for product, repeats in [('jvp', args.repeats), ('vjp', 1)]:
    lik_fn = jax.jit(lambda key, v, data, p=product: likelihood.log_likelihood(
        key, builder(v), sde, data, jacobian_product=p, method='rk45', **tol))
    goal = '; goal <= 2.0' if product == 'jvp' else ''
    out = add(
        f'likelihood, in-graph `rk45`, Rademacher ({product.upper()} with the drift)',
        lambda out: int(out[2]),
        lambda f=lik_fn: f(lik_key, variables, data),
        lambda out, g=goal: f'{to_bpd(out[0]):.4f} bpd{g}', repeats)
    if out is not None:
      bpds[product] = to_bpd(out[0])

  def reference_notes(out):
    bpd = to_bpd(out[1])
    if not bpds:
      return f'{bpd:.4f} bpd; reference: 3.0'
    diff = max(abs(b - bpd) for b in bpds.values())
    return f'{bpd:.4f} bpd (max abs diff to in-graph {diff:.4f}); reference: 3.0'

  add('likelihood, host scipy RK45 (reference way: drift, then drift in a gradient)',
      lambda out: out[0],
      lambda: (lambda r: (r[0], r[1:]))(
          _scipy_log_likelihood(builder, variables, sde, np.asarray(data), noise, eps=1e-5,
                                rows=rows_sharding, **tol)),
      reference_notes, timed=True)
  return network, rows


CPU_FINDINGS = r"""Findings (profiles: `jax.profiler` traces summed per XLA op, as
`scripts/profile_step.py` does, and the compiled HLO):
- **PC sampler: goal <= 0.88 reached on 2 devices, the way `main.py` samples on this 2-core
  machine (`distributed.configure_cpu_devices`: one virtual CPU device per core), in all four
  bench measurements of session 7 (0.79-0.88) but not in session 6's two (0.95-0.96); not
  reached on 1 device.** The ratio moves by up to ~0.1 from one process to the next (the
  bare forward loop too) and from call to call (the range in brackets), so one run is not
  the whole story. 2 devices: 0.88, 0.87 and 0.84 in the three runs of session 7 (this
  table is the last); `--processes 4 --cases 'PC sampler \('` (four processes per device
  count, 5 calls each, pooled; the machine ~30% slower than for this table) gave 0.79 (calls
  0.69-0.97; per process 0.78, 0.78, 0.79, 0.82) on 2 devices and 0.94 (0.84-1.08) on 1;
  eight short interleaved processes (`fori_loop` PC sampler, 50 steps, between medians of 20
  forwards, 7 rounds each) gave 0.78-0.93 on 2 devices (median 0.84); session 6's two full
  runs, on a day when the machine was slower, gave 0.95-0.96. 1 device: 0.91-0.96 in full
  runs, 0.93-0.97 in interleaved ones. In absolute terms the reference's PC sampler spends
  ~0.88 x 35 ms = 31 ms per NFE on this network (its forward: 0.035 s per the issue); this
  one 24 ms on 1 device and 14-16 ms on 2 (18 ms on session 6's slow day).
- **Why 1 device stays at ~0.93.** The sampler's own work is ~0.1 ms per NFE (row "machinery
  alone"). Profiled op by op and matched by layer, the forward inside the loop runs the same
  ~810 XLA ops (median 10 us each) at the same cost as a standalone call, except at the start
  of a standalone call: there the parameter-only ops that XLA hoists out of the loop (Winograd
  kernel transforms, broadcast constants) run alongside the first layers on the 2 cores (the
  first convolution: 1.76 ms there, 0.26 ms in the loop). That and argument handling (~0.3 ms
  with 288 parameter buffers) are all a loop saves: 5-8% of a forward. On 2 devices a
  standalone call ends when the slower device ends and pays the dispatch to both; inside the
  loop the two devices meet once per step (the Langevin norms: one all-reduce, XLA combines
  both norms), and a bare forward loop runs at 0.68-0.95 of a standalone call.
- **Tried for the 1-device ratio and not kept** (interleaved against the default, all
  within the noise or slower): one score call site per iteration instead of two; hoisting
  the time-only part of the network (time embedding and its per-block projections: 112 of
  1653 top-level ops) out of the loop by splitting the traced score function's jaxpr
  (samples equal to 4e-7; 0.957 -> 0.956); Winograd on smaller layers inside the loop
  (0.890 -> 0.902); `fori_loop(unroll=2)` (0.906 -> 0.922); XLA:CPU options:
  `--xla_cpu_use_onednn=true` (0.939 -> 0.926), the concurrency-optimized scheduler
  (0.96), YNNPACK fusions of dots and convolutions only (0.93) or with elementwise and reduce
  ops (1.01), no YNNPACK fusions (0.86, but only because the forward slows from 24 to 34 ms);
  parameters as compile-time constants (forward and sampler both ~3% faster, 0.94).
  Session 15: the batch split into two independent halves inside the loop body (so the two
  cores can run them side by side; one process, 7 interleaved rounds): the loop went from
  18.2 to 17.6 ms per forward, but the same split made the standalone forward 5% faster too
  (19.9 -> 18.8 ms), so split loop / split forward stays at 0.93; a faster forward, not a
  cheaper loop.
- **ODE: `method='rk45'`** (in-graph Dormand-Prince with scipy's exact step control:
  Hairer initial step, RMS norm of `err / (atol + rtol max(|y|, |y_new|))`, `0.9 err^-1/5`
  clipped to [0.2, 10], no growth after a rejection) takes **the same NFE as scipy RK45**
  (50 = 50; `tests/test_ode.py` checks equality at several tolerances) at 0.85-0.95 forwards
  per NFE: goal (<= 1.0, no more NFE) met. diffrax Tsit5 needs more NFE (its error
  estimator differs); diffrax Dopri5 is within ~10% of scipy.
- **Likelihood: 1.55-1.95 forwards per NFE with the JVP, 1.65-2.1 with the VJP** (drift and
  Hutchinson product from one `jax.jvp` / `jax.vjp`), against ~2.6-3.5 for the reference's way
  (drift, then the drift again inside a gradient) measured here: goal <= 2.0 met, bits/dim
  equal to the host scipy loop to 1e-4 at the same NFE (176). Both modes are fast inside
  the solver loop because every convolution, gradient ones included, is in XLA:CPU's
  canonical layout (`scorejax.models.conv`: a primitive whose JVP and transposes are
  canonical convolutions); with XLA's own transpose the in-loop VJP cost ~6 forwards
  (input-gradient convolutions in `01oi` layout fall off XLA:CPU's fast path in loops).
"""


GPU_FINDINGS = """Findings: none recorded for this machine yet; the table is this run's."""

FINDINGS = {'cpu': CPU_FINDINGS, 'gpu': GPU_FINDINGS}


def _cells(rows: list[dict]) -> list[str]:
  """Table cells of one case from one or more processes' rows of it (their calls pooled):
  NFE, wall ms, forward ms and forwards / NFE (medians; the ratio's range over the calls in
  brackets), notes (the first process's)."""
  pooled = lambda key: [value for row in rows for value in row[key]]
  median = lambda key: float(np.median(pooled(key)))
  ratios = pooled('ratios')
  ratio = f'{median("ratios"):.2f}'
  if len(ratios) > 1:
    ratio += f' ({min(ratios):.2f}-{max(ratios):.2f})'
  return [f'{rows[0]["nfe"]}', f'{1e3 * median("seconds"):.0f}', f'{1e3 * median("units"):.1f}',
          ratio, rows[0]['notes']]


class _Rows(list):
  """A list of row records (dicts) that prints each row as it is added (runs take minutes)."""

  def append(self, row):
    print(' | '.join([row['case']] + _cells([row])), flush=True)
    super().append(row)


def _child(args) -> None:
  """Runs every row on `args.child` virtual CPU devices and writes them to `args.rows_out`."""
  flags = os.environ.get('XLA_FLAGS', '')
  os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={args.child}'
  jax.config.update('jax_default_matmul_precision', 'highest')
  device = jax.devices()[0]
  network, rows = run(args)
  record = dict(network=network, rows=rows, platform=device.platform,
                device_kind=device.device_kind, devices=jax.device_count())
  pathlib.Path(args.rows_out).write_text(json.dumps(record))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--image_size', type=int, default=16)
  parser.add_argument('--pc_steps', type=int, default=50)
  parser.add_argument('--rtol', type=float, default=1e-3)
  parser.add_argument('--atol', type=float, default=1e-3)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--devices', default='1,2',
                      help='virtual CPU device counts, each in --processes processes of its own '
                      '(the batch is split over the devices, as main.py does); an accelerator '
                      'runs once')
  parser.add_argument('--processes', type=int, default=1,
                      help='processes per device count; each row pools the calls of all '
                      '(the ratio moves from one process to the next)')
  parser.add_argument('--cases', default=None,
                      help='time only the rows whose case matches this regular expression, '
                      "e.g. 'PC sampler \\(' (implies --no_write)")
  parser.add_argument('--no_write', action='store_true')
  parser.add_argument('--doc', default=str(_ROOT / 'docs' / 'benchmarks.md'),
                      help='the Markdown file whose section this run replaces')
  parser.add_argument('--tag', default=None,
                      help='names the section (default: the JAX platform, e.g. cpu, gpu)')
  parser.add_argument('--child', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--rows_out', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  host_memory.reexec_with_tuned_malloc()
  if args.child:
    _child(args)
    return
  load_before = os.getloadavg()
  start = time.perf_counter()
  records = []  # one list of process records per device count
  with tempfile.TemporaryDirectory() as tmp:
    for count in [int(d) for d in args.devices.split(',')]:
      records.append([])
      for process in range(args.processes):
        out = pathlib.Path(tmp) / f'{count}_{process}.json'
        subprocess.run([sys.executable, __file__, *sys.argv[1:], '--child', str(count),
                        '--rows_out', str(out)], check=True)
        records[-1].append(json.loads(out.read_text()))
      if records[-1][0]['platform'] != 'cpu':
        break  # an accelerator: the CPU device count would change nothing
  total_s = time.perf_counter() - start
  load_after = os.getloadavg()
  first = records[0][0]
  tag = args.tag or first['platform']
  # Rows of one case side by side, one per device count, each pooling its processes' calls.
  table = [[row['case'], str(runs[0]['devices'])] + _cells([r['rows'][i] for r in runs])
           for i, row in enumerate(first['rows']) for runs in records]
  counts = ', '.join(str(runs[0]['devices']) for runs in records)
  command = ('python scripts/bench_sampling.py '
             f'--batch_size {args.batch_size} --image_size {args.image_size} '
             f'--pc_steps {args.pc_steps} --rtol {args.rtol:g} --atol {args.atol:g} '
             f'--repeats {args.repeats} --devices {args.devices}')
  if args.processes > 1:
    command += f' --processes {args.processes}'
  if args.cases:
    command += f" --cases '{args.cases}'"
  processes_each = 'one process' if args.processes == 1 else f'{args.processes} processes'
  begin, end = f'<!-- bench_sampling:{tag}:begin -->', f'<!-- bench_sampling:{tag}:end -->'
  platform_name = first['platform'].upper()
  title = '' if tag == 'cpu' else f', {platform_name} ({first["device_kind"]})'
  lines = [
      begin,
      f'## Sampling and likelihood{title} (`scripts/bench_sampling.py`)',
      '',
      f'Machine: {platform.machine()}, {os.cpu_count()} CPU cores, JAX {platform_name} '
      f'devices: {counts} ({first["device_kind"]}; {processes_each} each); '
      f'{host_memory.describe()}; '
      'load average (1 min, above ~1 means other jobs were running) '
      f'{load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end; whole run '
      f'{total_s / 60:.1f} min, compilation included. Timings are medians of {args.repeats} '
      f'calls after a compiling call{", per process, pooled" if args.processes > 1 else ""} '
      '(the VJP likelihood and the scipy rows: one call each). '
      f'Network: {first["network"]}; VP SDE; batch {args.batch_size} of '
      f'{args.image_size}x{args.image_size}x3, split over the devices as `main.py` does '
      '(`distributed.batch_sharded_score_builder`); '
      f'rtol = {args.rtol:g}, atol = {args.atol:g}. Command: `{command}`.',
      '',
      '"forwards / NFE" is wall time per score evaluation divided by one jitted forward on the '
      'same devices, per timed call (the median of 9 forwards right before and of 9 right '
      'after that call, averaged; the row shows the medians over its calls, and the range of '
      'the ratio over them in brackets); '
      'NFE counts every evaluation of the score (in-graph: exact, `scorejax.ode`; scipy: '
      '`nfev`).',
      '',
      '| case | devices | NFE | wall ms | forward ms (around the row) | forwards / NFE | notes |',
      '|---|---|---|---|---|---|---|',
  ] + ['| ' + ' | '.join(row) + ' |' for row in table]
  lines += ['', FINDINGS.get(tag, GPU_FINDINGS).rstrip(), end]
  section = '\n'.join(lines)
  print(section)
  if args.no_write or args.cases:
    return
  path = pathlib.Path(args.doc)
  text = path.read_text() if path.exists() else '# scorejax benchmarks\n'
  if begin in text:
    text = re.sub(re.escape(begin) + '.*?' + re.escape(end), lambda _: section, text,
                  flags=re.DOTALL)
  else:
    text = text.rstrip('\n') + '\n\n' + section + '\n'
  path.write_text(text)


if __name__ == '__main__':
  main()
