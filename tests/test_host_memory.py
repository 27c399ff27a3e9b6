"""scorejax.host_memory: glibc tunables merged without clobbering the user's, the command run
again once with them, and their effect (a freed large block is reused without page faults,
on huge pages)."""

import json
import os
import subprocess
import sys

import pytest

from scorejax import host_memory

_SUPPORTED = host_memory.tuned_environment({}) is not None


def test_merge_keeps_the_users_values_and_adds_the_rest():
  merged = host_memory.merge_tunables('glibc.malloc.hugetlb=0:glibc.rtld.x=2',
                                      host_memory.TUNABLES)
  entries = dict(e.split('=') for e in merged.split(':'))
  assert entries['glibc.malloc.hugetlb'] == '0'  # the user's choice stays
  assert entries['glibc.rtld.x'] == '2'
  for name, value in host_memory.TUNABLES.items():
    if name != 'glibc.malloc.hugetlb':
      assert entries[name] == value
  assert host_memory.merge_tunables(merged, host_memory.TUNABLES) == merged  # idempotent


def test_tuned_environment_is_none_when_disabled_or_already_tuned(monkeypatch):
  monkeypatch.setattr(host_memory, 'ACCELERATOR_NODES', ())
  monkeypatch.setattr(host_memory, '_glibc_supports_hugetlb', lambda: True)
  monkeypatch.setattr(host_memory, 'transparent_huge_pages', lambda: 'madvise')
  tuned = host_memory.tuned_environment({'PATH': '/bin'})
  assert tuned['PATH'] == '/bin' and 'glibc.malloc.arena_max=1' in tuned['GLIBC_TUNABLES']
  assert host_memory.tuned_environment(tuned) is None  # no second re-execution
  assert host_memory.tuned_environment({host_memory.DISABLE_VARIABLE: '0'}) is None
  assert 'tuned for XLA:CPU' in host_memory.describe(tuned)
  assert 'not tuned' in host_memory.describe({})
  monkeypatch.setattr(host_memory, 'transparent_huge_pages', lambda: 'never')
  assert host_memory.tuned_environment({}) is None


def test_no_tuning_when_jax_will_run_on_an_accelerator(tmp_path, monkeypatch):
  monkeypatch.setattr(host_memory, '_glibc_supports_hugetlb', lambda: True)
  monkeypatch.setattr(host_memory, 'transparent_huge_pages', lambda: 'madvise')
  node = tmp_path / 'nvidiactl'
  monkeypatch.setattr(host_memory, 'ACCELERATOR_NODES', (str(node),))
  assert host_memory.tuned_environment({}) is not None  # no device node, no JAX_PLATFORMS
  assert host_memory.tuned_environment({'JAX_PLATFORMS': 'cuda,cpu'}) is None
  node.touch()
  assert host_memory.tuned_environment({}) is None
  assert host_memory.tuned_environment({'JAX_PLATFORMS': 'cpu'}) is not None  # the user's word


@pytest.mark.parametrize('text,mode', [('always [madvise] never\n', 'madvise'),
                                       ('[always] madvise never\n', 'always'),
                                       ('always madvise [never]\n', 'never')])
def test_transparent_huge_page_mode_is_read_from_sysfs(tmp_path, monkeypatch, text, mode):
  path = tmp_path / 'enabled'
  path.write_text(text)
  monkeypatch.setattr(host_memory, '_THP_MODES', path)
  assert host_memory.transparent_huge_pages() == mode
  monkeypatch.setattr(host_memory, '_THP_MODES', tmp_path / 'missing')
  assert host_memory.transparent_huge_pages() is None


# Run in a child: re-executes itself, then allocates (with malloc, from a thread other than the
# main one, as XLA:CPU does), writes and frees a 256 MB block, twice.
_CHILD = r'''
import ctypes, json, os, resource, sys, threading
from scorejax import host_memory
host_memory.reexec_with_tuned_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def faults_of_a_fresh_block(out):
  size = 256 << 20
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  with open('/proc/self/smaps_rollup') as f:
    huge = [int(line.split()[1]) << 10 for line in f if line.startswith('AnonHugePages:')]
  out.append(huge[0] if huge else 0)
  libc.free(block)

record = {'argv': sys.argv[1:], 'tunables': os.environ.get('GLIBC_TUNABLES', '')}
for name in ('first', 'second'):
  out = []
  thread = threading.Thread(target=faults_of_a_fresh_block, args=(out,))
  thread.start()
  thread.join()
  record[name], record[name + '_huge'] = out
print(json.dumps(record))
'''


@pytest.mark.skipif(not _SUPPORTED, reason='needs glibc >= 2.35 and transparent huge pages')
def test_the_command_runs_again_with_the_tunables_and_large_blocks_are_reused():
  # As `_SUPPORTED` was decided: no tunables yet, no platform chosen by the caller.
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'JAX_PLATFORMS')}
  result = subprocess.run([sys.executable, '-c', _CHILD, '--flag=1', 'arg'], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
  record = json.loads(result.stdout.strip().splitlines()[-1])
  assert record['argv'] == ['--flag=1', 'arg']
  assert host_memory.merge_tunables(record['tunables'], host_memory.TUNABLES) == \
      record['tunables']
  assert record['first_huge'] >= 128 << 20, record  # (mostly) on 2 MiB pages
  assert record['second'] < 1000, record  # freed and reused: not faulted in again
  # Without the tunables each fresh block faults in again: 65536 4 KiB pages.
  env[host_memory.DISABLE_VARIABLE] = '0'
  untuned = subprocess.run([sys.executable, '-c', _CHILD], env=env, capture_output=True,
                           text=True, timeout=120, check=True)
  record = json.loads(untuned.stdout.strip().splitlines()[-1])
  assert record['tunables'] == '' and record['second'] > 10_000, record
