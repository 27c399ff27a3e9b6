"""Tests for scorejax.metrics: closed forms, unbiasedness, streaming = batch statistics."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from scorejax import metrics


def _random_spd(rng, dim, scale=1.0):
  a = rng.normal(size=(dim, dim))
  return scale * (a @ a.T / dim + 0.1 * np.eye(dim))


# ---------------------------------------------------------------------------- FID


def test_frechet_distance_diagonal_closed_form():
  # Commuting (diagonal) covariances: tr sqrt(C1 C2) = sum sqrt(a_i b_i), so
  # d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  rng = np.random.default_rng(0)
  a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_frechet_distance_non_commuting_2x2_closed_form():
  # For a 2x2 matrix M with non-negative real eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
  cov1 = np.array([[2.0, 0.7], [0.7, 1.0]])
  cov2 = np.array([[1.0, -0.4], [-0.4, 3.0]])
  assert not np.allclose(cov1 @ cov2, cov2 @ cov1)
  prod = cov1 @ cov2
  tr_sqrt = np.sqrt(np.trace(prod) + 2 * np.sqrt(np.linalg.det(prod)))
  mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 2.0])
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt
  np.testing.assert_allclose(metrics.frechet_distance(mu1, cov1, mu2, cov2), expected, rtol=1e-12)


def test_frechet_distance_non_commuting_matches_scipy_sqrtm():
  rng = np.random.default_rng(1)
  dim = 64
  cov1, cov2 = _random_spd(rng, dim), _random_spd(rng, dim, 2.0)
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  covmean = scipy.linalg.sqrtm(cov1 @ cov2).real  # independent (Schur-based) square root
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * covmean)
  np.testing.assert_allclose(metrics.frechet_distance(mu1, cov1, mu2, cov2), expected, rtol=1e-9)


def test_frechet_distance_self_is_zero_even_if_singular():
  rng = np.random.default_rng(2)
  feats = rng.normal(size=(50, 128))  # fewer samples than dims: singular covariance
  mu, cov = feats.mean(0), np.cov(feats, rowvar=False)
  # Round-off eigenvalues ~1e-16 of the null space become ~1e-8 after the square root.
  assert abs(metrics.frechet_distance(mu, cov, mu, cov)) < 1e-6 * np.trace(cov)


def test_frechet_distance_rejects_bad_shapes():
  with pytest.raises(ValueError, match='shapes'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_stats_equal_batch_stats():
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(1000, 12)) * 5 + 100  # large offset: exercises cancellation
  stats = metrics.FeatureStats(12)
  for chunk in np.array_split(feats, 7):
    stats.update(chunk)
  mean, cov = stats.mean_cov()
  np.testing.assert_allclose(mean, feats.mean(0), rtol=1e-12)
  np.testing.assert_allclose(cov, np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-9)
  left = metrics.FeatureStats(12).update(feats[:300])
  right = metrics.FeatureStats(12).update(feats[300:])
  merged_mean, merged_cov = left.merge(right).mean_cov()
  np.testing.assert_allclose(merged_mean, mean, rtol=1e-12)
  np.testing.assert_allclose(merged_cov, cov, rtol=1e-8, atol=1e-9)
  with pytest.raises(ValueError, match='at least 2'):
    metrics.FeatureStats(3).update(np.zeros((1, 3))).mean_cov()


# ---------------------------------------------------------------------------- KID


def test_kid_near_zero_for_same_distribution_and_positive_otherwise():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
  kid_mean, kid_std = metrics.kernel_inception_distance(x, y, num_subsets=50, subset_size=200)
  assert abs(kid_mean) < 3 * kid_std / np.sqrt(50) + 1e-3
  shifted = rng.normal(size=(600, 8)) + 0.5
  kid_shift, _ = metrics.kernel_inception_distance(x, shifted, num_subsets=50, subset_size=200)
  assert kid_shift > 20 * abs(kid_mean)


def test_kid_is_unbiased_on_a_discrete_known_case():
  # P, Q uniform on 3 points each: the population MMD^2 is an exact finite sum over pairs
  # (including equal points, since draws are independent). Subsets of 5 i.i.d. draws make the
  # biased V-statistic visibly off; the unbiased estimator must match in expectation.
  support_p = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  support_q = np.array([[0.5, 0.0], [0.0, -1.0], [2.0, 1.0]])

  def mean_kernel(a, b):
    return np.mean([(u @ v / 2 + 1) ** 3 for u, v in itertools.product(a, b)])

  population = (
    mean_kernel(support_p, support_p)
    + mean_kernel(support_q, support_q)
    - 2 * mean_kernel(support_p, support_q)
  )
  rng = np.random.default_rng(5)
  x = support_p[rng.integers(0, 3, 200_000)]
  y = support_q[rng.integers(0, 3, 200_000)]
  num_subsets, m = 4000, 5
  kid_mean, kid_std = metrics.kernel_inception_distance(x, y, num_subsets, m, seed=0)
  stderr = kid_std / np.sqrt(num_subsets)
  assert abs(kid_mean - population) < 4 * stderr
  # The V-statistic's bias, (E k(x,x) - E k(x,x') + E k(y,y) - E k(y,y')) / m, is far outside.
  bias = (
    np.mean([(u @ u / 2 + 1) ** 3 for u in support_p]) - mean_kernel(support_p, support_p)
    + np.mean([(u @ u / 2 + 1) ** 3 for u in support_q]) - mean_kernel(support_q, support_q)
  ) / m
  assert bias > 10 * stderr


# ---------------------------------------------------------------------------- IS


def test_inception_score_uniform_logits_is_one():
  score, std = metrics.inception_score(np.zeros((100, 10)))
  np.testing.assert_allclose([score, std], [1.0, 0.0], atol=1e-12)


def test_inception_score_confident_balanced_is_num_classes():
  num_classes = 7
  labels = np.tile(np.arange(num_classes), 20)  # every split holds each class equally
  logits = 1e4 * np.eye(num_classes)[labels]
  score, std = metrics.inception_score(logits, num_splits=4)
  np.testing.assert_allclose(score, num_classes, rtol=1e-9)
  assert std < 1e-9


def test_inception_score_collapsed_confident_is_one():
  logits = np.tile(1e4 * np.eye(5)[2], (40, 1))
  np.testing.assert_allclose(metrics.inception_score(logits, 2)[0], 1.0, rtol=1e-9)


# ---------------------------------------------------------------------------- low-dim


def test_sliced_wasserstein_gaussian_closed_form():
  # N(a, s^2 I) vs N(b, t^2 I) in 2-D: each projection is N(theta.a, s^2) vs N(theta.b, t^2),
  # W2^2 = (theta.(a-b))^2 + (s-t)^2, averaged over the circle: |a-b|^2 / 2 + (s-t)^2.
  key_x, key_y, key_proj = jax.random.split(jax.random.key(0), 3)
  a, b, s, t = jnp.array([1.0, -1.0]), jnp.array([-0.5, 0.5]), 1.0, 0.5
  x = a + s * jax.random.normal(key_x, (20_000, 2))
  y = b + t * jax.random.normal(key_y, (15_000, 2))  # different counts: quantile interpolation
  swd = metrics.sliced_wasserstein_distance(key_proj, x, y, num_projections=512)
  expected = jnp.sqrt(jnp.sum((a - b) ** 2) / 2 + (s - t) ** 2)
  np.testing.assert_allclose(swd, expected, rtol=0.03)
  same = metrics.sliced_wasserstein_distance(key_proj, x[:10_000], x[10_000:])
  assert same < 0.05


def test_mmd_rbf_matches_gaussian_closed_form():
  # E exp(-|u - v|^2 / (2 h^2)) for u ~ N(a, s^2 I_d), v ~ N(b, t^2 I_d) equals
  # (h^2 / (h^2 + s^2 + t^2))^(d/2) exp(-|a - b|^2 / (2 (h^2 + s^2 + t^2))).
  def expected_kernel(a, s, b, t, h, d):
    v = h**2 + s**2 + t**2
    return (h**2 / v) ** (d / 2) * np.exp(-np.sum((a - b) ** 2) / (2 * v))

  d, h = 2, 1.5
  a, b, s, t = np.array([0.5, 0.0]), np.array([-0.5, 0.5]), 1.0, 0.7
  population = (
    expected_kernel(a, s, a, s, h, d)
    + expected_kernel(b, t, b, t, h, d)
    - 2 * expected_kernel(a, s, b, t, h, d)
  )
  key_x, key_y = jax.random.split(jax.random.key(1))
  x = a + s * jax.random.normal(key_x, (3000, d))
  y = b + t * jax.random.normal(key_y, (3000, d))
  got = metrics.mmd_rbf(x, y, bandwidths=[h])
  # Std of the unbiased estimator at n=3000 is ~1e-3 here (checked over seeds).
  np.testing.assert_allclose(got, population, atol=4e-3)
  assert population > 0.05
  same = metrics.mmd_rbf(x[:1500], x[1500:])  # median-heuristic bandwidth
  assert abs(same) < 4e-3


def test_negative_log_likelihood_of_true_samples_is_entropy():
  d = 3
  x = jax.random.normal(jax.random.key(2), (20_000, d))

  def log_prob_fn(z):
    return -0.5 * jnp.sum(z**2, axis=-1) - 0.5 * d * jnp.log(2 * jnp.pi)

  entropy = 0.5 * d * np.log(2 * np.pi * np.e)
  np.testing.assert_allclose(metrics.negative_log_likelihood(x, log_prob_fn), entropy, rtol=0.01)
