"""Weights of the FID Inception-v3: conversion from pytorch-fid's state_dict, `.npz` storage.

The published port of the TF `inception-2015-12-05` graph is pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`, a plain torch `state_dict` (loaded here with
`torch.load(weights_only=True)`, which never executes code). It is converted once, on the
user's machine, into a flat `.npz` keyed by the Flax variable paths of
`scorejax.inception.InceptionV3` (`params/Mixed_5b/branch1x1/conv/kernel`, ...), which is
what evaluation loads; torch is needed only for the conversion.

EDM's `inception-2015-12-05.pkl` is a pickle wrapping a TorchScript module: unpickling it
runs arbitrary code, so it is not read here; use the pytorch-fid file (same TF graph).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np

from scorejax import inception

Variables = dict

WEIGHTS_ENV_VAR = 'SCOREJAX_INCEPTION_PATH'
PYTORCH_FID_URL = (
  'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
  'pt_inception-2015-12-05-6726825d.pth'
)


def missing_weights_message(path: str | None) -> str:
  """One line saying which file is missing, where to configure it and how to get it."""
  return (
    f'Inception weights not found at {path!r}: set config field eval.inception_path or env var '
    f'{WEIGHTS_ENV_VAR} to an .npz made by `python scripts/convert_inception.py '
    f'--pth pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz` '
    f'(download the .pth on a connected machine from {PYTORCH_FID_URL}; see docs/evaluation.md)'
  )


def torch_state_dict_to_variables(state_dict: Mapping[str, np.ndarray]) -> Variables:
  """Converts a pytorch-fid `FIDInceptionV3` state_dict into Flax variables.

  Conv weights `[O, I, kh, kw]` become kernels `[kh, kw, I, O]`, the fc weight `[O, I]`
  becomes `[I, O]`, BatchNorm `weight/bias/running_mean/running_var` become
  `params/.../scale, bias` and `batch_stats/.../mean, var`. `num_batches_tracked` and
  auxiliary-classifier entries (absent from the FID network) are ignored.

  Args:
    state_dict: name -> array (numpy or torch tensors converted with `.numpy()`).

  Returns:
    `{'params': ..., 'batch_stats': ...}` nested dicts of float32 numpy arrays.

  Raises:
    ValueError: on unknown entries, or if the result does not match the network's shapes.
  """
  flat = {}
  for name, value in state_dict.items():
    value = np.asarray(value, np.float32)
    parts = name.split('.')
    if parts[-1] == 'num_batches_tracked' or parts[0] == 'AuxLogits':
      continue
    if parts[0] == 'fc':
      flat['params/fc/' + {'weight': 'kernel', 'bias': 'bias'}[parts[1]]] = (
        value.T if parts[1] == 'weight' else value
      )
      continue
    *module, layer, field = parts
    prefix = '/'.join(module)
    if layer == 'conv' and field == 'weight':
      flat[f'params/{prefix}/conv/kernel'] = value.transpose(2, 3, 1, 0)
    elif layer == 'bn' and field in ('weight', 'bias'):
      flat[f'params/{prefix}/bn/' + {'weight': 'scale', 'bias': 'bias'}[field]] = value
    elif layer == 'bn' and field in ('running_mean', 'running_var'):
      flat[f'batch_stats/{prefix}/bn/' + field.removeprefix('running_')] = value
    else:
      raise ValueError(f'Unexpected entry {name!r} in the Inception state_dict')
  variables = unflatten_variables(flat)
  check_variables(variables)
  return variables


def check_variables(variables: Variables) -> None:
  """Checks paths and shapes against `InceptionV3` (evaluated abstractly, no compute).

  Raises:
    ValueError: listing missing / unexpected paths or mismatched shapes.
  """
  expected = jax.eval_shape(inception.init_variables, jax.random.key(0))
  want = {k: tuple(v.shape) for k, v in flatten_variables(expected).items()}
  got = {k: tuple(np.shape(v)) for k, v in flatten_variables(variables).items()}
  problems = [f'missing {k}' for k in sorted(want.keys() - got.keys())]
  problems += [f'unexpected {k}' for k in sorted(got.keys() - want.keys())]
  shared = sorted(want.keys() & got.keys())
  problems += [f'{k}: shape {got[k]} != {want[k]}' for k in shared if got[k] != want[k]]
  if problems:
    raise ValueError(
      f'Inception variables do not match the FID network ({len(problems)} problems): '
      + '; '.join(problems[:10])
    )


def flatten_variables(variables: Mapping) -> dict[str, np.ndarray]:
  """Nested dicts -> `{'params/a/b/kernel': array}`."""
  flat = {}

  def visit(prefix, node):
    if isinstance(node, Mapping):
      for key, child in node.items():
        visit(f'{prefix}/{key}' if prefix else key, child)
    else:
      flat[prefix] = node

  visit('', variables)
  return flat


def unflatten_variables(flat: Mapping[str, np.ndarray]) -> Variables:
  """`{'params/a/b/kernel': array}` -> nested dicts."""
  nested: dict = {}
  for path, value in flat.items():
    node = nested
    *parents, leaf = path.split('/')
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return nested


def save_variables(path: str, variables: Variables) -> None:
  """Writes variables to an uncompressed `.npz` keyed by their Flax paths."""
  np.savez(path, **{k: np.asarray(v) for k, v in flatten_variables(variables).items()})


def load_variables(path: str | None) -> Variables:
  """Loads and checks converted Inception variables from `path` (or `$SCOREJAX_INCEPTION_PATH`).

  Raises:
    FileNotFoundError: with `missing_weights_message` when no file is there.
    ValueError: if the file does not hold the FID network's variables.
  """
  path = path or os.environ.get(WEIGHTS_ENV_VAR)
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(missing_weights_message(path))
  with np.load(path) as data:
    variables = unflatten_variables({k: data[k] for k in data.files})
  check_variables(variables)
  return variables


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torch `state_dict` file safely (`weights_only=True`) into numpy arrays."""
  import torch  # Only the one-off conversion needs torch.

  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  return {name: tensor.detach().cpu().numpy() for name, tensor in state_dict.items()}
