"""Importers for score_sde checkpoints: PyTorch `.pth` and the original JAX (flax msgpack).

Both produce Flax variables `{'params': ...}` for `scorejax.models.make_model(config)`.

**Parameter names.** scorejax's NCSN++ / DDPM names its submodules exactly as score_sde's
JAX models do (Flax automatic names in call order: `Conv_0`, `Dense_1`,
`ResnetBlockBigGANpp_3`, `AttnBlockpp_0`, `Combine_1`, `GroupNorm_2`, ...), so a JAX
checkpoint's `optimizer.target` / `params_ema` *are* scorejax parameters; the importer
only checks them against the network's shapes.

The PyTorch port keeps the same names *inside* each block (`GroupNorm_0`, `Conv_0`,
`Dense_0`, `NIN_0`, `Conv2d_0`) but flattens the top level into `all_modules.<i>`, in
the order the forward calls them. The i-th torch module with parameters is therefore the
i-th top-level Flax submodule with parameters, in call order (recorded once by tracing
`init` abstractly, no allocation). Tensors change layout as follows:

| torch | Flax |
|---|---|
| conv `weight` (O, I, kh, kw) | `kernel` / FIR `Conv2d` `weight` (kh, kw, I, O) |
| Linear `weight` (out, in) | Dense `kernel` (in, out) |
| GroupNorm `weight`, `bias` | `scale`, `bias` |
| NIN `W`, `b`; Fourier `W`; biases | unchanged |

The `sigmas` buffer is dropped (the network rebuilds it from the config).

**EMA.** A score_sde_pytorch checkpoint stores the EMA as a nameless list
`ema.shadow_params`, in `model.parameters()` order restricted to trainable tensors: the
frozen Fourier `W` is not in it and always comes from `model`. `ema_state_dict` puts the
list back onto names.

**Safety.** `load_pth` uses `torch.load(weights_only=True)` with an allow-list of the
few numpy globals these checkpoints hold (the optimizer's learning rate is a numpy
float64); anything else, e.g. a pickle whose `__reduce__` would run code, is refused
before it runs, with `UnsafeCheckpointError`.
"""

from __future__ import annotations

import functools
import json
import pathlib
import pickle
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scorejax.models import make_model
from scorejax.models.factory import ConfigSection

Variables = dict[str, Any]
TORCH_PREFIX = 'module.'
_TORCH_MODULE_LIST = 'all_modules'


class UnsafeCheckpointError(ValueError):
  """A checkpoint needs objects outside the allow-list to load; it was not loaded."""


# ---------------------------------------------------------------------------------------
# The network's parameter structure.


def _sections_key(config: Any) -> str:
  """A JSON key of the `model` and `data` sections (what decides the network)."""
  sections = {}
  for name in ('model', 'data'):
    section = config[name] if isinstance(config, Mapping) else getattr(config, name, None)
    if hasattr(section, 'to_dict'):
      section = section.to_dict()
    sections[name] = section
  return json.dumps(sections, sort_keys=True, default=str)


@functools.lru_cache(maxsize=16)
def _abstract_params(sections_key: str, element_shape: tuple[int, ...] | None
                     ) -> tuple[dict, tuple[str, ...]]:
  config = json.loads(sections_key)
  model = make_model(config)
  if element_shape is None:
    data = ConfigSection(config, 'data')
    size = int(data.require('image_size'))
    element_shape = (size, size, int(data.get('num_channels', 3)))
  x = jnp.zeros((1, *element_shape), jnp.float32)
  labels = jnp.ones((1,), jnp.float32)
  order: list[str] = []

  def record(next_fun, args, kwargs, context):
    scope = context.module.scope
    if context.method_name == '__call__' and scope is not None and len(scope.path) == 1:
      if scope.path[0] not in order:
        order.append(scope.path[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, labels))
  return variables['params'], tuple(order)


def abstract_params(
    config: Any, element_shape: tuple[int, ...] | None = None,
) -> tuple[dict, tuple[str, ...]]:
  """Shapes of the network's parameters and its top-level submodules in call order.

  Traced once per distinct `model` / `data` sections (`jax.eval_shape`, nothing is
  allocated) and cached.

  Args:
    config: a score_sde-style config (see `make_model`).
    element_shape: the shape of one example (default: the `data` section's image,
      `(image_size, image_size, num_channels)`; 2-D toys pass `(2,)`).

  Returns:
    `(params, call_order)`: `params` is the `params` collection of `ShapeDtypeStruct`s;
    `call_order` names the top-level submodules in the order the forward first calls
    them (parameter-free ones included).
  """
  return _abstract_params(_sections_key(config),
                          None if element_shape is None else tuple(element_shape))


def mismatched_params(
    tree: Mapping, expected: Mapping,
) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
  """How `tree` differs from `expected` (e.g. `abstract_params`): the sorted names (key
  paths) missing from it, those it has in excess, and `(name, its shape, expected shape)`
  for those of another shape. All empty when it fits."""
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  reshaped = [(k, tuple(np.shape(flat[k])), tuple(want[k].shape))
              for k in sorted(want.keys() & flat.keys())
              if tuple(np.shape(flat[k])) != tuple(want[k].shape)]
  return sorted(want.keys() - flat.keys()), sorted(flat.keys() - want.keys()), reshaped


def _describe_mismatch(tree: Mapping, expected: Mapping) -> list[str]:
  missing, unexpected, reshaped = mismatched_params(tree, expected)
  return ([f'missing {k}' for k in missing] + [f'unexpected {k}' for k in unexpected]
          + [f'{k}: shape {have}, expected {want}' for k, have, want in reshaped])


def check_params(params: Mapping, config: Any) -> dict:
  """Checks `params` against the network of `config`; returns them as float32 numpy.

  Raises:
    ValueError: listing missing / unexpected / mis-shaped parameters.
  """
  expected, _ = abstract_params(config)
  problems = _describe_mismatch(params, expected)
  if problems:
    shown = '; '.join(problems[:10]) + (f'; ... ({len(problems)} in all)'
                                        if len(problems) > 10 else '')
    raise ValueError(f'parameters do not fit the network of this config: {shown}')
  return jax.tree.map(lambda a: np.asarray(a, np.float32), dict(params))


# ---------------------------------------------------------------------------------------
# PyTorch state dicts.


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {(k[len(TORCH_PREFIX):] if k.startswith(TORCH_PREFIX) else k): _to_numpy(v)
          for k, v in state_dict.items()}


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _group_by_module(state_dict: Mapping[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
  groups: dict[int, dict[str, np.ndarray]] = {}
  for key, value in state_dict.items():
    parts = key.split('.')
    if parts[0] != _TORCH_MODULE_LIST:
      if key == 'sigmas':  # a buffer the network rebuilds from the config
        continue
      raise ValueError(f'unexpected state_dict entry {key!r} (expected all_modules.<i>.*)')
    groups.setdefault(int(parts[1]), {})['.'.join(parts[2:])] = value
  return dict(sorted(groups.items()))


def torch_module_names(state_dict: Mapping[str, Any], config: Any) -> dict[int, str]:
  """Maps each `all_modules.<i>` holding parameters to its top-level Flax submodule.

  Raises:
    ValueError: when the number of parameterized modules differs.
  """
  params, order = abstract_params(config)
  flax_names = [name for name in order if name in params]
  groups = _group_by_module(_strip_prefix(state_dict))
  if len(groups) != len(flax_names):
    raise ValueError(f'the state_dict has {len(groups)} modules with parameters, the network '
                     f'of this config has {len(flax_names)}: wrong config for this checkpoint?')
  return dict(zip(groups, flax_names, strict=True))


def _convert_leaf(name: str, value: np.ndarray, target: Mapping, where: str):
  if name == 'weight':
    if 'kernel' in target and value.ndim == 4:  # nn.Conv2d -> nn.Conv
      return 'kernel', value.transpose(2, 3, 1, 0)
    if 'kernel' in target and value.ndim == 2:  # nn.Linear -> nn.Dense
      return 'kernel', value.T
    if 'scale' in target and value.ndim == 1:  # nn.GroupNorm
      return 'scale', value
    if 'weight' in target and value.ndim == 4:  # FIR Conv2d: OIHW -> HWIO
      return 'weight', value.transpose(2, 3, 1, 0)
  elif name in target:  # bias, NIN W / b, Fourier W
    return name, value
  raise ValueError(f'no Flax parameter for torch tensor {where}.{name} {value.shape} '
                   f'(the module has {sorted(target)})')


def torch_state_dict_to_variables(state_dict: Mapping[str, Any], config: Any) -> Variables:
  """Converts a score_sde_pytorch `state_dict` into scorejax variables.

  Args:
    state_dict: arrays (numpy or torch) keyed by the reference's names, with or without
      the `module.` prefix of `DataParallel`.
    config: the score_sde-style config of the network (`model` and `data` sections).

  Returns:
    `{'params': ...}` for `make_model(config)`, float32 numpy arrays.

  Raises:
    ValueError: when the state_dict does not fit the network of `config`.
  """
  state_dict = _strip_prefix(state_dict)
  expected, _ = abstract_params(config)
  names = torch_module_names(state_dict, config)
  params: dict[str, Any] = {}
  for index, tensors in _group_by_module(state_dict).items():
    flax_name = names[index]
    out: dict[str, Any] = {}
    for key, value in tensors.items():
      *path, leaf = key.split('.')
      target, node = expected[flax_name], out
      for part in path:
        if part not in target:
          raise ValueError(f'all_modules.{index}.{key}: {flax_name} has no submodule {part!r}')
        target, node = target[part], node.setdefault(part, {})
      flax_leaf, array = _convert_leaf(leaf, value, target, f'all_modules.{index}')
      node[flax_leaf] = array
    params[flax_name] = out
  return {'params': check_params(params, config)}


def _frozen_keys(state_dict: Mapping[str, np.ndarray], names: Mapping[int, str]) -> set[str]:
  """The reference's non-trainable parameters: the Gaussian-Fourier `W`."""
  return {key for key in state_dict
          if key.startswith(_TORCH_MODULE_LIST + '.')
          and names.get(int(key.split('.')[1]), '').startswith('GaussianFourierProjection')}


def ema_state_dict(state_dict: Mapping[str, Any], shadow_params: list[Any],
                   config: Any) -> dict[str, np.ndarray]:
  """Puts `ema.shadow_params` (a nameless list) back onto the state_dict names.

  `shadow_params[i]` is the i-th *trainable* parameter in `state_dict` order; buffers
  (`sigmas`) and frozen parameters (the Fourier `W`) keep their `state_dict` values.

  Raises:
    ValueError: when the list does not match the trainable parameters.
  """
  state_dict = _strip_prefix(state_dict)
  frozen = _frozen_keys(state_dict, torch_module_names(state_dict, config))
  trainable = [k for k in state_dict if k.startswith(_TORCH_MODULE_LIST + '.') and k not in frozen]
  if len(trainable) != len(shadow_params):
    raise ValueError(f'{len(shadow_params)} EMA shadow params for {len(trainable)} trainable '
                     'parameters: not an EMA of this model')
  out = dict(state_dict)
  for key, shadow in zip(trainable, shadow_params, strict=True):
    shadow = _to_numpy(shadow)
    if shadow.shape != state_dict[key].shape:
      raise ValueError(f'EMA shadow param for {key} has shape {shadow.shape}, '
                       f'expected {state_dict[key].shape}: misaligned shadow_params list')
    out[key] = shadow
  return out


def _safe_globals() -> list:
  dtypes = np.dtypes
  return [np._core.multiarray.scalar, np.dtype, dtypes.Float64DType, dtypes.Float32DType,
          dtypes.Int64DType, dtypes.Int32DType, dtypes.BoolDType]


def load_pth(path: str | pathlib.Path) -> dict[str, Any]:
  """Loads a score_sde_pytorch checkpoint without running arbitrary pickled code.

  Raises:
    UnsafeCheckpointError: when the file needs globals outside the allow-list (for
      example a `__reduce__` payload); nothing from it is executed.
  """
  import torch  # an optional dependency, needed only here

  try:
    with torch.serialization.safe_globals(_safe_globals()):
      return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as error:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if 'global' in line.lower()), lines[0] if lines else '')
    raise UnsafeCheckpointError(f'refusing to load {path}: it holds objects outside the '
                                f'allow-list ({reason[:200]})') from None


def pth_to_variables(checkpoint: Mapping[str, Any],
                     config: Any) -> tuple[Variables, Variables | None, int]:
  """Converts a loaded score_sde_pytorch checkpoint.

  Args:
    checkpoint: `{'model': state_dict, 'ema': {'shadow_params': [...], ...}, 'step': int,
      'optimizer': ...}` (the optimizer is ignored).
    config: the network's config.

  Returns:
    `(variables, ema_variables, step)`; `ema_variables` is None without an `'ema'` entry.
  """
  model_state = checkpoint['model']
  variables = torch_state_dict_to_variables(model_state, config)
  ema_variables = None
  if checkpoint.get('ema') is not None:
    shadow = list(checkpoint['ema']['shadow_params'])
    ema_variables = torch_state_dict_to_variables(
        ema_state_dict(model_state, shadow, config), config)
  return variables, ema_variables, int(checkpoint.get('step', 0))


# ---------------------------------------------------------------------------------------
# score_sde (JAX) checkpoints.


def _unwrap_params(tree: Mapping) -> Mapping:
  return tree['params'] if set(tree) == {'params'} else tree


def jax_checkpoint_to_variables(checkpoint: bytes | str | pathlib.Path | Mapping,
                                config: Any) -> tuple[Variables, Variables | None, int]:
  """Converts a score_sde (JAX) checkpoint: a flax msgpack of its `State`.

  The state holds `optimizer.target` (the parameters), `params_ema`, `step`, `lr`,
  `model_state`, `ema_rate` and `rng`; only the first three are read.

  Args:
    checkpoint: the file's bytes, its path, or the restored state dict.
    config: the network's config.

  Returns:
    `(variables, ema_variables, step)`.

  Raises:
    ValueError: when the parameters do not fit the network of `config`.
  """
  import flax.serialization

  if isinstance(checkpoint, str | pathlib.Path):
    checkpoint = pathlib.Path(checkpoint).read_bytes()
  if isinstance(checkpoint, bytes):
    checkpoint = flax.serialization.msgpack_restore(checkpoint)
  try:
    target = checkpoint['optimizer']['target']
  except (KeyError, TypeError):
    raise ValueError('not a score_sde checkpoint: no optimizer.target') from None
  variables = {'params': check_params(_unwrap_params(target), config)}
  ema_variables = None
  if checkpoint.get('params_ema') is not None:
    ema_variables = {'params': check_params(_unwrap_params(checkpoint['params_ema']), config)}
  return variables, ema_variables, int(np.asarray(checkpoint.get('step', 0)))


# ---------------------------------------------------------------------------------------
# Writing scorejax checkpoints.


def save_as_scorejax_checkpoint(variables: Variables, ema_variables: Variables | None,
                                step: int, directory: str | pathlib.Path,
                                meta: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes imported parameters as a params-only scorejax checkpoint.

  The layout is the train driver's (`scorejax.checkpoints`):
  `directory/checkpoints/<step>/state` with `params` and `ema_params` (the EMA, or the
  raw parameters when there is none), which the sample / eval modes restore with
  `checkpoints.restore_params(directory)`.

  Returns:
    The step directory written.
  """
  from scorejax import checkpoints

  state = {'params': variables['params'],
           'ema_params': (ema_variables or variables)['params']}
  checkpointer = checkpoints.Checkpointer(directory)
  try:
    checkpointer.save(int(step), state, {'step': int(step), 'imported': True, **(meta or {})})
    checkpointer.wait()
  finally:
    checkpointer.close()
  return checkpoints.find_step_dir(directory, int(step))
