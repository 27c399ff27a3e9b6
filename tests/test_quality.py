"""Tests for scorejax.quality: stats files, resumable sample shards, streamed metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scorejax import metrics, quality

PROJECTION = np.random.default_rng(0).normal(size=(4 * 4 * 3, 6))


def _toy_feature_fn(images):
  """A fixed linear 'network' on uint8 images: 6-d features, 3-way logits."""
  feats = images.reshape(len(images), -1).astype(np.float64) / 255 @ PROJECTION
  return {'pool3': feats, 'logits': feats[:, :3]}


def test_reference_stats_layouts(tmp_path):
  feats = np.random.default_rng(1).normal(size=(300, 5))
  mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
  np.savez(tmp_path / 'score_sde.npz', pool_3=feats)  # score_sde's assets/stats layout
  quality.save_reference_stats(tmp_path / 'ours.npz', metrics.FeatureStats(5).update(feats))
  for name in ('score_sde.npz', 'ours.npz'):
    got_mu, got_sigma = quality.load_reference_stats(tmp_path / name)
    np.testing.assert_allclose(got_mu, mu, rtol=1e-12)
    np.testing.assert_allclose(got_sigma, sigma, rtol=1e-9, atol=1e-12)
  assert int(np.load(tmp_path / 'ours.npz')['count']) == 300
  np.savez(tmp_path / 'bad.npz', x=feats)
  with pytest.raises(ValueError, match='mu/sigma or pool_3'):
    quality.load_reference_stats(tmp_path / 'bad.npz')
  with pytest.raises(FileNotFoundError, match='fid_stats.py'):
    quality.load_reference_stats(tmp_path / 'absent.npz')


def test_sample_shards_resume_and_are_deterministic(tmp_path):
  calls = []

  def sample_fn(key):
    calls.append(key)
    return np.asarray(jax.random.uniform(key, (4, 4, 4, 3)))

  key = jax.random.key(3)
  paths = quality.write_sample_shards(sample_fn, key, tmp_path / 'a', num_samples=10)
  assert [p.name for p in paths] == ['samples_0.npz', 'samples_1.npz', 'samples_2.npz']
  assert [len(np.load(p)['samples']) for p in paths] == [4, 4, 2]
  assert len(calls) == 3
  paths[1].unlink()  # as if preempted before shard 1 was written
  quality.write_sample_shards(sample_fn, key, tmp_path / 'a', num_samples=10)
  assert len(calls) == 4  # only the missing shard was drawn again
  fresh = quality.write_sample_shards(sample_fn, key, tmp_path / 'b', num_samples=10)
  for old, new in zip(quality.sample_shards(tmp_path / 'a'), fresh, strict=True):
    np.testing.assert_array_equal(np.load(old)['samples'], np.load(new)['samples'])


def test_streamed_metrics_equal_direct_computation(tmp_path):
  rng = np.random.default_rng(4)
  samples = rng.uniform(size=(90, 4, 4, 3))
  reference = rng.uniform(size=(120, 4, 4, 3)) ** 2
  for k, chunk in enumerate(np.array_split(samples, 3)):
    np.savez(tmp_path / f'samples_{k}.npz', samples=chunk)
  ref_feats = _toy_feature_fn(quality.to_uint8(reference))['pool3']
  ref_stats = metrics.FeatureStats(6).update(ref_feats).mean_cov()
  batches = quality.iterate_shards(quality.sample_shards(tmp_path), batch_size=16)
  got = quality.compute_sample_metrics(batches, ref_stats, _toy_feature_fn,
                                       reference_features=ref_feats, num_splits=3)
  out = _toy_feature_fn(quality.to_uint8(samples))
  feats = out['pool3']
  expected_fid = metrics.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), *ref_stats)
  np.testing.assert_allclose(got['fid'], expected_fid, rtol=1e-9)
  assert got['fid'] > 0.1 and got['num_samples'] == 90
  np.testing.assert_allclose(got['inception_score'], metrics.inception_score(out['logits'], 3)[0],
                             rtol=1e-5)
  np.testing.assert_allclose(got['kid'], metrics.kernel_inception_distance(feats, ref_feats)[0],
                             rtol=1e-9)


def test_to_uint8_rounds_and_clips():
  np.testing.assert_array_equal(quality.to_uint8(np.array([-0.1, 0.0, 0.5, 1.0, 1.2])),
                                [0, 0, 128, 255, 255])


def test_lowdim_metrics_separate_good_from_bad_samples():
  keys = jax.random.split(jax.random.key(5), 4)
  reference = jax.random.normal(keys[0], (2000, 2))
  good = jax.random.normal(keys[1], (2000, 2))
  bad = 0.3 * jax.random.normal(keys[2], (2000, 2)) + 1.0

  def log_prob_fn(x):
    return -0.5 * jnp.sum(x**2, -1) - jnp.log(2 * jnp.pi)

  good_metrics = quality.lowdim_sample_metrics(keys[3], good, reference, log_prob_fn)
  bad_metrics = quality.lowdim_sample_metrics(keys[3], bad, reference, log_prob_fn)
  assert good_metrics['swd'] < 0.1 < 0.5 < bad_metrics['swd']
  assert abs(good_metrics['mmd']) < 0.01 < 0.1 < bad_metrics['mmd']
  np.testing.assert_allclose(good_metrics['nll'], np.log(2 * np.pi * np.e), rtol=0.03)


def test_missing_inception_weights_fail_with_one_line(tmp_path, monkeypatch):
  monkeypatch.delenv('SCOREJAX_INCEPTION_PATH', raising=False)
  with pytest.raises(FileNotFoundError) as error:
    quality.make_inception_feature_fn(str(tmp_path / 'inception_fid.npz'))
  message = str(error.value)
  assert '\n' not in message
  for needle in ('inception_fid.npz', 'eval.inception_path', 'SCOREJAX_INCEPTION_PATH',
                 'convert_inception.py', 'pt_inception-2015-12-05'):
    assert needle in message


def test_fid_stats_script_on_digits(tmp_path, monkeypatch, capsys):
  import importlib.resources
  import sys

  from scorejax import digits_classifier

  sys.path.insert(0, str(importlib.resources.files('scorejax').parent / 'scripts'))
  import fid_stats

  out = tmp_path / 'digits_test_stats.npz'
  monkeypatch.setattr(sys, 'argv', ['fid_stats.py', 'compute', '--dataset', 'digits', '--split',
                                    'test', '--image_size', '16', '--out', str(out)])
  fid_stats.main()
  evaluator = digits_classifier.load_evaluator()
  np.savez(tmp_path / 'ref.npz', mu=evaluator.ref_mu, sigma=evaluator.ref_sigma)
  monkeypatch.setattr(sys, 'argv', ['fid_stats.py', 'compare', str(out), str(tmp_path / 'ref.npz')])
  capsys.readouterr()
  fid_stats.main()
  printed = float(capsys.readouterr().out.split()[-1])
  images, _ = digits_classifier.digits_with_labels('test')
  np.testing.assert_allclose(printed, evaluator.metrics(images)['digits_fid'], atol=1e-3)
