"""Sample-quality evaluation (digits-FID, resumable shards, start-up checks), sharded sampling."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from scorejax import digits_classifier, quality, run_common, run_eval, run_eval_samples, run_train
from scorejax.models import make_model
from tests.test_main import load_config


def tiny_digits(seed=None, **overrides):
  settings = {
      'training.batch_size': 16, 'training.n_iters': 4, 'training.log_freq': 2,
      'training.eval_freq': 4, 'training.snapshot_freq': 4,
      'training.snapshot_freq_for_preemption': 4, 'training.snapshot_sampling': False,
      'model.hidden': 16, 'model.num_layers': 1, 'model.embedding_dim': 16,
      'sampling.num_steps': 8, 'sampling.batch_size': 16, 'eval.num_samples': 40,
      'eval.enable_loss': False, 'eval.enable_bpd': False, 'eval.enable_elbo': False,
  }
  settings.update(overrides)
  config = load_config('default', **settings)
  if seed is not None:
    config.seed = seed
  return config


def test_digits_eval_gives_finite_metrics_and_resumes(tmp_path):
  config = tiny_digits()
  run_train.run(config, str(tmp_path))
  first = run_eval.run(config, str(tmp_path))[0]
  assert first['step'] == 4
  # 40 samples in shards of 16 (rounded to the 2 devices): 16 + 16 + 8.
  assert first['sample_shards_drawn'] == 3 and first['num_samples'] == 40
  assert first['sample_nfe'] == 8
  for name in ('digits_fid', 'digits_is', 'confidence', 'class_entropy'):
    assert np.isfinite(first[name]), name
  assert first['digits_fid'] > 0 and 1 <= first['digits_is'] <= 10
  # The metrics are those of the evaluator on the written samples.
  directory = run_eval_samples.samples_directory(config, tmp_path, 4)
  assert directory.parent == tmp_path / 'eval' / 'ckpt_4'
  settings = json.loads((directory / 'settings.json').read_text())
  assert settings['seed'] == config.seed and settings['sampling']['num_steps'] == 8
  shards = quality.sample_shards(directory)
  samples = np.concatenate([np.load(p)['samples'] for p in shards])
  assert samples.shape == (40, 8, 8, 1) and samples.min() >= 0 and samples.max() <= 1
  expected = digits_classifier.load_evaluator().metrics(samples)
  assert first['digits_fid'] == pytest.approx(expected['digits_fid'], rel=1e-9)

  # Interrupted after two shards: the rerun draws only the last one, with the same key.
  shards[-1].unlink()
  resumed = run_eval.run(config, str(tmp_path))[0]
  assert resumed['sample_shards_drawn'] == 1
  np.testing.assert_array_equal(np.load(shards[-1])['samples'], samples[32:])
  assert resumed['digits_fid'] == pytest.approx(first['digits_fid'], rel=1e-9)
  again = run_eval.run(config, str(tmp_path))[0]
  assert again['sample_shards_drawn'] == 0 and 'sample_nfe' not in again

  # Another seed or sampler draws its own samples; it never scores the shards above.
  for overrides in ({'seed': 7}, {'sampling.num_steps': 4}, {'sampling.method': 'fast'}):
    other = tiny_digits(**overrides)  # seed=7 or a 'section.field' override
    result = run_eval.run(other, str(tmp_path))[0]
    assert result['sample_shards_drawn'] == 3, overrides
    assert result['digits_fid'] != pytest.approx(first['digits_fid'], rel=1e-6), overrides
    assert run_eval_samples.samples_directory(other, tmp_path, 4) != directory
  assert len(list((tmp_path / 'eval' / 'ckpt_4').glob('sampler_*'))) == 4
  assert run_eval.run(config, str(tmp_path))[0]['sample_shards_drawn'] == 0
  np.testing.assert_array_equal(np.load(shards[0])['samples'], samples[:16])


def test_image_metrics_need_weights_and_stats(tmp_path, monkeypatch):
  monkeypatch.delenv('SCOREJAX_INCEPTION_PATH', raising=False)
  missing = str(tmp_path / 'inception_fid.npz')
  config = load_config('vp_cifar', **{'eval.enable_sampling': True,
                                      'eval.inception_path': missing})
  with pytest.raises(FileNotFoundError, match='eval.inception_path') as error:
    run_eval_samples.validate(config)
  assert missing in str(error.value) and '\n' not in str(error.value)

  weights = tmp_path / 'weights.npz'
  weights.write_bytes(b'')
  monkeypatch.setenv('SCOREJAX_INCEPTION_PATH', str(weights))  # the env var is the fallback
  config = load_config('vp_cifar', **{'eval.enable_sampling': True})
  with pytest.raises(FileNotFoundError, match=r"eval.fid_stats_path='': reference statistics"):
    run_eval_samples.validate(config)
  # Digits and 2-D toys need no file.
  run_eval_samples.validate(load_config('default'))
  run_eval_samples.validate(load_config('smoke'))


@pytest.mark.parametrize('method', ['pc', 'ode', 'fast', 'edm', 'adaptive'])
def test_sharded_sampling_is_device_count_independent(method):
  """The same key gives the same samples with the batch on one device or split over two."""
  assert jax.device_count() >= 2
  config = load_config('smoke', **{'sampling.method': method, 'sampling.ode_method': 'heun',
                                   'sampling.num_steps': 6, 'sampling.s_churn': 3.0})
  model = make_model(config)
  sde = run_common.make_sde(config)
  params = run_common.init_params(model, jax.random.key(0), (2,))
  key = jax.random.key(3)
  outputs = []
  for devices in (jax.devices()[:1], jax.devices()[:2]):
    mesh = Mesh(np.asarray(devices), ('data',))
    sampler = run_common.make_sharded_sampler(config, model, sde, 8, mesh)
    samples, nfe = sampler(key, params)
    assert len(samples.sharding.device_set) == len(devices)
    outputs.append((np.asarray(samples), int(nfe)))
  (one, nfe_one), (two, nfe_two) = outputs
  assert nfe_one == nfe_two and one.shape == (8, 2) and np.isfinite(one).all()
  np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-5)  # fast: untrained x0 ~ 1e2
  assert np.abs(one - one[::-1]).max() > 0.1  # rows differ: the noise is per example


def test_sharded_batch_size_rounds_up_to_devices():
  mesh = Mesh(np.asarray(jax.devices()[:2]), ('data',))
  assert [run_common.sharded_batch_size(b, mesh) for b in (1, 2, 7, 64)] == [2, 2, 8, 64]
  config = load_config('smoke')
  with pytest.raises(ValueError, match='multiple of the 2 devices'):
    run_common.make_sharded_sampler(config, make_model(config), run_common.make_sde(config), 3,
                                    mesh)


def test_method_settings_enter_the_tag_only_with_their_sampler(tmp_path):
  # Runs evaluated before the EDM / adaptive samplers existed keep their sample shards.
  tag = lambda **overrides: run_eval_samples.samples_directory(
      load_config('default', **overrides), tmp_path, 1).name
  assert tag() == tag(**{'sampling.s_churn': 30.0, 'sampling.rho': 3.0,
                         'sampling.adaptive_rtol': 0.01})
  edm = tag(**{'sampling.method': 'edm'})
  assert edm != tag() and edm != tag(**{'sampling.method': 'edm', 'sampling.s_churn': 30.0})
  assert edm == tag(**{'sampling.method': 'edm', 'sampling.adaptive_rtol': 0.01})
  adaptive = tag(**{'sampling.method': 'adaptive'})
  assert adaptive != tag(**{'sampling.method': 'adaptive', 'sampling.adaptive_atol': 0.01})
  assert adaptive == tag(**{'sampling.method': 'adaptive', 'sampling.s_churn': 30.0})
