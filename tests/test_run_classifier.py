"""The class-conditional workflow: `--mode=train_classifier`, then `--mode=sample` with
`sampling.condition=class`; resuming, determinism, and one-line errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_main import assert_trees_equal, load_config, run_main

from scorejax import checkpoints, run_classifier, run_sample, run_train

DIGITS = {'data.dataset': 'digits', 'data.num_channels': 1, 'data.image_size': 8}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A smoke score model and a 20-step classifier on the digits."""
  workdir = tmp_path_factory.mktemp('run')
  run_train.run(load_config(**DIGITS), str(workdir))
  config = load_config(**DIGITS)
  run_classifier.validate(config, str(workdir))
  out = run_classifier.run(config, str(workdir))
  return workdir, out


def test_train_classifier_writes_its_files(trained):
  workdir, out = trained
  directory = workdir / 'classifier'
  assert out['step'] == 20
  saved = json.loads((directory / 'config.json').read_text())
  assert saved['num_classes'] == 10 and saved['network']['channels'] == [8, 16]
  accuracy = json.loads((directory / 'accuracy.json').read_text())
  assert accuracy['step'] == 20 and len(accuracy) == 1 + len(run_classifier.EVAL_FRACTIONS)
  for values in (v for k, v in accuracy.items() if k != 'step'):
    assert 0.0 <= values['accuracy'] <= 1.0 and np.isfinite(values['cross_entropy'])
  records = [json.loads(line) for line in (directory / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'loss' in r] == [5, 10, 15, 20]


@pytest.mark.slow
def test_preempted_classifier_resumes_to_the_uninterrupted_one(trained, tmp_path, monkeypatch):
  """SIGTERM (here: the flag it sets, raised after 13 steps) saves a checkpoint and stops;
  the rerun ends with the parameters of the uninterrupted 20-step run, bit for bit."""

  class SigtermAfter13Steps:
    polls = 0

    @property
    def requested(self):  # polled once per step
      SigtermAfter13Steps.polls += 1
      return SigtermAfter13Steps.polls >= 13

    def restore(self):
      pass

  config = load_config(**DIGITS)
  workdir = tmp_path / 'preempted'
  with monkeypatch.context() as patch:
    patch.setattr(run_train, 'Preemption', SigtermAfter13Steps)
    out = run_classifier.run(config, str(workdir))
  assert out == {'step': 13, 'status': 'preempted'}
  assert (workdir / 'classifier' / 'checkpoints-meta' / '13').is_dir()
  assert not (workdir / 'classifier' / 'accuracy.json').exists()
  assert run_classifier.run(config, str(workdir))['status'] == 'done'
  assert_trees_equal(checkpoints.restore_params(trained[0] / 'classifier', 20)[0],
                     checkpoints.restore_params(workdir / 'classifier', 20)[0])


@pytest.mark.parametrize('label', [-1, 3])
def test_class_conditional_sampling(trained, label):
  workdir, _ = trained
  config = load_config(**DIGITS, **{'sampling.condition': 'class', 'sampling.num_samples': 12,
                                    'sampling.batch_size': 8, 'sampling.class_label': label,
                                    'sampling.classifier_scale': 2.0})
  run_sample.validate(config, str(workdir))
  out = run_sample.run(config, str(workdir))
  result = np.load(out['path'])
  expected = np.arange(12) % 10 if label < 0 else np.full(12, label)
  np.testing.assert_array_equal(result['labels'], expected)
  assert result['samples'].shape == (12, 8, 8, 1) and float(result['scale']) == 2.0
  assert (result['samples'] >= 0).all() and (result['samples'] <= 1).all()
  assert out['nfe'] == [20, 20] and 0.0 <= out['accuracy'] <= 1.0 and out['digits_fid'] > 0
  assert (workdir / 'samples' / 'class_20.png').exists()
  again = np.load(run_sample.run(config, str(workdir))['path'])['samples']
  np.testing.assert_array_equal(result['samples'], again)


def test_guidance_changes_samples_and_scale_zero_is_unconditional(trained, monkeypatch):
  """Scale 0 draws exactly the unconditional sampler's samples of the same keys; scale 4
  moves them. (The score is the exact one of N(0.5, 0.04 I) in the model range, so the
  samples stay inside [0, 1] where clipping would hide differences.)"""
  workdir, _ = trained
  from scorejax import analytic, run_class_conditional, run_common

  law = analytic.GaussianMixture.gaussian(np.full((8, 8, 1), 0.5, np.float32), 0.04)
  monkeypatch.setattr(run_common, 'score_fn_builder',
                      lambda config, model, sde: (lambda params: law.score_fn(sde)))

  common = {**DIGITS, 'sampling.condition': 'class', 'sampling.num_samples': 8,
            'sampling.batch_size': 8, 'sampling.method': 'ode', 'sampling.ode_method': 'heun',
            'sampling.num_steps': 10}
  params, step = run_sample.restore_for_inference(load_config(**common), workdir)
  draw = lambda scale: run_class_conditional.run(
      load_config(**common, **{'sampling.classifier_scale': scale}), workdir, params, step)
  unguided = np.load(draw(0.0)['path'])['samples']
  guided = np.load(draw(4.0)['path'])['samples']
  assert np.abs(guided - unguided).max() > 1e-2
  from scorejax.models import make_model

  config = load_config(**common)
  sde = run_common.make_sde(config)
  sample_fn = run_common.make_sharded_sampler(config, make_model(config), sde, 8)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed),
                                              run_class_conditional.CLASS_STREAM), 0)
  plain = run_common.to_data_range(config, run_common.host_array(sample_fn(key, params)[0]))
  np.testing.assert_allclose(unguided, plain, atol=1e-6)


@pytest.mark.parametrize('overrides, expected', [
    ({'sampling.class_label': 10}, 'valid choices are 0..9, or -1 for all'),
    ({'sampling.classifier_scale': -1.0}, 'sampling.classifier_scale must be finite and >= 0'),
    ({'data.image_size': 16}, 'other data or noise: data.image_size=8 (here 16)'),
    ({'training.sde': 'vesde'}, "training.sde='vpsde' (here 'vesde')"),
    ({'model.beta_max': 10.0}, 'model.beta_max=20.0 (here 10.0)'),
    ({'sampling.classifier': '/nonexistent'}, 'train one with --mode=train_classifier'),
])
def test_bad_class_sampling_settings_fail_up_front(trained, overrides, expected):
  workdir, _ = trained
  config = load_config(**{**DIGITS, 'sampling.condition': 'class', **overrides})
  with pytest.raises((ValueError, FileNotFoundError)) as error:
    run_sample.validate(config, str(workdir))
  assert expected in str(error.value)


@pytest.mark.parametrize('overrides, expected', [
    ({}, 'needs labelled images; data.dataset=two_moons is 2-D'),
    ({**DIGITS, 'classifier.eps': 0.0}, 'classifier.eps must be in (0, T=1.0)'),
    ({**DIGITS, 'classifier.n_iters': 0}, 'classifier.n_iters must be >= 1'),
    ({**DIGITS, 'data.dataset': 'image_folder', 'data.data_dir': '/x'}, 'has no class labels'),
])
def test_bad_classifier_settings_fail_up_front(tmp_path, overrides, expected):
  with pytest.raises(ValueError) as error:
    run_classifier.validate(load_config(**overrides), str(tmp_path))
  assert expected in str(error.value)
  assert not list(tmp_path.iterdir())


def test_main_train_classifier_reports_bad_settings_on_one_line(tmp_path):
  result = run_main(f'--workdir={tmp_path / "w"}', '--config=configs/smoke.py',
                    '--mode=train_classifier', check=False, timeout=120)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith('main.py: error')]
  assert errors == ['main.py: error: --mode=train_classifier needs labelled images; '
                    'data.dataset=two_moons is 2-D']
  assert not (tmp_path / 'w').exists()


# -------------------------------------------------------------- classifier-free guidance


def test_classifier_free_workflow(tmp_path):
  """A class-conditional model (`model.num_classes=10`) trains on labelled digits with label
  dropout, evaluates, and samples each class guided classifier-free, with no classifier."""
  from scorejax import run_eval

  conditional = {**DIGITS, 'model.num_classes': 10}
  workdir = tmp_path / 'run'
  train_config = load_config(**conditional)
  run_train.validate(train_config, str(workdir))
  run_train.run(train_config, str(workdir))
  params = checkpoints.restore_params(workdir)[0]
  assert params['class_embedding']['embedding'].shape == (11, 16)
  assert np.any(np.asarray(params['class_embedding']['embedding']))  # trained away from zero

  eval_config = load_config(**conditional, **{'eval.enable_sampling': False,
                                              'eval.bpd_estimator': 'rademacher'})
  run_eval.validate(eval_config, str(workdir))
  evaluated = run_eval.run(eval_config, str(workdir))[0]
  assert np.isfinite(evaluated['eval_loss'])
  # Bits/dim of the "no class" part and given the labels: the same images and noise, two
  # scores that differ once the class embedding has moved.
  assert evaluated['bpd_examples'] == 16
  assert np.isfinite(evaluated['bpd_conditional']) and np.isfinite(evaluated['bpd'])
  assert evaluated['bpd_conditional'] != evaluated['bpd']
  # The variational bounds on the same 16 images, without and with the labels, bound the
  # bits/dim of 17-level data, which are >= 0; the two scores differ, as above.
  assert evaluated['bpd_elbo_examples'] == 16 and evaluated['bpd_elbo'] > 0
  assert evaluated['bpd_elbo_conditional'] > 0
  assert evaluated['bpd_elbo_conditional'] != evaluated['bpd_elbo']

  for weight in (0.0, 3.0):
    config = load_config(**conditional, **{'sampling.condition': 'class',
                                           'sampling.num_samples': 10, 'sampling.batch_size': 10,
                                           'sampling.cfg_weight': weight})
    run_sample.validate(config, str(workdir))
    out = run_sample.run(config, str(workdir))
    result = np.load(out['path'])
    assert str(result['guidance']) == 'free' and float(result['scale']) == weight
    np.testing.assert_array_equal(result['labels'], np.arange(10))
    assert out['nfe'] == [20] and 0.0 <= out['accuracy'] <= 1.0
  assert not (workdir / 'classifier').exists()
  # The trained network's score depends on the class (the 20-step model's samples saturate
  # at 0 and 1, so this is checked on the score itself; 20 steps from a zero embedding move
  # it by ~1e-5, deterministically).
  from scorejax import run_common
  from scorejax.models import make_model

  sde = run_common.make_sde(train_config)
  class_score = run_common.class_score_fn_builder(train_config, make_model(train_config),
                                                   sde)(params)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t = jnp.full((2,), 0.5)
  differ = class_score(x, t, jnp.array([0, 0])) - class_score(x, t, jnp.array([5, 10]))
  assert float(jnp.abs(differ).max()) > 1e-6


@pytest.mark.parametrize('overrides, expected', [
    ({'model.num_classes': 10}, 'model.num_classes=10 needs class labels, but '
                                'data.dataset=two_moons has none'),
    ({**DIGITS, 'model.num_classes': 5}, 'model.num_classes=5 but data.dataset=digits has 10'),
    ({**DIGITS, 'training.class_dropout': 2.0}, 'training.class_dropout must be in [0, 1]'),
])
def test_bad_class_conditional_training_fails_up_front(tmp_path, overrides, expected):
  with pytest.raises(ValueError) as error:
    run_train.validate(load_config(**overrides), str(tmp_path / 'w'))
  assert expected in str(error.value)


@pytest.mark.parametrize('overrides, expected', [
    ({'sampling.cfg_weight': -1.0}, 'sampling.cfg_weight must be finite and >= 0'),
    ({'sampling.class_label': 10}, 'not a class of the model (model.num_classes=10)'),
])
def test_bad_classifier_free_sampling_fails_up_front(tmp_path, overrides, expected):
  config = load_config(**{**DIGITS, 'model.num_classes': 10, 'sampling.condition': 'class',
                          **overrides})
  with pytest.raises(ValueError) as error:
    run_sample.validate(config, str(tmp_path))
  assert expected in str(error.value)


def test_eval_scores_class_conditional_samples(trained):
  """`--mode=eval` with `sampling.condition=class`: guided samples in resumable shards, each
  shard with the labels 0..K-1 in turn, scored with the requested classes (accuracy)."""
  from scorejax import run_eval, run_eval_samples

  workdir, _ = trained
  overrides = {**DIGITS, 'sampling.condition': 'class', 'sampling.batch_size': 8,
               'eval.num_samples': 12, 'eval.enable_loss': False, 'eval.enable_bpd': False,
               'sampling.classifier_scale': 3.0}
  config = load_config(**overrides)
  run_eval.validate(config, str(workdir))
  first = run_eval.run(config, str(workdir))[0]
  assert first['sample_shards_drawn'] == 2 and first['num_samples'] == 12
  assert 0.0 <= first['accuracy'] <= 1.0 and first['digits_fid'] > 0
  again = run_eval.run(config, str(workdir))[0]
  assert again['sample_shards_drawn'] == 0 and again['accuracy'] == first['accuracy']
  # Class settings name their own samples; they do not touch unconditional ones.
  directory = run_eval_samples.samples_directory(config, workdir, 20)
  assert json.loads((directory / 'settings.json').read_text())['condition'] == 'class'
  other = load_config(**{**overrides, 'sampling.classifier_scale': 1.0})
  assert run_eval_samples.samples_directory(other, workdir, 20) != directory
  # A classifier retrained to the same step in the same place (a new commit stamp) draws
  # new samples instead of scoring these.
  stamp_file = checkpoints.find_step_dir(workdir / 'classifier') / '_CHECKPOINT_METADATA'
  original = stamp_file.read_text()
  try:
    stamp = json.loads(original)
    stamp['commit_timestamp_nsecs'] += 1
    stamp_file.write_text(json.dumps(stamp))
    assert run_eval_samples.samples_directory(config, workdir, 20) != directory
  finally:
    stamp_file.write_text(original)
  assert run_eval_samples.samples_directory(config, workdir, 20) == directory
  plain = {**DIGITS, 'sampling.batch_size': 8}
  assert run_eval_samples.samples_directory(load_config(**plain), workdir, 20) == \
      run_eval_samples.samples_directory(
          load_config(**plain, **{'sampling.classifier_scale': 3.0,
                                  'sampling.cfg_weight': 2.0}), workdir, 20)


@pytest.mark.slow
def test_two_processes_train_and_guide_as_one(tmp_path):
  """Classifier training and class-conditional sampling over two CPU processes (gloo)
  match one process with two devices."""
  import os
  import subprocess
  import sys

  from test_main import MAIN, ROOT, free_port

  common = ['--config=configs/smoke.py', '--config.data.dataset=digits',
            '--config.data.num_channels=1', '--config.data.image_size=8',
            '--config.training.n_iters=10', '--config.training.snapshot_sampling=False',
            '--config.classifier.n_iters=10', '--config.sampling.condition=class',
            '--config.sampling.num_samples=8', '--config.sampling.batch_size=8']
  modes = ['train', 'train_classifier', 'sample']
  for mode in modes:
    run_main(f'--workdir={tmp_path / "single"}', *common, f'--mode={mode}',
             env={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  for mode in modes:
    port = free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, str(MAIN), f'--workdir={tmp_path / "multi"}', *common,
             f'--mode={mode}', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
             f'--process_id={i}'],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1'))
        for i in range(2)]
    for process in processes:
      _, stderr = process.communicate(timeout=300)
      assert process.returncode == 0, stderr[-3000:]
  assert_trees_equal(checkpoints.restore_params(tmp_path / 'multi' / 'classifier')[0],
                     checkpoints.restore_params(tmp_path / 'single' / 'classifier')[0],
                     atol=1e-6)
  multi = np.load(tmp_path / 'multi' / 'samples' / 'class_10.npz')
  single = np.load(tmp_path / 'single' / 'samples' / 'class_10.npz')
  np.testing.assert_array_equal(multi['labels'], single['labels'])
  np.testing.assert_allclose(multi['samples'], single['samples'], atol=1e-4)


@pytest.mark.slow  # ~25 s; tfds labels are also checked in test_datasets
def test_tfds_labels_reach_both_guidance_workflows(tmp_path, tiny_cifar10_dir):
  """On a tfds dataset (a tiny cifar10 prepared in array_record), labels drive both the
  classifier and a class-conditional model, and both guide samples."""
  cifar = {'data.dataset': 'cifar10', 'data.data_dir': tiny_cifar10_dir,
           'data.num_channels': 3, 'data.image_size': 8, 'data.centered': True,
           'classifier.batch_size': 4, 'classifier.eval_num_batches': 1,
           'sampling.condition': 'class', 'sampling.num_samples': 10, 'sampling.batch_size': 10}
  for name, overrides in (('classifier', {}), ('free', {'model.num_classes': 10})):
    workdir = tmp_path / name
    config = load_config(**cifar, **overrides)
    run_train.validate(config, str(workdir))
    run_train.run(config, str(workdir))
    if name == 'classifier':
      run_classifier.validate(config, str(workdir))
      assert run_classifier.run(config, str(workdir))['status'] == 'done'
      saved = json.loads((workdir / 'classifier' / 'config.json').read_text())
      assert saved['num_classes'] == 10 and saved['data']['dataset'] == 'cifar10'
    run_sample.validate(config, str(workdir))
    result = np.load(run_sample.run(config, str(workdir))['path'])
    assert str(result['guidance']) == name and result['samples'].shape == (10, 8, 8, 3)
    np.testing.assert_array_equal(result['labels'], np.arange(10))
