"""Checkpoint importers: score_sde_pytorch `.pth`, score_sde (JAX) msgpack, orbax output."""

import builtins
import collections
import importlib.util
import json
import pathlib

import flax.serialization
import jax
import numpy as np
import pytest

from scorejax import checkpoints, convert
from scorejax.models import make_model
from tests.conftest import DATA_DIR, nchw_to_nhwc

torch = pytest.importorskip('torch')

GOLDEN_DIR = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'golden'
SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'convert_checkpoint.py'


def _load(name):
  config = json.loads((DATA_DIR / f'{name}_config.json').read_text())
  state_dict = dict(np.load(DATA_DIR / f'{name}_state_dict.npz'))
  io = dict(np.load(DATA_DIR / f'{name}_io.npz'))
  return config, state_dict, io


_FORWARDS = {}


def _assert_golden(config, variables, io, key='out'):
  name = config['model']['embedding_type']  # tells the two golden networks apart
  if name not in _FORWARDS:
    _FORWARDS[name] = jax.jit(make_model(config).apply)
  out = _FORWARDS[name](variables, nchw_to_nhwc(io['x']), io['labels'])
  out = np.asarray(out).transpose(0, 3, 1, 2)
  for a, g in zip(out, io[key], strict=True):
    assert np.abs(a - g).max() <= 1e-4 * np.abs(g).max()


def _offsets(state_dict, frozen=('all_modules.0.W',)):
  """EMA shadow params: each trainable tensor shifted by its own index + 1."""
  trainable = [k for k in state_dict if k != 'sigmas' and k not in frozen]
  return trainable, [state_dict[k] + np.float32(i + 1) for i, k in enumerate(trainable)]


def _write_pth(path, state_dict, shadow_params, step=2):
  """A checkpoint shaped like score_sde_pytorch's `utils.save_checkpoint` (golden README §4)."""
  model = collections.OrderedDict(('module.' + k, torch.from_numpy(v.copy()))
                                  for k, v in state_dict.items())
  num_params = len([k for k in state_dict if k != 'sigmas'])
  torch.save({
      'optimizer': {'state': {}, 'param_groups': [{
          'lr': np.float64(2e-4 * step / 5000), 'betas': (0.9, 0.999), 'eps': 1e-8,
          'weight_decay': 0, 'amsgrad': False, 'params': list(range(num_params))}]},
      'model': model,
      'ema': {'decay': 0.999, 'num_updates': 3,
              'shadow_params': [torch.from_numpy(v.copy()) for v in shadow_params]},
      'step': step,
  }, path)


@pytest.fixture(scope='module')
def ncsnpp():
  return _load('ncsnpp_small')


def test_pth_round_trip_raw_weights_give_golden_output(ncsnpp, tmp_path):
  config, state_dict, io = ncsnpp
  _, shadow = _offsets(state_dict)
  _write_pth(tmp_path / 'ckpt.pth', state_dict, shadow)
  variables, ema, step = convert.pth_to_variables(convert.load_pth(tmp_path / 'ckpt.pth'), config)
  assert step == 2
  _assert_golden(config, variables, io)
  # EMA: every trainable tensor lands where its name says, the frozen Fourier W comes
  # from 'model'. Constant offsets survive the layout changes, so compare leaf by leaf.
  trainable, _ = _offsets(state_dict)
  offsets = {k: np.full_like(v, trainable.index(k) + 1 if k in trainable else 0.0)
             for k, v in state_dict.items()}
  expected_offset = convert.torch_state_dict_to_variables(offsets, config)
  diff = jax.tree.map(lambda e, r: e - r, ema, variables)
  jax.tree.map(lambda d, o: np.testing.assert_allclose(d, o, rtol=1e-6, atol=1e-6),
               diff, expected_offset)
  np.testing.assert_array_equal(ema['params']['GaussianFourierProjection_0']['W'],
                                state_dict['all_modules.0.W'])


def test_ema_list_must_match_the_trainable_parameters(ncsnpp):
  config, state_dict, _ = ncsnpp
  _, shadow = _offsets(state_dict)
  with pytest.raises(ValueError, match='EMA shadow params'):
    convert.ema_state_dict(state_dict, shadow[:-1], config)
  with pytest.raises(ValueError, match='misaligned'):
    convert.ema_state_dict(state_dict, shadow[1:] + shadow[:1], config)


def test_wrong_config_is_a_clear_error(ncsnpp):
  _, state_dict, _ = ncsnpp
  other = json.loads((DATA_DIR / 'ddpmpp_small_config.json').read_text())
  with pytest.raises(ValueError, match='wrong config|do not fit|no Flax parameter'):
    convert.torch_state_dict_to_variables(state_dict, other)


@pytest.mark.skipif(not (GOLDEN_DIR / 'ncsnpp_small_checkpoint.pth').exists(),
                    reason='reference checkpoints not available')
@pytest.mark.parametrize('name', ['ncsnpp_small', 'ddpmpp_small'])
def test_reference_pth_ema_gives_golden_ema_output(name):
  config, _, io = _load(name)
  checkpoint = convert.load_pth(GOLDEN_DIR / f'{name}_checkpoint.pth')
  _, ema, _ = convert.pth_to_variables(checkpoint, config)
  _assert_golden(config, ema, io, key='out_ema')


class _Payload:
  """A pickle that would create `marker` when unpickled (stands in for malicious code)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return builtins.open, (self.marker, 'w')


def test_tampered_pth_is_refused_without_running_it(tmp_path):
  marker = tmp_path / 'pwned'
  torch.save({'model': {}, 'step': 1, 'extra': _Payload(marker)}, tmp_path / 'evil.pth')
  with pytest.raises(convert.UnsafeCheckpointError, match='refusing to load') as error:
    convert.load_pth(tmp_path / 'evil.pth')
  assert '\n' not in str(error.value)
  assert not marker.exists()
  # The payload is live: an unrestricted load runs it.
  torch.load(tmp_path / 'evil.pth', weights_only=False)
  assert marker.exists()


def _jax_state(params, ema_params, step):
  """score_sde's (JAX) `State` as flax.training.checkpoints serializes it."""
  return {'step': step,
          'optimizer': {'target': params,
                        'state': {'step': step, 'param_states': jax.tree.map(
                            lambda p: {'grad_ema': np.zeros_like(p),
                                       'grad_sq_ema': np.zeros_like(p)}, params)}},
          'lr': 2e-4, 'model_state': {}, 'ema_rate': 0.999, 'params_ema': ema_params,
          'rng': np.array([0, 42], np.uint32)}


def test_jax_msgpack_checkpoint_round_trip(tmp_path):
  config, state_dict, io = _load('ddpmpp_small')
  params = convert.torch_state_dict_to_variables(state_dict, config)['params']
  ema_params = jax.tree.map(lambda p: p + 1.0, params)
  path = tmp_path / 'checkpoint_26'
  path.write_bytes(flax.serialization.msgpack_serialize(_jax_state(params, ema_params, 26)))
  variables, ema, step = convert.jax_checkpoint_to_variables(path, config)
  assert step == 26
  _assert_golden(config, variables, io)
  jax.tree.map(np.testing.assert_array_equal, ema['params'], ema_params)
  broken = dict(params)
  broken.pop('Conv_0')
  path.write_bytes(flax.serialization.msgpack_serialize(_jax_state(broken, ema_params, 26)))
  with pytest.raises(ValueError, match="missing \\['Conv_0'\\]"):
    convert.jax_checkpoint_to_variables(path, config)


def _run_script(argv):
  spec = importlib.util.spec_from_file_location('convert_checkpoint', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main(argv)


def test_script_writes_a_checkpoint_that_restore_params_reads(ncsnpp, tmp_path):
  config, state_dict, io = ncsnpp
  _, shadow = _offsets(state_dict)
  _write_pth(tmp_path / 'ckpt.pth', state_dict, shadow, step=7)
  out = tmp_path / 'imported'
  step_dir = _run_script(['--pth', str(tmp_path / 'ckpt.pth'), '--config',
                          str(DATA_DIR / 'ncsnpp_small_config.json'), '--out', str(out)])
  assert step_dir.name == '7'
  raw, step = checkpoints.restore_params(out, use_ema=False)
  ema, _ = checkpoints.restore_params(out)
  assert step == 7
  _assert_golden(config, {'params': raw}, io)
  expected_ema = convert.pth_to_variables(convert.load_pth(tmp_path / 'ckpt.pth'), config)[1]
  jax.tree.map(np.testing.assert_array_equal, ema, expected_ema['params'])


def test_script_refuses_a_tampered_file(tmp_path):
  marker = tmp_path / 'pwned'
  torch.save({'model': _Payload(marker)}, tmp_path / 'evil.pth')
  with pytest.raises(SystemExit, match='refusing to load'):
    _run_script(['--pth', str(tmp_path / 'evil.pth'), '--config',
                 str(DATA_DIR / 'ncsnpp_small_config.json'), '--out', str(tmp_path / 'o')])
  assert not marker.exists()
