"""Host memory settings under which XLA:CPU runs fast: large blocks kept, on huge pages.

XLA:CPU allocates the temporaries of a compiled program as one block per call (1.7 GB for
the CIFAR-10 DDPM++ train step at batch 8). glibc serves a block that large, requested
from one of XLA's threads, by a fresh `mmap` and returns it with `munmap` when the call
ends, so every call faults the whole block in again, 4 KiB at a time (~420,000 page faults
and ~1 s of system time per step on the 2-core development machine), and the matrix
kernels then walk 1.7 GB through 4 KiB pages. With the glibc tunables of `TUNABLES`
(one arena, no `mmap` for large blocks, no trimming, transparent huge pages) the block
comes from the main heap, stays mapped from one call to the next and is backed by 2 MiB
pages: no page faults after the first call, and that step runs ~15% faster here (PyTorch,
which allocates per tensor, gains little). Measured in `docs/benchmarks.md`.

glibc reads `GLIBC_TUNABLES` only when a process starts, so `reexec_with_tuned_malloc()`
runs the current command again with them (`os.execve`: same process id, arguments and
environment otherwise). `main.py` and the benchmark scripts call it first. It does nothing
when it has nothing to add (already set, e.g. after the re-execution), when
`SCOREJAX_TUNE_MALLOC=0`, on a C library other than glibc >= 2.35 (the first with
`glibc.malloc.hugetlb`), when the kernel's transparent huge pages are off, or when JAX will
run on an accelerator (`JAX_PLATFORMS` names another platform first, or, unset, a GPU / TPU
device node exists: there the device, not the host's malloc, holds the temporaries). With the
tuning, memory is not returned to the system until the process ends: its footprint stays
at its peak.
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys
from collections.abc import Mapping

TUNABLES = {
    'glibc.malloc.hugetlb': '1',  # madvise(MADV_HUGEPAGE) on the heap as it grows
    'glibc.malloc.arena_max': '1',  # every thread in the main arena (heap, not mmap)
    'glibc.malloc.mmap_max': '0',  # large blocks from the heap too
    'glibc.malloc.trim_threshold': str(1 << 44),  # never give the heap's top back
}
DISABLE_VARIABLE = 'SCOREJAX_TUNE_MALLOC'
_THP_MODES = pathlib.Path('/sys/kernel/mm/transparent_hugepage/enabled')
ACCELERATOR_NODES = ('/dev/nvidiactl', '/dev/kfd', '/dev/accel0', '/dev/vfio/0')


def _glibc_supports_hugetlb() -> bool:
  name, version = platform.libc_ver()
  if name != 'glibc':
    return False
  try:
    return tuple(int(v) for v in version.split('.')[:2]) >= (2, 35)
  except ValueError:
    return False


def transparent_huge_pages() -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'), or None."""
  try:
    text = _THP_MODES.read_text()
  except OSError:
    return None
  selected = [word[1:-1] for word in text.split() if word.startswith('[')]
  return selected[0] if selected else None


def accelerator_expected(environ: Mapping[str, str]) -> bool:
  """Whether JAX will run on something other than the CPU: `JAX_PLATFORMS` when set (its
  first entry), else whether a GPU / TPU device node exists."""
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() != 'cpu'
  return any(pathlib.Path(node).exists() for node in ACCELERATOR_NODES)


def merge_tunables(current: str, tunables: Mapping[str, str]) -> str:
  """`current` (a `GLIBC_TUNABLES` value, `name=value:name=value`) with `tunables` added;
  names already set in `current` keep their value."""
  entries = [entry for entry in current.split(':') if entry]
  present = {entry.split('=', 1)[0] for entry in entries}
  entries += [f'{name}={value}' for name, value in tunables.items() if name not in present]
  return ':'.join(entries)


def tuned_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
  """`environ` with `TUNABLES` merged into `GLIBC_TUNABLES`, or None when nothing would
  change or the tuning does not apply (see the module docstring)."""
  if environ.get(DISABLE_VARIABLE, '1') == '0':
    return None
  if not _glibc_supports_hugetlb() or transparent_huge_pages() not in ('always', 'madvise'):
    return None
  if accelerator_expected(environ):
    return None
  current = environ.get('GLIBC_TUNABLES', '')
  merged = merge_tunables(current, TUNABLES)
  if merged == current:
    return None
  return {**environ, 'GLIBC_TUNABLES': merged}


def reexec_with_tuned_malloc() -> None:
  """Replaces the process by the same command with `TUNABLES` in effect (returns when none
  need setting). Call it first, before any threads or files are opened."""
  environ = tuned_environment(os.environ)
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environ)


def describe(environ: Mapping[str, str] = os.environ) -> str:
  """One line for logs and benchmark records: whether `TUNABLES` are in effect."""
  current = environ.get('GLIBC_TUNABLES', '')
  if current and merge_tunables(current, TUNABLES) == current:
    return f'glibc malloc tuned for XLA:CPU (GLIBC_TUNABLES={current})'
  return f'glibc malloc not tuned (GLIBC_TUNABLES={current or "unset"})'
