"""Tests for scorejax.digits_classifier: the packaged classifier and digits-FID."""

import importlib.resources
import json
import sys

import jax
import numpy as np
import pytest
import scipy.ndimage

from scorejax import digits_classifier


@pytest.fixture(scope='module')
def evaluator():
  return digits_classifier.load_evaluator()


@pytest.fixture(scope='module')
def test_digits():
  return digits_classifier.digits_with_labels('test')


def test_asset_is_small_and_classifier_accurate_on_held_out_digits(evaluator, test_digits):
  asset = importlib.resources.files('scorejax') / 'assets' / digits_classifier.ASSET_NAME
  assert asset.stat().st_size < 800_000
  images, labels = test_digits
  result = evaluator.metrics(images, labels)
  assert result['accuracy'] >= 0.97
  assert result['digits_is'] > 8.0  # confident and class-balanced
  np.testing.assert_allclose(result['class_entropy'], np.log(10), atol=0.05)


def test_packaged_reference_stats_are_those_of_the_training_digits(evaluator):
  images, _ = digits_classifier.digits_with_labels('train')
  mu, sigma = digits_classifier.reference_stats(evaluator.params, images)
  np.testing.assert_allclose(evaluator.ref_mu, mu, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(evaluator.ref_sigma, sigma, rtol=1e-4, atol=1e-5)


def test_digits_fid_separates_real_blurred_and_noise(evaluator, test_digits):
  images, _ = test_digits
  rng = np.random.default_rng(0)
  blurred = scipy.ndimage.gaussian_filter(images, sigma=(0, 1.0, 1.0, 0))
  noise = rng.uniform(size=images.shape)
  fid = {
    name: evaluator.metrics(x)['digits_fid']
    for name, x in [('real', images), ('blurred', blurred), ('noise', noise)]
  }
  # Real held-out digits sit at the finite-sample floor; blur and noise far above it.
  # (Uniform noise is not "worse" than a sigma=1 blur in this feature space: both are far.)
  assert fid['blurred'] > 8 * fid['real'], fid
  assert fid['noise'] > 8 * fid['real'], fid


def test_pixel_repeated_digits_give_the_same_features(evaluator, test_digits):
  images, _ = test_digits
  upsampled = np.repeat(np.repeat(images[:16], 4, axis=1), 4, axis=2)  # 32x32, as datasets.py
  np.testing.assert_allclose(
    evaluator.apply(upsampled)['features'], evaluator.apply(images[:16])['features'], atol=1e-5
  )
  with pytest.raises(ValueError, match='8k, 8k, 1'):
    evaluator.apply(np.zeros((2, 10, 10, 1)))


@pytest.mark.slow  # three compilations of the training scan (~40 s on the shared CPU)
def test_training_is_deterministic():
  images, labels = digits_classifier.digits_with_labels('train')
  images, labels = images[:200], labels[:200]
  first = digits_classifier.train_classifier(jax.random.key(0), images, labels, num_epochs=1)
  second = digits_classifier.train_classifier(jax.random.key(0), images, labels, num_epochs=1)
  other = digits_classifier.train_classifier(jax.random.key(1), images, labels, num_epochs=1)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(first['head']['kernel'], other['head']['kernel'])


def test_eval_digits_script(tmp_path, monkeypatch, capsys, test_digits):
  sys.path.insert(0, str(importlib.resources.files('scorejax').parent / 'scripts'))
  import eval_digits

  images, labels = test_digits
  np.savez(tmp_path / 'samples.npz', samples=images[:100], labels=labels[:100])
  monkeypatch.setattr(sys, 'argv', ['eval_digits.py', '--samples', str(tmp_path / 'samples.npz')])
  eval_digits.main()
  lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert lines[0]['num_samples'] == 100 and lines[0]['accuracy'] >= 0.95
  assert lines[1]['real_test_digits'] == 297


def test_eval_digits_scores_completions(tmp_path, monkeypatch, capsys, test_digits):
  sys.path.insert(0, str(importlib.resources.files('scorejax').parent / 'scripts'))
  import eval_digits

  images, _ = test_digits
  # "Completions" that are the originals, inputs with the bottom half blanked, and a file
  # whose originals are not the test digits in order.
  blanked = images[:60].copy()
  blanked[:, 4:] = 0.5
  path = tmp_path / 'inpaint.npz'
  np.savez(path, samples=images[:60], originals=images[:60], observed=blanked)
  monkeypatch.setattr(sys, 'argv', ['eval_digits.py', '--samples', str(path)])
  eval_digits.main()
  scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert scores['completions_of'] == 60
  assert scores['originals_agreement'] == scores['samples_agreement'] == 1.0
  assert scores['samples_accuracy'] == scores['originals_accuracy'] >= 0.95
  assert scores['observed_agreement'] < 0.9  # half a digit is often read as another one
  np.savez(path, samples=images[:60], originals=images[1:61], observed=blanked)
  with pytest.raises(ValueError, match='not the first test digits'):
    eval_digits.main()
