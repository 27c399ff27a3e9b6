"""The PyTorch DDPM++ of `scripts/torch_ddpmpp.py` (timed beside ours in bench_models)
loads the golden `ddpmpp_small` state_dict strictly and reproduces the reference output."""

import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip('torch')

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / 'tests' / 'data'
SCRIPT = ROOT / 'scripts' / 'torch_ddpmpp.py'


def _script():
  spec = importlib.util.spec_from_file_location('torch_ddpmpp', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_torch_ddpmpp_matches_golden_output():
  script = _script()
  model = script.DDPMpp(script.small_config()).eval()
  state = np.load(DATA / 'ddpmpp_small_state_dict.npz')
  assert list(model.state_dict()) == list(state.files)
  model.load_state_dict({k: torch.from_numpy(state[k]) for k in state.files}, strict=True)
  io = np.load(DATA / 'ddpmpp_small_io.npz')
  with torch.no_grad():
    out = model(torch.from_numpy(io['x']), torch.from_numpy(io['labels'])).numpy()
  ref = io['out']
  assert out.dtype == np.float32 and out.shape == ref.shape
  err = np.abs(out - ref).reshape(len(ref), -1).max(axis=1)
  scale = np.abs(ref).reshape(len(ref), -1).max(axis=1)
  np.testing.assert_array_less(err, 1e-4 * scale)
  assert script.check() < 1e-4
