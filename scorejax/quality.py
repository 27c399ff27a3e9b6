"""Sample-quality evaluation: what the eval driver calls to turn samples into FID / IS / KID.

Owns the glue between samples, a feature network and `metrics`: reference statistics files
(pytorch-fid / EDM `mu`, `sigma`; score_sde `pool_3` features), sharded sample files
(`<dir>/samples_<k>.npz`, finished shards skipped on restart, so 50k samples survive
preemption and never sit in memory at once), streaming statistics over shards, and the
low-dimensional metrics for 2-D data. Feature networks are passed in as
`feature_fn(images) -> {'pool3' | 'features': [B, D], 'logits': [B, K]}`
(`inception.make_feature_fn`, or `digits_classifier.DigitsEvaluator.apply`).

Images are NHWC in [0, 1] (the data range of the samplers' output); for Inception they are
quantized to uint8 first, as every reference implementation does (`to_uint8`).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable, Iterable

import jax
import numpy as np

from scorejax import metrics

Array = jax.Array
FeatureFn = Callable[[np.ndarray], dict[str, np.ndarray]]
SHARD_PATTERN = re.compile(r'samples_(\d+)\.npz$')


def make_inception_feature_fn(inception_path: str | None, **kwargs) -> FeatureFn:
  """The jitted, data-parallel FID Inception from converted weights (`eval.inception_path`).

  Raises:
    FileNotFoundError: one line naming the missing file, the config field / env var and
      how to get the weights, when there is no file.
  """
  from scorejax import inception, inception_weights  # heavy module, only when needed

  return inception.make_feature_fn(inception_weights.load_variables(inception_path), **kwargs)


def load_reference_stats(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads reference statistics `(mu [D], sigma [D, D])` from an `.npz`.

  Accepts `mu` / `sigma` (pytorch-fid, EDM's `cifar10-32x32.npz`, `scripts/fid_stats.py`)
  or `pool_3` (score_sde's `assets/stats/*_stats.npz`: raw pool3 features `[N, 2048]`,
  whose statistics are computed here).

  Raises:
    FileNotFoundError: if the file is missing.
    ValueError: if it holds neither layout.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
      f'Reference statistics {str(path)!r} not found: make them with '
      '`python scripts/fid_stats.py` or download them (see docs/evaluation.md).'
    )
  with np.load(path) as data:
    if 'mu' in data.files and 'sigma' in data.files:
      return np.asarray(data['mu'], np.float64), np.asarray(data['sigma'], np.float64)
    if 'pool_3' in data.files:
      feats = np.asarray(data['pool_3'], np.float64)
      return metrics.FeatureStats(feats.shape[1]).update(feats).mean_cov()
    raise ValueError(f'{path}: expected arrays mu/sigma or pool_3, found {data.files}')


def save_reference_stats(path: str | pathlib.Path, stats: metrics.FeatureStats) -> None:
  """Writes `mu`, `sigma` (float64) and `count` in the pytorch-fid / EDM layout."""
  mu, sigma = stats.mean_cov()
  np.savez(path, mu=mu, sigma=sigma, count=np.int64(stats.count))


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Images in [0, 1] -> uint8 in [0, 255] (clip, scale, round), as TF-GAN / EDM feed them."""
  return np.clip(np.rint(np.asarray(images, np.float64) * 255.0), 0, 255).astype(np.uint8)


def write_sample_shards(
  sample_fn: Callable[[Array], np.ndarray],
  key: Array,
  directory: str | pathlib.Path,
  num_samples: int,
) -> list[pathlib.Path]:
  """Draws samples shard by shard into `directory/samples_<k>.npz`, skipping finished shards.

  Shard `k` uses `fold_in(key, k)`, so a restarted run writes exactly the shards it would
  have written. Files are written to a temporary name and renamed, so a preempted write
  never leaves a partial shard behind.

  Args:
    sample_fn: `key -> samples [S, ...]` (one shard, in the data range).
    key: PRNG key of this evaluation.
    directory: e.g. `workdir/eval/ckpt_<step>`.
    num_samples: total number of samples wanted; the last shard is truncated.

  Returns:
    The shard paths, in order.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  paths, count, index = [], 0, 0
  while count < num_samples:
    path = directory / f'samples_{index}.npz'
    if path.is_file():
      with np.load(path) as data:
        count += len(data['samples'])
    else:
      samples = np.asarray(sample_fn(jax.random.fold_in(key, index)))[: num_samples - count]
      tmp = path.with_suffix('.tmp.npz')
      np.savez(tmp, samples=samples)
      tmp.rename(path)
      count += len(samples)
    paths.append(path)
    index += 1
  return paths


def sample_shards(directory: str | pathlib.Path) -> list[pathlib.Path]:
  """The `samples_<k>.npz` files of `directory`, ordered by `k`."""
  found = [(int(m.group(1)), p) for p in pathlib.Path(directory).iterdir()
           if (m := SHARD_PATTERN.search(p.name))]
  return [p for _, p in sorted(found)]


def iterate_shards(paths: Iterable[pathlib.Path], batch_size: int) -> Iterable[np.ndarray]:
  """Yields batches `[<= batch_size, ...]` of the `samples` arrays of shard files."""
  for path in paths:
    with np.load(path) as data:
      samples = data['samples']
    for start in range(0, len(samples), batch_size):
      yield samples[start:start + batch_size]


def compute_sample_metrics(
  batches: Iterable[np.ndarray],
  reference_stats: tuple[np.ndarray, np.ndarray],
  feature_fn: FeatureFn,
  *,
  feature_key: str = 'pool3',
  logits_key: str | None = 'logits',
  reference_features: np.ndarray | None = None,
  preprocess_fn: Callable[[np.ndarray], np.ndarray] = to_uint8,
  num_splits: int = 10,
  max_kid_features: int = 50_000,
) -> dict[str, float]:
  """FID (and IS, KID) of samples streamed in batches.

  Args:
    batches: sample batches `[B, H, W, C]` in [0, 1] (e.g. `iterate_shards(...)`).
    reference_stats: `(mu, sigma)` of the reference set (`load_reference_stats`).
    feature_fn: feature network, `images -> {feature_key: [B, D], logits_key: [B, K]}`.
    feature_key: which output the Fréchet distance uses (`'pool3'` for Inception).
    logits_key: output for the Inception Score, or None to skip it.
    reference_features: optional reference features `[M, D]`; enables KID.
    preprocess_fn: maps a batch to the network input (default: quantize to uint8).
    num_splits: Inception Score splits.
    max_kid_features: sample features kept for KID (only when KID is enabled).

  Returns:
    `{'fid', 'num_samples'}` plus `'inception_score', 'inception_score_std'` and
    `'kid', 'kid_std'` when enabled.
  """
  stats, logits, kept = None, [], []
  for batch in batches:
    out = feature_fn(preprocess_fn(batch))
    feats = np.asarray(out[feature_key], np.float64)
    stats = stats or metrics.FeatureStats(feats.shape[1])
    stats.update(feats)
    if logits_key is not None:
      logits.append(np.asarray(out[logits_key], np.float32))
    if reference_features is not None and sum(map(len, kept)) < max_kid_features:
      kept.append(feats)
  if stats is None:
    raise ValueError('compute_sample_metrics: no samples')
  mu, sigma = stats.mean_cov()
  result = {'fid': metrics.frechet_distance(mu, sigma, *reference_stats),
            'num_samples': float(stats.count)}
  if logits_key is not None:
    score, score_std = metrics.inception_score(np.concatenate(logits), num_splits)
    result.update(inception_score=score, inception_score_std=score_std)
  if reference_features is not None:
    kid, kid_std = metrics.kernel_inception_distance(np.concatenate(kept), reference_features)
    result.update(kid=kid, kid_std=kid_std)
  return result


def evaluate_samples_quality(
  sample_fn: Callable[[Array], np.ndarray],
  key: Array,
  directory: str | pathlib.Path,
  num_samples: int,
  reference_stats: tuple[np.ndarray, np.ndarray],
  feature_fn: FeatureFn,
  batch_size: int = 500,
  **kwargs,
) -> dict[str, float]:
  """Writes (or resumes) sample shards under `directory`, then returns their metrics.

  The driver appends the returned dict, with the checkpoint step, to
  `workdir/eval/metrics.jsonl`. `kwargs` go to `compute_sample_metrics`.
  """
  paths = write_sample_shards(sample_fn, key, directory, num_samples)
  return compute_sample_metrics(iterate_shards(paths, batch_size), reference_stats, feature_fn,
                                **kwargs)


def lowdim_sample_metrics(
  key: Array,
  samples: Array,
  reference_samples: Array,
  log_prob_fn: Callable[[Array], Array] | None = None,
  bandwidths: tuple[float, ...] | None = None,
) -> dict[str, float]:
  """Sliced Wasserstein-2, unbiased RBF MMD^2 and (if the density is known) NLL of samples.

  Args:
    key: PRNG key of the SWD projections.
    samples: model samples `[N, D]`.
    reference_samples: data samples `[M, D]` (a few thousand suffice in 2-D).
    log_prob_fn: the true data log-density `[N, D] -> [N]`, if known.
    bandwidths: RBF widths; default the median heuristic.

  Returns:
    `{'swd', 'mmd'}` and `'nll'` (nats) when `log_prob_fn` is given.
  """
  result = {
    'swd': float(metrics.sliced_wasserstein_distance(key, samples, reference_samples)),
    'mmd': float(metrics.mmd_rbf(samples, reference_samples, bandwidths)),
  }
  if log_prob_fn is not None:
    result['nll'] = float(metrics.negative_log_likelihood(samples, log_prob_fn))
  return result
