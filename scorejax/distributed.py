"""Devices, meshes and multi-host setup for data-parallel training.

Owns the one-dimensional `('data',)` device mesh, the shardings used by the drivers
(replicated state, batch split along its leading axis), the assembly of a global batch
from each host's shard, and the CPU-only default that splits a batch over virtual CPU
devices (one per core). Everything here is mechanics; no config is read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'
_HOST_DEVICE_FLAG = '--xla_force_host_platform_device_count'


def available_cpu_cores() -> int:
  """Number of CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - macOS
    return os.cpu_count() or 1


def default_cpu_device_count(per_process_batch_size: int, cores: int | None = None) -> int:
  """The largest number of CPU devices `<= cores` that divides the per-process batch."""
  cores = available_cpu_cores() if cores is None else cores
  for count in range(max(1, min(cores, per_process_batch_size)), 0, -1):
    if per_process_batch_size % count == 0:
      return count
  return 1


def configure_cpu_devices(per_process_batch_size: int) -> str | None:
  """Splits the CPU backend into one virtual device per core, unless the user chose.

  Must run before JAX initialises its backends. On a CPU-only host this lets `jit` split
  each batch over all cores (measured 1.3-2x faster train steps on 2 cores); on hosts
  with accelerators the flag only affects the unused CPU backend.

  Args:
    per_process_batch_size: the batch each process feeds; the device count divides it.

  Returns:
    A log line describing what was set, or None when `XLA_FLAGS` already sets the count
    or only one core is available.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if _HOST_DEVICE_FLAG in flags:
    return None
  count = default_cpu_device_count(per_process_batch_size)
  if count <= 1:
    return None
  os.environ['XLA_FLAGS'] = f'{flags} {_HOST_DEVICE_FLAG}={count}'.strip()
  return (
      f'XLA_FLAGS was not set: using {_HOST_DEVICE_FLAG}={count} so a CPU-only host splits '
      f'each batch over {count} cores (set XLA_FLAGS yourself to override).'
  )


def host_device_count_from_flags() -> int | None:
  """The virtual CPU device count requested in `XLA_FLAGS`, if any."""
  match = re.search(rf'{_HOST_DEVICE_FLAG}=(\d+)', os.environ.get('XLA_FLAGS', ''))
  return int(match.group(1)) if match else None


def initialize_distributed(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
  """Joins a multi-process JAX job (no-op for a single process).

  With an explicit coordinator address this starts the CPU collectives (gloo) too, so
  several processes on one machine form one job; on TPU pods / SLURM JAX finds its peers
  when called with no arguments.

  Args:
    coordinator_address: `'host:port'` of process 0, or None.
    num_processes: total number of processes, or None.
    process_id: this process's index, or None.
  """
  if coordinator_address is None and num_processes is None:
    if 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
      jax.distributed.initialize()
    return
  if num_processes == 1:
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )


def make_mesh() -> Mesh:
  """A one-dimensional `('data',)` mesh over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (train state, keys)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Splits axis `leading_axes` (the batch axis) over the `'data'` mesh axis.

  Args:
    mesh: the device mesh.
    leading_axes: number of unsplit axes before the batch axis (1 for the
      `[n_jitted_steps, B, ...]` stacks fed to a scanned train step).
  """
  return NamedSharding(mesh, PartitionSpec(*([None] * leading_axes), DATA_AXIS))


def batch_sharded_score_builder(builder: Callable[[Any], Callable], mesh: Mesh) -> Callable:
  """`builder` (`params -> score_fn(x, t)`) with every score evaluation pinned to the batch
  sharding of `mesh`: `x`, `t` and the score are split along their leading axis, so under
  `jax.jit` each device evaluates the network on its own rows inside any sampler loop."""
  rows = batch_sharding(mesh)

  def sharded_builder(params):
    score_fn = builder(params)

    def constrained(x, t):
      x = jax.lax.with_sharding_constraint(x, rows)
      t = jax.lax.with_sharding_constraint(t, rows)
      return jax.lax.with_sharding_constraint(score_fn(x, t), rows)

    return constrained

  return sharded_builder


def process_batch_slice(global_batch_size: int) -> slice:
  """The rows `[start, stop)` of a global batch that this process feeds.

  Raises:
    ValueError: if the global batch does not split evenly over processes and devices.
  """
  count = jax.process_count()
  if global_batch_size % jax.device_count():
    raise ValueError(
        f'training.batch_size={global_batch_size} must be divisible by the number of '
        f'devices ({jax.device_count()} over {count} processes)'
    )
  per_process = global_batch_size // count
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def global_batch(local_batch, sharding: NamedSharding, batch_axis: int = 0):
  """Assembles a global sharded array from each process's rows of the batch.

  Args:
    local_batch: a pytree of numpy arrays holding this process's rows (along
      `batch_axis`).
    sharding: the batch sharding (see `batch_sharding`).
    batch_axis: the axis along which processes split the batch.

  Returns:
    The pytree of global `jax.Array`s (the local rows of every process concatenated).
  """

  def assemble(x):
    x = np.asarray(x)
    shape = list(x.shape)
    shape[batch_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

  return jax.tree.map(assemble, local_batch)


def describe_devices() -> str:
  """One line naming the processes and devices of this job."""
  local = jax.local_devices()
  kinds = sorted({d.device_kind for d in local})
  return (
      f'process {jax.process_index()}/{jax.process_count()}, '
      f'{jax.local_device_count()} local / {jax.device_count()} global devices '
      f'({jax.default_backend()}: {", ".join(kinds)})'
  )
