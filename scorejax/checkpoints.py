"""Checkpoints of the training state: periodic, preemption, and fallback on corruption.

Layout under a workdir (score_sde's, with orbax step directories):

  checkpoints/<step>/state   kept snapshots (every `training.snapshot_freq` steps)
  checkpoints/<step>/meta    JSON: step, data position, config name, ...
  checkpoints-meta/<step>/   frequent preemption snapshots, only the latest one kept

`state` is the `TrainState` pytree (`step`, `params`, `ema_params`, `opt_state`). A
checkpoint written by an importer may hold only `params` and/or `ema_params` under
`state`; `restore_params` reads those without knowing the optimizer. Orbax writes each
step to a temporary directory and renames it when complete, so a process killed while
saving leaves no half-written step behind; a step whose files were damaged afterwards
fails to restore, is reported, and the next older one is used.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp

PERIODIC_DIR = 'checkpoints'
PREEMPTION_DIR = 'checkpoints-meta'

PyTree = Any


def _manager(directory: pathlib.Path, max_to_keep: int | None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
  )
  return ocp.CheckpointManager(directory.absolute(), options=options)


class Checkpointer:
  """Two orbax managers: kept periodic snapshots and one preemption snapshot.

  Args:
    workdir: the run's directory.
    max_to_keep: periodic snapshots to keep (None keeps all).
  """

  def __init__(self, workdir: str | pathlib.Path, max_to_keep: int | None = None):
    workdir = pathlib.Path(workdir)
    self.periodic = _manager(workdir / PERIODIC_DIR, max_to_keep)
    self.preemption = _manager(workdir / PREEMPTION_DIR, 1)

  def save(self, step: int, state: PyTree, meta: dict, *, preemption: bool = False) -> None:
    """Saves `state` and the JSON-able `meta` at `step` (blocks until the host copy)."""
    manager = self.preemption if preemption else self.periodic
    if step in manager.all_steps():
      return
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    manager.save(step, args=args, force=True)

  def wait(self) -> None:
    """Waits for background writes to finish."""
    self.periodic.wait_until_finished()
    self.preemption.wait_until_finished()

  def close(self) -> None:
    self.periodic.close()
    self.preemption.close()

  def candidates(self) -> Iterator[tuple[int, ocp.CheckpointManager]]:
    """`(step, manager)` of every stored snapshot, newest first."""
    pairs = [(s, self.preemption) for s in self.preemption.all_steps()]
    pairs += [(s, self.periodic) for s in self.periodic.all_steps()]
    yield from sorted(pairs, key=lambda pair: pair[0], reverse=True)

  def latest_step(self) -> int | None:
    return next((step for step, _ in self.candidates()), None)

  def restore_latest(self, target: PyTree) -> tuple[PyTree, dict, int] | None:
    """Restores the newest snapshot that reads back, shaped and sharded like `target`.

    Args:
      target: a state with the checkpoint's structure (e.g. a freshly initialised
        `TrainState`, whose shardings the restored arrays take).

    Returns:
      `(state, meta, step)`, or None when there is no readable snapshot.
    """
    for step, manager in self.candidates():
      try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
      except Exception as error:  # noqa: BLE001 - any read failure means: try an older one
        logging.warning(
            'checkpoint %s/%d failed to restore (%s: %s); trying the previous one',
            manager.directory,
            step,
            type(error).__name__,
            str(error).splitlines()[0][:200] if str(error) else '',
        )
        continue
      return restored['state'], dict(restored['meta'] or {}), step
    return None


def saved_at(step_dir: pathlib.Path) -> int | None:
  """When orbax committed this step (`commit_timestamp_nsecs` of its step metadata), or None
  for a step without that file (an importer's layout). Two trainings that both reach a step
  in the same place give different stamps."""
  try:
    metadata = json.loads((pathlib.Path(step_dir) / '_CHECKPOINT_METADATA').read_text())
  except (OSError, ValueError):
    return None
  stamp = metadata.get('commit_timestamp_nsecs') if isinstance(metadata, dict) else None
  return int(stamp) if stamp is not None else None


def find_step_dir(path: str | pathlib.Path, step: int | None = None) -> pathlib.Path:
  """The directory of one checkpoint step.

  Args:
    path: a workdir, a `checkpoints` directory or a step directory.
    step: a step number; None picks the newest step found (preemption ones included).

  Returns:
    The step directory (containing `state/`).

  Raises:
    FileNotFoundError: when no such checkpoint exists.
  """
  path = pathlib.Path(path)
  if (path / 'state').is_dir():
    return path
  roots = [path / PERIODIC_DIR, path / PREEMPTION_DIR, path]
  found: dict[int, pathlib.Path] = {}
  for root in roots:
    if not root.is_dir():
      continue
    for child in root.iterdir():
      if child.name.isdigit() and (child / 'state').is_dir():
        found.setdefault(int(child.name), child)
  if step is not None:
    if step not in found:
      raise FileNotFoundError(f'no checkpoint for step {step} under {path}; found {sorted(found)}')
    return found[step]
  if not found:
    raise FileNotFoundError(f'no checkpoint under {path} (looked in {PERIODIC_DIR}/, '
                            f'{PREEMPTION_DIR}/ and the directory itself)')
  return found[max(found)]


def restore_params(
    path: str | pathlib.Path, step: int | None = None, *, use_ema: bool = True
) -> tuple[PyTree, int]:
  """Reads only the network parameters of a checkpoint (train or imported).

  Args:
    path: a workdir, a checkpoints directory or a step directory.
    step: which step (None: the newest).
    use_ema: prefer `ema_params` (falls back to `params` when absent).

  Returns:
    `(params, step)`: the `params` collection as host arrays, and the step read.

  Raises:
    FileNotFoundError: when there is no checkpoint.
    KeyError: when the checkpoint holds neither `params` nor `ema_params`.
  """
  params, ema_params, step = restore_weights(path, step)
  return (ema_params if use_ema else params), step


def restore_weights(
    path: str | pathlib.Path, step: int | None = None,
) -> tuple[PyTree, PyTree, int]:
  """`(params, ema_params, step)` of a checkpoint (train or imported) as host arrays, read
  once; a checkpoint with only one of the two gives it for both.

  Raises:
    FileNotFoundError: when there is no checkpoint.
    KeyError: when the checkpoint holds neither `params` nor `ema_params`.
  """
  step_dir = find_step_dir(path, step)
  tree = jax.device_get(_restore_on_this_host(step_dir / 'state'))
  if 'params' not in tree and 'ema_params' not in tree:
    raise KeyError(f'{step_dir}/state holds neither params nor ema_params: {sorted(tree)}')
  params = tree.get('params', tree.get('ema_params'))
  ema_params = tree.get('ema_params', params)
  return params, ema_params, int(step_dir.name) if step_dir.name.isdigit() else 0


class _ItemWithoutStepMetadata(logging.Filter):
  """Drops orbax's warning that an item directory (`<step>/state`) has no step metadata:
  the manager writes that file one level up, and reading the item alone is intended."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith('Metadata file does not exist')


def _restore_on_this_host(path: pathlib.Path) -> PyTree:
  """Restores a saved pytree onto this process's first CPU device.

  Explicit shardings make checkpoints written by any topology (e.g. two processes)
  readable by one process; without them orbax reuses the saved device assignment.
  """
  quiet = _ItemWithoutStepMetadata()
  logger = logging.getLogger('absl')  # orbax logs through absl
  logger.addFilter(quiet)
  try:
    return _restore_pytree(path)
  finally:
    logger.removeFilter(quiet)


def _restore_pytree(path: pathlib.Path) -> PyTree:
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, 'item_metadata', metadata)
    tree = dict(getattr(tree, 'tree', tree))
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend='cpu')[0])
    restore_args = jax.tree.map(
        lambda leaf: ocp.ArrayRestoreArgs(sharding=cpu) if hasattr(leaf, 'shape')
        else ocp.RestoreArgs(),
        tree,
    )
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
