"""End-to-end tests of the workflows: main.py flags, train -> sample -> eval, resume, multi-host.

The fast tests call the drivers in-process on the smoke config (tiny MLP, 2-D toy); the
slow ones run `main.py` in subprocesses (SIGKILL and resume, two processes vs one).
"""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from scorejax import checkpoints, run_eval, run_sample, run_train
from scorejax.logging_utils import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAIN = ROOT / 'main.py'


def load_config(name: str = 'smoke', **overrides):
  """Loads `configs/<name>.py` as main.py would, applies `section.field=value` overrides."""
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  spec = importlib.util.spec_from_file_location(f'configs.{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for path, value in overrides.items():
    section, field = path.split('.')
    setattr(config[section], field, value)
  config.lock()
  return config


def run_main(*args, env=None, timeout=300, check=True):
  environment = dict(os.environ, **(env or {}))
  result = subprocess.run([sys.executable, str(MAIN), *args], capture_output=True, text=True,
                          timeout=timeout, env=environment, cwd=ROOT)
  if check and result.returncode != 0:
    raise AssertionError(f'main.py {args} failed ({result.returncode}):\n{result.stderr[-3000:]}')
  return result


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now (for a jax.distributed coordinator)."""
  import socket

  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def final_ema(workdir, step=None):
  params, _ = checkpoints.restore_params(workdir, step)
  return params


def assert_trees_equal(a, b, atol=0.0):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b, strict=True):
    if atol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------- flags


@pytest.mark.parametrize('override, expected', [
    ('--config.training.batchsize=3', 'Did you mean "batch_size"'),
    ('--config.trainin.batch_size=3', 'Did you mean "training"'),
    ('--config.training.batch_size=abc', 'invalid literal for int()'),
])
def test_bad_config_override_fails_with_one_line(tmp_path, override, expected):
  result = run_main(f'--workdir={tmp_path}', override, check=False, timeout=60)
  assert result.returncode == 2
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('main.py: error: invalid config flag') and expected in lines[0]
  assert 'Traceback' not in result.stderr


def test_config_overrides_are_applied_and_written(tmp_path):
  # Watching needs no checkpoint yet: the resolved config is written, then it waits 0 s.
  run_main(f'--workdir={tmp_path}', '--config=configs/smoke.py', '--mode=eval',
           '--config.eval.watch=True', '--config.eval.watch_timeout=0',
           '--config.sampling.num_samples=3', timeout=120)
  written = json.loads((tmp_path / 'config_eval.json').read_text())
  assert written['sampling']['num_samples'] == 3
  assert written['data']['dataset'] == 'two_moons'


def test_missing_checkpoint_fails_before_writing(tmp_path):
  workdir = tmp_path / 'run'
  result = run_main(f'--workdir={workdir}', '--config=configs/smoke.py', '--mode=sample',
                    check=False, timeout=120)
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith('main.py: error: no checkpoint under')
  assert not workdir.exists()


@pytest.mark.parametrize('overrides, expected', [
    ({'sampling.predictor': 'reverse_diffusion', 'sampling.num_steps': 10}, 'use N >= 20'),
    ({'sampling.eps': 0.0}, 'eps must be in (0, 1)'),
    ({'sampling.method': 'ode', 'sampling.rtol': 0.0, 'sampling.atol': 0.0}, 'both be 0'),
    ({'sampling.n_steps_each': -1, 'sampling.corrector': 'langevin'}, 'n_corrector_steps'),
    ({'sampling.method': 'fast', 'sampling.fast_method': 'dpm_4'}, "valid choices: ['ddim'"),
    ({'sampling.method': 'fast', 'sampling.time_grid': 'cosine'}, 'unknown time_grid'),
    ({'sampling.method': 'edm', 'sampling.s_churn': -1.0}, 's_churn must be in [0, inf)'),
    ({'sampling.method': 'adaptive', 'sampling.adaptive_rtol': -0.1},
     'sampling.adaptive_rtol must be in [0, inf)'),
    ({'sampling.method': 'sde'}, "valid choices: ['pc', 'ode', 'fast', 'edm', 'adaptive']"),
])
@pytest.mark.parametrize('runner', [run_train, run_sample, run_eval])
def test_every_mode_rejects_bad_sampler_settings_up_front(tmp_path, runner, overrides,
                                                          expected):
  # The sampler's own checks run in `validate`, before a model is built or a file written.
  config = load_config(**overrides, **{'eval.enable_sampling': True})
  with pytest.raises(ValueError, match=r'^sampling settings \(sampling.method=') as error:
    runner.validate(config, str(tmp_path))
  assert expected in str(error.value)


def test_bad_sde_and_likelihood_settings_fail_before_writing(tmp_path):
  workdir = tmp_path / 'run'
  result = run_main(f'--workdir={workdir}', '--config=configs/smoke.py',
                    '--config.training.sde=vesde', '--config.model.sigma_min=-1',
                    check=False, timeout=120)
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == \
      'main.py: error: VESDE.sigma_min must be in (0, inf), got -1.0'
  assert not workdir.exists()
  with pytest.raises(ValueError, match=r'^likelihood settings .* rtol must be in'):
    run_eval.validate(load_config(**{'eval.rtol': -1.0, 'eval.enable_bpd': True}),
                      str(workdir))
  with pytest.raises(ValueError, match=r'^eval.elbo_num_times must be an integer >= 1, got 0'):
    run_eval.validate(load_config(**{'eval.elbo_num_times': 0, 'eval.enable_elbo': True}),
                      str(workdir))


@pytest.mark.parametrize('overrides, expected', [
    ({'training.eps': 0.0}, 'eps must be in (0, 1)'),
    ({'training.continuous': False, 'model.num_scales': 10}, 'use N >= 20'),
    ({'training.importance_weighting': True}, 'requires training.likelihood_weighting=True'),
])
def test_training_rejects_bad_objective_settings_up_front(tmp_path, overrides, expected):
  with pytest.raises(ValueError, match=r'^training settings: ') as error:
    run_train.validate(load_config(**overrides), str(tmp_path))
  assert expected in str(error.value)


@pytest.mark.parametrize('accum, expected', [
    (0, r'^training.grad_accum_steps must be an integer >= 1, got 0$'),
    (3, r'^training.batch_size=32 must be divisible by training.grad_accum_steps=3 times the '
        r'number of devices \(\d\): every micro-batch is split evenly over the devices$'),
])
def test_training_rejects_bad_accumulation_up_front(tmp_path, accum, expected):
  with pytest.raises(ValueError, match=expected):
    run_train.validate(load_config(**{'training.grad_accum_steps': accum,
                                      'training.batch_size': 32}), str(tmp_path))
  assert not tmp_path.joinpath('checkpoints').exists()


def test_training_with_gradient_accumulation(tmp_path):
  """Micro-batches of 32 / 4 rows per device share; the eval loss over micro-batches too."""
  config = load_config(**{'training.grad_accum_steps': 4, 'training.batch_size': 32,
                          'training.n_iters': 10, 'training.snapshot_sampling': False})
  run_train.validate(config, str(tmp_path))
  assert run_train.run(config, str(tmp_path)) == {'step': 10, 'status': 'done'}
  records = read_jsonl(tmp_path / 'metrics.jsonl')
  logged = [r for r in records if 'loss' in r]
  assert logged and all(np.isfinite(r['loss']) and r['loss_std'] > 0 for r in logged)
  assert [r for r in records if 'eval_loss' in r]


def test_default_config_is_the_digits_model():
  config = load_config('default')
  assert config.data.dataset == 'digits' and config.data.image_size == 8
  assert config.training.n_iters > 0 and config.model.name in ('ncsnpp', 'ddpm', 'mlp')


# ------------------------------------------------------------------------- in-process


def test_train_sample_eval_on_smoke_config(tmp_path):
  config = load_config()
  summary = run_train.run(config, str(tmp_path))
  assert summary == {'step': 20, 'status': 'done'}
  records = read_jsonl(tmp_path / 'metrics.jsonl')
  logged = [r for r in records if 'loss' in r]
  assert [r['step'] for r in logged] == [5, 10, 15, 20]
  for record in logged:
    assert np.isfinite(record['loss']) and record['images_per_sec'] > 0 and 'lr' in record
  assert any('eval_loss' in r for r in records)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['10', '20']
  assert (tmp_path / 'samples' / 'step_20.png').exists()
  assert (tmp_path / 'samples' / 'score_step_20.png').exists()
  assert list((tmp_path / 'tb').iterdir())

  out = run_sample.run(config, str(tmp_path))
  first = np.load(out['path'])['samples']
  assert first.shape == (32, 2) and np.isfinite(first).all() and out['nfe'] == [20, 20]
  again = np.load(run_sample.run(config, str(tmp_path))['path'])['samples']
  np.testing.assert_array_equal(first, again)  # same seed and checkpoint, same samples

  results = run_eval.run(config, str(tmp_path))
  assert results[0]['step'] == 20 and np.isfinite(results[0]['eval_loss'])
  # Sample quality of 2-D data: 32 samples in two shards of 16 (eval/ckpt_20/sampler_*/).
  assert results[0]['sample_shards_drawn'] == 2 and results[0]['num_samples'] == 32
  assert results[0]['sample_nfe'] == 20
  for name in ('sample_swd', 'sample_mmd', 'sample_nll'):
    assert np.isfinite(results[0][name]), name
  assert len(list((tmp_path / 'eval' / 'ckpt_20').glob('sampler_*/samples_*.npz'))) == 2
  # 2-D data: NLL (nats) by the exact-divergence ODE, beside the toy's true NLL. Their
  # difference estimates KL(data || model) >= 0 from 16 test points; with a log-ratio std
  # below 2 nats, two standard errors are 1 nat.
  assert np.isfinite(results[0]['nll']) and results[0]['nll_nfe'] > 0
  assert results[0]['nll'] > results[0]['true_nll'] - 1.0
  # The variational bound on the reverse-SDE model's NLL: the same argument, on the same points.
  assert np.isfinite(results[0]['nll_elbo']) and results[0]['nll_elbo_prior'] < 1e-3
  assert results[0]['nll_elbo'] > results[0]['true_nll'] - 1.0
  assert read_jsonl(tmp_path / 'eval' / 'metrics.jsonl')[-1]['step'] == 20

  # Watching: every periodic checkpoint not yet in eval/metrics.jsonl, then stop at n_iters.
  watch = load_config(**{'eval.watch': True, 'eval.enable_bpd': False, 'eval.watch_timeout': 30,
                         'eval.enable_sampling': False})
  assert [r['step'] for r in run_eval.run(watch, str(tmp_path))] == [10]
  assert [r['step'] for r in read_jsonl(tmp_path / 'eval' / 'metrics.jsonl')] == [20, 10]


@pytest.mark.parametrize('continuous', [True, False])
def test_cosine_sde_trains_and_samples(tmp_path, continuous):
  # Continuous: the SDE loss; discrete: the DDPM loss and score convention on the cosine chain.
  config = load_config(**{'training.sde': 'cosinevpsde', 'training.continuous': continuous,
                          'training.n_iters': 10, 'training.snapshot_sampling': False,
                          'sampling.predictor': 'ancestral_sampling',
                          'sampling.corrector': 'none', 'model.logsnr_min': -12.0})
  assert run_train.run(config, str(tmp_path))['status'] == 'done'
  losses = [r['loss'] for r in read_jsonl(tmp_path / 'metrics.jsonl') if 'loss' in r]
  assert losses and np.isfinite(losses).all()
  out = run_sample.run(config, str(tmp_path))
  samples = np.load(out['path'])['samples']
  assert samples.shape == (32, 2) and np.isfinite(samples).all() and out['nfe'] == [20, 20]
  bad = load_config(**{'training.sde': 'cosinevpsde', 'model.logsnr_min': 5.0})
  with pytest.raises(ValueError, match=r'CosineVPSDE.logsnr_min must be in \[-20, 0\)'):
    run_train.validate(bad, str(tmp_path / 'bad'))
  assert not (tmp_path / 'bad').exists()


def _write_trained_config(workdir, config):
  """What `main.py --mode=train` leaves: the resolved config in `config.json`."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(config.to_json_best_effort())


@pytest.mark.parametrize('runner', [run_sample, run_eval])
def test_inference_under_other_model_settings_fails_up_front(tmp_path, runner):
  _write_trained_config(tmp_path, load_config(**{'training.sde': 'cosinevpsde'}))
  with pytest.raises(ValueError, match=r"trained with training.sde='cosinevpsde' \(here "
                                       r"'vpsde'\).*pass --config.training.sde=\"cosinevpsde\""):
    runner.validate(load_config(), str(tmp_path))
  # Same model: the next check runs (no checkpoint yet). Sampler settings and, for a
  # continuous-time network, N may differ.
  same = load_config(**{'training.sde': 'cosinevpsde', 'model.num_scales': 50,
                        'sampling.method': 'ode', 'sampling.snr': 0.2})
  with pytest.raises(FileNotFoundError):
    runner.validate(same, str(tmp_path))
  # A discrete-time network reads N.
  _write_trained_config(tmp_path, load_config(**{'training.continuous': False}))
  with pytest.raises(ValueError, match=r'model.num_scales=1000 \(here 500\)'):
    runner.validate(load_config(**{'training.continuous': False, 'model.num_scales': 500}),
                    str(tmp_path))
  # A step directory given as sampling.checkpoint finds its workdir's config.
  step_dir = tmp_path / 'checkpoints' / '10' / 'state'
  step_dir.mkdir(parents=True)
  other = load_config(**{'training.continuous': False, 'model.hidden': 32,
                         'sampling.checkpoint': str(step_dir.parent)})
  with pytest.raises(ValueError, match=r'model.hidden=16 \(here 32\)'):
    runner.validate(other, str(tmp_path / 'elsewhere'))


def test_settings_an_older_config_lacks_are_not_compared(tmp_path):
  config = json.loads(load_config().to_json_best_effort())
  del config['model']['cosine_s'], config['model']['logsnr_min']
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(FileNotFoundError):
    run_sample.validate(load_config(), str(tmp_path))


def test_resuming_under_other_model_settings_fails_before_writing(tmp_path):
  workdir = tmp_path / 'run'
  run_main(f'--workdir={workdir}', '--config=configs/smoke.py', '--config.training.n_iters=5',
           timeout=180)
  before = sorted(p.name for p in workdir.iterdir())
  result = run_main(f'--workdir={workdir}', '--config=configs/smoke.py',
                    '--config.training.n_iters=10', '--config.training.sde=subvpsde',
                    check=False, timeout=120)
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('main.py: error: the model in ') and 'training.sde' in last
  assert sorted(p.name for p in workdir.iterdir()) == before
  assert json.loads((workdir / 'config.json').read_text())['training']['sde'] == 'vpsde'


@pytest.mark.parametrize('dataset, centered, expected', [
    ('digits', True, np.log2(17) - 1.0), ('cifar10', True, 7.0), ('cifar10', False, 8.0)])
def test_bits_per_dim_offset(dataset, centered, expected):
  config = load_config('default', **{'data.dataset': dataset, 'data.centered': centered})
  assert run_eval.bits_per_dim_offset(config) == pytest.approx(expected)


def test_init_from_starts_a_new_run_from_other_weights(tmp_path):
  """`training.init_from`: a new run starts from another run's parameters and EMA (step 0,
  fresh optimizer). With a zero learning rate Adam moves nothing, so the parameters stay the
  source's and the EMA moves toward them in closed form: ema_k = p + rate^k (ema_0 - p)."""
  source = tmp_path / 'source'
  run_train.run(load_config(**{'training.n_iters': 10, 'training.snapshot_sampling': False}),
                str(source))
  config = load_config(**{'training.init_from': str(source), 'training.n_iters': 5,
                          'training.snapshot_freq': 5, 'training.snapshot_sampling': False,
                          'optim.lr': 0.0, 'optim.warmup': 0})
  run_train.validate(config, str(tmp_path / 'tuned'))
  assert run_train.run(config, str(tmp_path / 'tuned')) == {'step': 5, 'status': 'done'}
  params, ema, step = checkpoints.restore_weights(source)
  tuned_params, tuned_ema, tuned_step = checkpoints.restore_weights(tmp_path / 'tuned')
  assert (step, tuned_step) == (10, 5)
  assert_trees_equal(tuned_params, params)
  rate = config.model.ema_rate
  expected = jax.tree.map(lambda p, e: p + rate**5 * (e - p), params, ema)
  assert_trees_equal(tuned_ema, expected, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(ema)[0], jax.tree.leaves(params)[0])  # EMA != params


def test_init_from_checks_the_source_up_front(tmp_path):
  source = tmp_path / 'source'
  trained = load_config(**{'training.n_iters': 5, 'training.snapshot_freq': 5,
                           'training.snapshot_sampling': False, 'model.hidden': 8})
  run_train.run(trained, str(source))
  new = tmp_path / 'new'
  with pytest.raises(FileNotFoundError, match='no checkpoint under'):
    run_train.validate(load_config(**{'training.init_from': str(tmp_path / 'nothing')}),
                       str(new))
  # Without the source's config.json (e.g. an imported checkpoint): names and shapes.
  with pytest.raises(ValueError, match=r'^training.init_from=.*: the parameters of step 5 do '
                                       r'not fit this model .*of another shape \(e.g. '):
    run_train.validate(load_config(**{'training.init_from': str(source)}), str(new))
  # With it (as main.py writes it): the settings, with the flags that match them.
  _write_trained_config(source, trained)
  with pytest.raises(ValueError, match=r'^training.init_from: the model in .* was trained '
                                       r'with model.hidden=8 \(here 16\)'):
    run_train.validate(load_config(**{'training.init_from': str(source)}), str(new))
  assert not new.exists()
  run_train.validate(load_config(**{'training.init_from': str(source), 'model.hidden': 8}),
                     str(new))


def test_resume_gives_identical_parameters(tmp_path):
  """Stopping at step 10 (of 20) and rerunning gives the uninterrupted run's state, bit for bit."""
  run_train.run(load_config(), str(tmp_path / 'straight'))
  run_train.run(load_config(**{'training.n_iters': 10}), str(tmp_path / 'split'))
  summary = run_train.run(load_config(), str(tmp_path / 'split'))
  assert summary['step'] == 20
  assert_trees_equal(final_ema(tmp_path / 'split', 20), final_ema(tmp_path / 'straight', 20))
  params_a, _ = checkpoints.restore_params(tmp_path / 'split', 20, use_ema=False)
  params_b, _ = checkpoints.restore_params(tmp_path / 'straight', 20, use_ema=False)
  assert_trees_equal(params_a, params_b)


def test_non_finite_loss_stops_without_saving(tmp_path):
  # A learning rate of 1e30 overflows the parameters within a few steps.
  config = load_config(**{'optim.lr': 1e30, 'optim.warmup': 0, 'optim.grad_clip': -1.0,
                          'training.log_freq': 5})
  with pytest.raises(run_train.TrainingError, match='non-finite'):
    run_train.run(config, str(tmp_path))
  ckpt = checkpoints.Checkpointer(tmp_path)
  for step, manager in ckpt.candidates():
    restored = manager.restore(step)
    for leaf in jax.tree.leaves(restored['state']):
      assert np.isfinite(np.asarray(leaf, np.float64)).all()
  ckpt.close()


def test_unprepared_tfds_dataset_gives_clear_message(tmp_path):
  result = run_main(f'--workdir={tmp_path / "run"}', '--config=configs/smoke.py',
                    '--config.data.dataset=cifar10', f'--config.data.data_dir={tmp_path}',
                    '--config.model.name=mlp', check=False, timeout=120)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert 'tfds build cifar10' in result.stderr
  assert not (tmp_path / 'run').exists()  # validated before anything is written


def test_missing_inception_weights_fail_at_start_up(tmp_path):
  workdir = tmp_path / 'run'
  env = {'SCOREJAX_INCEPTION_PATH': ''}
  result = run_main(f'--workdir={workdir}', '--config=configs/vp_cifar.py', '--mode=eval',
                    '--config.eval.enable_sampling=True',
                    f'--config.eval.inception_path={tmp_path / "inception_fid.npz"}',
                    check=False, timeout=120, env=env)
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith('main.py: error: Inception weights not found at')
  assert 'inception_fid.npz' in line and 'eval.inception_path' in line
  assert 'convert_inception.py' in line
  assert not workdir.exists()


# ------------------------------------------------------------------------- subprocesses


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path):
  """A run killed with SIGKILL mid-training and rerun ends as an uninterrupted run."""
  args = ['--config=configs/smoke.py', '--config.training.n_iters=60',
          '--config.training.snapshot_freq=60', '--config.training.snapshot_freq_for_preemption=5',
          '--config.training.snapshot_sampling=False']
  run_main(f'--workdir={tmp_path / "straight"}', *args)

  killed = tmp_path / 'killed'
  process = subprocess.Popen([sys.executable, str(MAIN), f'--workdir={killed}', *args],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  meta = killed / checkpoints.PREEMPTION_DIR
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and process.poll() is None:
    steps = [int(p.name) for p in meta.iterdir() if p.name.isdigit()] if meta.exists() else []
    if steps and max(steps) >= 20:
      break
    time.sleep(0.05)
  assert process.poll() is None, 'the run ended before it could be killed'
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  assert not (killed / 'checkpoints' / '60').exists()
  run_main(f'--workdir={killed}', *args)
  assert_trees_equal(final_ema(killed, 60), final_ema(tmp_path / 'straight', 60))


@pytest.mark.slow
def test_sigterm_saves_a_preemption_checkpoint(tmp_path):
  args = ['--config=configs/smoke.py', '--config.training.n_iters=100000',
          '--config.training.snapshot_freq=100000',
          '--config.training.snapshot_freq_for_preemption=100000',
          '--config.training.snapshot_sampling=False', f'--workdir={tmp_path}']
  process = subprocess.Popen([sys.executable, str(MAIN), *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline:
    if (tmp_path / 'metrics.jsonl').exists() and (tmp_path / 'metrics.jsonl').read_text():
      break
    time.sleep(0.1)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-2000:]
  steps = [int(p.name) for p in (tmp_path / checkpoints.PREEMPTION_DIR).iterdir()
           if p.name.isdigit()]
  assert len(steps) == 1 and steps[0] >= 5
  assert 'SIGTERM' in stderr


@pytest.mark.slow
@pytest.mark.parametrize('accum, init_from', [(1, False), (2, False), (1, True)])
def test_two_processes_equal_one_process(tmp_path, accum, init_from):
  """Two CPU processes (gloo collectives) with the same global batch match one process:
  plain, with gradient accumulation (micro-batches interleave the processes' rows), and
  started from another run's weights (every process reads them)."""
  args = ['--config=configs/smoke.py', '--config.training.n_iters=10',
          '--config.training.snapshot_freq=10', '--config.training.snapshot_sampling=False',
          f'--config.training.grad_accum_steps={accum}']
  if init_from:
    run_train.run(load_config(**{'training.snapshot_sampling': False}), str(tmp_path / 'src'))
    args.append(f'--config.training.init_from={tmp_path / "src"}')
  one_device = {'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  two_devices = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  run_main(f'--workdir={tmp_path / "single"}', *args, env=two_devices)

  port = free_port()
  workdir = tmp_path / 'multi'
  processes = [
      subprocess.Popen(
          [sys.executable, str(MAIN), f'--workdir={workdir}', *args,
           f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
          cwd=ROOT, env=dict(os.environ, **one_device), stdout=subprocess.DEVNULL,
          stderr=subprocess.PIPE, text=True)
      for i in range(2)
  ]
  for process in processes:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
  assert_trees_equal(final_ema(workdir, 10), final_ema(tmp_path / 'single', 10), atol=1e-6)
  # Only process 0 writes logs.
  assert len([r for r in read_jsonl(workdir / 'metrics.jsonl') if r['step'] == 10]) >= 1


# ------------------------------------------------------------------------- conditional


def _rgb_folder(root: pathlib.Path) -> None:
  """8x8 RGB PNGs in `root/train` and `root/test` (16 and 5 of them)."""
  from PIL import Image

  rng = np.random.default_rng(0)
  for split, count in (('train', 16), ('test', 5)):
    (root / split).mkdir(parents=True)
    for i in range(count):
      image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
      Image.fromarray(image).save(root / split / f'{i}.png')


@pytest.mark.parametrize('condition', ['inpaint', 'colorize'])
def test_sample_mode_completes_test_images(tmp_path, condition, monkeypatch):
  data = {'data.dataset': 'digits', 'data.num_channels': 1, 'data.image_size': 8}
  if condition == 'colorize':
    _rgb_folder(tmp_path / 'images')
    data = {'data.dataset': 'image_folder', 'data.num_channels': 3, 'data.image_size': 8,
            'data.data_dir': str(tmp_path / 'images')}
  workdir = tmp_path / 'run'
  run_train.run(load_config(**data), str(workdir))
  if condition == 'colorize':
    # A 20-step model's colours leave [0, 1]; the exact score of N(0, 0.04 I) (model range)
    # keeps them inside, so the kept gray level can be read from the written images.
    from scorejax import analytic, run_common

    law = analytic.GaussianMixture.gaussian(np.zeros((8, 8, 3), np.float32), 0.04)
    exact = lambda config, model, sde: (lambda params: law.score_fn(sde))
    monkeypatch.setattr(run_common, 'score_fn_builder', exact)
  # Inpainting with RePaint rounds and reconstruction guidance together.
  config = load_config(**data, **{'sampling.condition': condition, 'sampling.num_samples': 5,
                                  'sampling.batch_size': 4, 'sampling.n_resample': 2,
                                  'sampling.mask': 'bottom_half',
                                  'sampling.guidance': 2.0 if condition == 'inpaint' else 0.0})
  run_sample.validate(config, str(workdir))
  out = run_sample.run(config, str(workdir))
  assert out['path'].endswith(f'{condition}_20.npz') and out['nfe'] == [40, 40]
  result = np.load(out['path'])
  samples, originals = result['samples'], result['originals']
  channels = 1 if condition == 'inpaint' else 3
  assert samples.shape == originals.shape == (5, 8, 8, channels)
  # The first five test images, in order, in [0, 1].
  test = run_sample.run_conditional._test_images(config, 5)
  np.testing.assert_allclose(originals, np.clip((test + 1) / 2 if config.data.centered
                                                else test, 0, 1), atol=1e-6)
  if condition == 'inpaint':
    known = result['mask'][..., 0] == 1
    assert known[:, :4].all() and not known[:, 4:].any()
    np.testing.assert_allclose(samples[known], originals[known], atol=1e-6)
    assert not np.allclose(samples[~known], originals[~known], atol=0.05)
  else:  # the gray level is kept (up to clipping to [0, 1])
    inside = (samples > 0) & (samples < 1)
    rows = inside.all(-1)
    np.testing.assert_allclose(samples.mean(-1)[rows], originals.mean(-1)[rows], atol=1e-5)
    assert rows.mean() > 0.2
  assert (workdir / 'samples' / f'{condition}_20.png').exists()
  again = np.load(run_sample.run(config, str(workdir))['path'])['samples']
  np.testing.assert_array_equal(samples, again)


@pytest.mark.parametrize('overrides, expected', [
    ({'sampling.condition': 'deblur'}, "unknown sampling.condition 'deblur'; valid choices"),
    ({'sampling.condition': 'inpaint'}, 'needs images; data.dataset=two_moons'),
    ({'sampling.condition': 'inpaint', 'data.dataset': 'digits', 'data.num_channels': 1,
      'sampling.method': 'ode'}, 'set sampling.method=pc'),
    ({'sampling.condition': 'colorize', 'data.dataset': 'digits', 'data.num_channels': 1},
     'needs colour images'),
    ({'sampling.condition': 'inpaint', 'data.dataset': 'digits', 'data.num_channels': 1,
      'sampling.mask': 'left'}, "unknown sampling.mask 'left'"),
    ({'sampling.condition': 'inpaint', 'data.dataset': 'digits', 'data.num_channels': 1,
      'sampling.n_resample': 0}, 'sampling.n_resample must be >= 1'),
    ({'sampling.condition': 'inpaint', 'data.dataset': 'digits', 'data.num_channels': 1,
      'sampling.guidance': 1.0, 'sampling.corrector': 'langevin'},
     "sampling.guidance > 0 needs sampling.corrector='none'"),
])
def test_bad_conditional_settings_fail_up_front(tmp_path, overrides, expected):
  with pytest.raises(ValueError, match='sampling') as error:
    run_sample.validate(load_config(**overrides), str(tmp_path))
  assert expected in str(error.value)


def test_conditional_sampling_is_device_count_independent():
  from jax.sharding import Mesh

  from scorejax import distributed, run_common, run_conditional
  from scorejax.models import make_model

  config = load_config(**{'data.dataset': 'digits', 'data.num_channels': 1,
                          'data.image_size': 8, 'sampling.condition': 'inpaint',
                          'sampling.n_resample': 2})
  model = make_model(config)
  sde = run_common.make_sde(config)
  params = run_common.init_params(model, jax.random.key(0), (8, 8, 1))
  originals = run_conditional._test_images(config, 4)
  observed, mask = run_conditional._observation(config, originals, jax.random.key(1))
  outputs = []
  for devices in (jax.devices()[:1], jax.devices()[:2]):
    mesh = Mesh(np.asarray(devices), ('data',))
    rows = distributed.batch_sharding(mesh)
    sampler = run_conditional._make_sampler(config, model, sde, mesh)
    samples, nfe = sampler(jax.random.key(3), params, run_conditional._global(observed, rows),
                           run_conditional._global(mask, rows))
    assert len(samples.sharding.device_set) == len(devices) and int(nfe) == 40
    outputs.append(np.asarray(samples))
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
  known = mask == 1
  np.testing.assert_array_equal(outputs[0][known], observed[known])
