"""Where a network's forward or train step spends its time, op by op (XLA:CPU profile).

Builds the same forward / train step as `scripts/bench_models.py` (one of its cases),
runs it under `jax.profiler` with a Perfetto trace, and sums the wall time of every XLA
operation (thunk) by name, then by kind (convolution, fusion, dot, copy, ...). With
`--hlo` it also writes the optimized HLO so that an op name can be looked up.

Usage:
  python scripts/profile_step.py [--case ddpmpp_cifar10] [--what step|forward]
                                 [--devices 1] [--top 40] [--hlo FILE]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.util
import json
import os
import pathlib
import re
import sys
import tempfile


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--case', default='ddpmpp_cifar10')
  parser.add_argument('--what', default='step', choices=['step', 'forward'])
  parser.add_argument('--devices', type=int, default=1, help='virtual CPU devices')
  parser.add_argument('--calls', type=int, default=2, help='profiled calls')
  parser.add_argument('--top', type=int, default=40)
  parser.add_argument('--hlo', default=None, help='write the optimized HLO here')
  return parser.parse_args()


def _events(trace_dir: pathlib.Path) -> list[dict]:
  paths = list(trace_dir.rglob('perfetto_trace.json.gz'))
  if not paths:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {trace_dir}')
  with gzip.open(paths[0], 'rt') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  return [e for e in events if e.get('ph') == 'X' and 'dur' in e]


def main() -> None:
  args = _parse()
  from scorejax import host_memory

  host_memory.reexec_with_tuned_malloc()  # as main.py runs
  if args.devices > 1:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.devices}')
  import jax

  spec = importlib.util.spec_from_file_location(
      'bench_models', pathlib.Path(__file__).with_name('bench_models.py'))
  bench = importlib.util.module_from_spec(spec)
  sys.modules['bench_models'] = bench
  spec.loader.exec_module(bench)
  jax.config.update('jax_default_matmul_precision', 'highest')
  fn, compiled = bench.build(args.case, args.what, args.devices)
  hlo = compiled.as_text()
  if args.hlo:
    pathlib.Path(args.hlo).write_text(hlo)
  jax.block_until_ready(fn())
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    for _ in range(args.calls):
      jax.block_until_ready(fn())
    jax.profiler.stop_trace()
    events = _events(pathlib.Path(tmp))
  op_names = dict(re.findall(r'%([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo))
  ops = [e for e in events if e['name'] in op_names or re.match(r'[\w\-]+(\.\d+)?$', e['name'])
         and e['name'].split('.')[0] in _HLO_KINDS]
  by_name, counts = collections.Counter(), collections.Counter()
  for e in ops:
    by_name[e['name']] += e['dur'] / 1e3 / args.calls
    counts[e['name']] += 1
  wall = sum(e['dur'] for e in events if e['name'].startswith('ThunkExecutor::Execute (wait'))
  print(f'{len(ops)} XLA op events; op time {sum(by_name.values()):.1f} ms per call '
        f'(ops on different threads overlap); wall per call {wall / 1e3 / args.calls:.1f} ms')
  print(f'\n{"ms/call":>9} {"n":>4}  op  [source]')
  for name, ms in by_name.most_common(args.top):
    print(f'{ms:9.2f} {counts[name] // args.calls:4d}  {name}  [{_short(op_names.get(name, ""))}]')
  for title, key in (('HLO kind', lambda n: re.sub(r'\.\d+$', '', n)),
                     ('source (layer / operation)', lambda n: _source(op_names.get(n, '')))):
    groups = collections.Counter()
    for name, ms in by_name.items():
      groups[key(name)] += ms
    print(f'\n{"ms/call":>9}  {title}')
    for group, ms in groups.most_common(args.top):
      print(f'{ms:9.2f}  {group}')


_HLO_KINDS = {'copy', 'dot', 'convolution', 'while', 'reduce', 'transpose', 'custom-call',
              'all-reduce', 'rng-bit-generator', 'sort', 'scatter', 'gather', 'pad', 'slice',
              'concatenate', 'broadcast', 'reshape', 'conditional', 'call'}


def _short(op_name: str) -> str:
  return re.sub(r'^jit\([^)]*\)/', '', op_name)[-120:]


def _source(op_name: str) -> str:
  """The op's layer path without instance numbers and its primitive, e.g.
  `transpose(jvp(NCSNpp))/ResnetBlockBigGANpp/Conv/conv_general_dilated`."""
  text = re.sub(r'_\d+(?=/|$)', '', _short(op_name))
  text = re.sub(r'^(while/body/)?(closed_call/)?', '', text)
  return text[-110:]


if __name__ == '__main__':
  main()
