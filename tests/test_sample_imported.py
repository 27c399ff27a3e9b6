"""A score_sde_pytorch `.pth` converted by `scripts/convert_checkpoint.py` is what
`main.py --mode=sample` samples: the parameters the sample mode restores give the golden
network outputs, the raw ones (`--config.sampling.use_ema=False`) and the EMA ones (the
default), and the CLI's samples are those of the in-process driver on that checkpoint.

The golden DDPM++ (`tests/data/ddpmpp_small_*`) is `configs/vp_cifar.py` at 16x16 with a
smaller U-Net, so the run command is the one a user types for a released checkpoint plus
five `--config.*` overrides.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from scorejax import convert, run_sample, run_train
from scorejax.models import make_model
from tests.conftest import nchw_to_nhwc
from tests.test_convert import _load, _write_pth
from tests.test_main import load_config

torch = pytest.importorskip('torch')

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_PTH = ROOT.parent / 'shared' / 'golden' / 'ddpmpp_small_checkpoint.pth'
# vp_cifar.py -> the golden ddpmpp_small network, and a cheap sampler.
NETWORK = {'data.image_size': 16, 'model.nf': 32, 'model.ch_mult': (1, 2, 2),
           'model.num_res_blocks': 2, 'model.attn_resolutions': (8,)}
SAMPLER = {'sampling.num_samples': 4, 'sampling.batch_size': 4, 'sampling.num_steps': 3}


def _flags(overrides: dict) -> list[str]:
  def text(v):
    return f'({",".join(map(str, v))},)' if isinstance(v, tuple) else str(v)
  return [f'--config.{k}={text(v)}' for k, v in overrides.items()]


def _main(workdir, *extra):
  command = [sys.executable, str(ROOT / 'main.py'), '--config=configs/vp_cifar.py',
             f'--workdir={workdir}', '--mode=sample', *_flags({**NETWORK, **SAMPLER}), *extra]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return np.load(pathlib.Path(workdir) / 'samples' / 'samples_2.npz')


def _convert(pth, out):
  """`scripts/convert_checkpoint.py` with the config the sample runs use, as a JSON dump."""
  config_json = pathlib.Path(out).parent / f'{pathlib.Path(out).name}_config.json'
  config_json.write_text(json.dumps(load_config('vp_cifar', **NETWORK).to_dict()))
  subprocess.run([sys.executable, str(ROOT / 'scripts' / 'convert_checkpoint.py'),
                  '--pth', str(pth), '--config', str(config_json), '--out', str(out)],
                 cwd=ROOT, check=True, capture_output=True)


def _outputs(config, params, io):
  out = jax.jit(make_model(config).apply)({'params': params}, nchw_to_nhwc(io['x']),
                                          io['labels'])
  return np.asarray(out).transpose(0, 3, 1, 2)


def _assert_per_sample(out, golden):
  for a, g in zip(out, golden, strict=True):
    assert np.abs(a - g).max() <= 1e-4 * np.abs(g).max()


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """`(workdir, pth)`: a synthetic reference checkpoint (golden raw weights, EMA shadow
  = raw + N(0, 0.01^2)) converted by the script into a workdir, and the `.pth` itself."""
  tmp = tmp_path_factory.mktemp('imported')
  _, state_dict, _ = _load('ddpmpp_small')
  rng = np.random.default_rng(0)  # an EMA near the raw weights, as a real one is
  shadow = [v + np.float32(0.01) * rng.standard_normal(v.shape, np.float32)
            for k, v in state_dict.items() if k != 'sigmas']
  _write_pth(tmp / 'checkpoint_2.pth', state_dict, shadow, step=2)
  workdir = tmp / 'run'
  _convert(tmp / 'checkpoint_2.pth', workdir)
  return workdir, tmp / 'checkpoint_2.pth'


@pytest.mark.slow
def test_sample_mode_restores_the_golden_raw_and_ema_parameters(imported):
  workdir, pth = imported
  _, _, io = _load('ddpmpp_small')
  config = load_config('vp_cifar', **NETWORK, **SAMPLER)
  _, step = run_sample.restore_for_inference(config, workdir)
  assert step == 2
  config.unlock()
  config.sampling.use_ema = False
  raw, _ = run_sample.restore_for_inference(config, workdir)
  _assert_per_sample(_outputs(config, raw, io), io['out'])
  config.sampling.use_ema = True
  ema, _ = run_sample.restore_for_inference(config, workdir)
  _, expected, _ = convert.pth_to_variables(convert.load_pth(pth), config)
  jax.tree.map(np.testing.assert_array_equal, ema, expected['params'])
  assert not np.allclose(_outputs(config, ema, io), io['out'], atol=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(not GOLDEN_PTH.exists(), reason='reference checkpoint not available')
def test_reference_pth_in_sample_mode_gives_golden_ema_output(tmp_path):
  """The reference's own `.pth` (the only place its EMA weights are stored)."""
  _, _, io = _load('ddpmpp_small')
  _convert(GOLDEN_PTH, tmp_path / 'run')
  config = load_config('vp_cifar', **NETWORK, **SAMPLER)
  for use_ema, key in ((True, 'out_ema'), (False, 'out')):
    config.unlock()
    config.sampling.use_ema = use_ema
    params, _ = run_sample.restore_for_inference(config, tmp_path / 'run')
    _assert_per_sample(_outputs(config, params, io), io[key])


@pytest.mark.slow
def test_main_sample_mode_samples_the_imported_checkpoint(imported, tmp_path):
  workdir, _ = imported
  ema_samples = _main(workdir)
  assert ema_samples['samples'].shape == (4, 16, 16, 3)
  assert np.isfinite(ema_samples['samples']).all()
  raw_workdir = tmp_path / 'raw'
  shutil.copytree(workdir, raw_workdir, ignore=shutil.ignore_patterns('samples'))
  raw_samples = _main(raw_workdir, '--config.sampling.use_ema=False')
  assert not np.allclose(raw_samples['samples'], ema_samples['samples'], atol=1e-3)
  # The in-process driver on the same checkpoint and seed draws the same samples.
  config = load_config('vp_cifar', **NETWORK, **SAMPLER)
  again = tmp_path / 'again'
  shutil.copytree(workdir, again, ignore=shutil.ignore_patterns('samples'))
  result = run_sample.run(config, str(again))
  np.testing.assert_allclose(np.load(result['path'])['samples'], ema_samples['samples'],
                             atol=1e-4)



@pytest.mark.slow
def test_training_can_start_from_an_imported_checkpoint(imported, tmp_path):
  """`training.init_from` reads a converted `.pth` as a new run's starting point: the raw
  weights give the golden outputs, the EMA is the reference's shadow."""
  workdir, pth = imported
  _, _, io = _load('ddpmpp_small')
  config = load_config('vp_cifar', **NETWORK, **{'training.init_from': str(workdir)})
  params, ema, step = run_train.initial_weights(config)
  assert step == 2
  _assert_per_sample(_outputs(config, params, io), io['out'])
  _, expected, _ = convert.pth_to_variables(convert.load_pth(pth), config)
  jax.tree.map(np.testing.assert_array_equal, ema, expected['params'])
  other = load_config('vp_cifar', **{**NETWORK, 'model.nf': 64},
                      **{'training.init_from': str(workdir)})
  with pytest.raises(ValueError, match='do not fit this model'):
    run_train.initial_weights(other)
