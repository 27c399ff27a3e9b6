"""Converts a score_sde checkpoint (PyTorch `.pth` or JAX flax msgpack) to scorejax.

Writes a params-only scorejax checkpoint (`OUT/checkpoints/<step>/state` with `params`
and `ema_params`, see `scorejax.convert.save_as_scorejax_checkpoint`) that
`python main.py --mode=sample|eval` restores through `--config.sampling.checkpoint=OUT`
(or with `OUT` as the workdir).

Usage:
  python scripts/convert_checkpoint.py --pth checkpoint_26.pth --config CONFIG --out DIR
  python scripts/convert_checkpoint.py --jax checkpoint_26 --config CONFIG --out DIR

CONFIG is a scorejax / score_sde config file (`configs/*.py` with `get_config()`) or a
JSON dump of one; only its `model` and `data` sections are read. PyTorch files are
loaded with `torch.load(weights_only=True)` and a small allow-list: a file that needs
anything else (e.g. a pickle that would run code) is refused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys


def load_config(path: str):
  """A config from a `.json` dump or a Python file defining `get_config()`."""
  path = pathlib.Path(path)
  if path.suffix == '.json':
    return json.loads(path.read_text())
  # `configs/x.py` files import `configs.default`: put their repository root on the path.
  sys.path.insert(0, str(path.resolve().parent.parent))
  spec = importlib.util.spec_from_file_location(f'_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv: list[str] | None = None) -> pathlib.Path:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--pth', help='score_sde_pytorch checkpoint (.pth)')
  source.add_argument('--jax', help='score_sde (JAX) checkpoint file (flax msgpack)')
  parser.add_argument('--config', required=True, help='config file (.py or .json)')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--step', type=int, default=None, help='override the stored step')
  args = parser.parse_args(argv)

  import jax

  from scorejax import convert

  config = load_config(args.config)
  try:
    if args.pth:
      variables, ema, step = convert.pth_to_variables(convert.load_pth(args.pth), config)
    else:
      variables, ema, step = convert.jax_checkpoint_to_variables(args.jax, config)
  except (convert.UnsafeCheckpointError, ValueError) as error:
    raise SystemExit(f'error: {error}') from None
  step = step if args.step is None else args.step
  step_dir = convert.save_as_scorejax_checkpoint(
      variables, ema, step, args.out, meta={'source': str(args.pth or args.jax)})
  count = sum(a.size for a in jax.tree.leaves(variables))
  print(f'wrote {step_dir} (step {step}, {count:,} parameters, '
        f'ema_params from {"the EMA" if ema is not None else "the raw weights"})')
  return step_dir


if __name__ == '__main__':
  main()
