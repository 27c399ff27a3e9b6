"""Sample-quality evaluation of one checkpoint, for the eval driver (`eval.enable_sampling`).

Draws `eval.num_samples` samples with the configured sampler, split over all devices, in
shards `workdir/eval/ckpt_<step>/sampler_<tag>/samples_<k>.npz` (`quality.write_sample_shards`:
shard `k` uses `fold_in(key, k)` and finished shards are skipped, so an interrupted
evaluation resumes where it stopped and gives the same numbers), then scores them by data
kind. `<tag>` is a hash of every setting the samples depend on besides the parameters
(`sampler_settings`: seed, `sampling.*`, the SDE, model and data fields), written beside
them in `settings.json`: another sampler, seed or step count draws its own samples instead
of scoring the shards of an earlier run.

  'toy'    (2-D toys): sliced Wasserstein-2 and MMD^2 to samples of the true distribution,
           and the NLL of the samples under its true density (`quality.lowdim_sample_metrics`).
  'digits': digits-FID, digits-IS, confidence and class-histogram entropy of the packaged
           digits classifier (`digits_classifier.load_evaluator`, no external file).
  'images' (cifar10, celeba, ...): FID and Inception Score with the FID Inception-v3 from
           `eval.inception_path` (or `$SCOREJAX_INCEPTION_PATH`) against the reference
           statistics `eval.fid_stats_path`, and KID when that file holds raw `pool_3`
           features (score_sde's stats files).

With `sampling.condition=class` the samples are class-conditional
(`run_class_conditional.make_class_sampler`: classifier or classifier-free guidance), each
shard drawing the labels 0, 1, ..., K-1 in turn (or `sampling.class_label`); the digits then
also get `accuracy`, how often the digits classifier reads the requested class, and FID /
IS / KID are those of the class-balanced samples (the "conditional FID" of guided samplers).

`validate(config)` checks the files of the 'images' kind up front, so a run without them
fails at start-up with one line (which file, which field, how to get it).

References:
  Heusel et al. 2017 (FID); Salimans et al. 2016 (IS); Binkowski et al. 2018 (KID);
  Song et al. 2021, ICLR, Table 1 (FID / IS of 50k CIFAR-10 samples).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import TYPE_CHECKING

import jax
import numpy as np
from absl import logging

from scorejax import quality, run_common, toy_data

if TYPE_CHECKING:
  from scorejax.run_eval import EvalContext

SAMPLES_STREAM = 1  # fold_in constant of the sample-quality key within the eval key
REFERENCE_STREAM = 2  # seed offset of the toy reference samples
NUM_TOY_REFERENCE = 5000  # true-distribution samples the 2-D metrics compare against


def sample_kind(config) -> str:
  """'toy', 'digits' or 'images': which metrics the samples of `data.dataset` get."""
  if run_common.is_toy(config):
    return 'toy'
  if config.data.dataset.lower() == 'digits':
    return 'digits'
  return 'images'


def inception_path(config) -> str | None:
  """`eval.inception_path`, else `$SCOREJAX_INCEPTION_PATH`, else None."""
  from scorejax.inception_weights import WEIGHTS_ENV_VAR

  return config.eval.inception_path or os.environ.get(WEIGHTS_ENV_VAR) or None


def validate(config) -> None:
  """Checks that the 'images' metrics have their files (nothing is loaded or written).

  Raises:
    FileNotFoundError: one line naming the missing Inception weights or reference
      statistics, the config field and how to make them.
  """
  if not config.eval.enable_sampling or sample_kind(config) != 'images':
    return
  from scorejax.inception_weights import missing_weights_message

  path = inception_path(config)
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(missing_weights_message(path))
  stats = config.eval.fid_stats_path
  if not stats or not os.path.isfile(stats):
    raise FileNotFoundError(
        f'eval.fid_stats_path={stats!r}: reference statistics not found; make them with '
        '`python scripts/fid_stats.py compute ...` or download them (see docs/evaluation.md)'
    )


# Sample-mode settings that do not change the samples of --mode=eval.
_NOT_SAMPLER_SETTINGS = ('num_samples', 'condition', 'mask', 'n_resample', 'guidance')


# Settings of class-conditional sampling, which count only with `sampling.condition=class`
# (so unconditional samples keep the tags they had before these settings existed).
_CLASS_SETTINGS = ('class_label', 'classifier_scale', 'cfg_weight', 'classifier')
# Settings of one sampling method, which count only with that `sampling.method` (likewise).
_METHOD_SETTINGS = {'edm': ('rho', 's_churn', 's_tmin', 's_tmax', 's_noise'),
                    'adaptive': ('adaptive_rtol', 'adaptive_atol')}


def is_class_conditional(config) -> bool:
  """Whether the eval samples are class-conditional (`sampling.condition=class`)."""
  return config.sampling.condition == 'class'


def sampler_settings(config, workdir: pathlib.Path | None = None) -> dict:
  """The settings the eval samples of a checkpoint depend on, besides its parameters (shard
  `k` draws from `fold_in(key, k)`, so the shard size, rounded to the devices, counts too;
  classifier guidance also depends on the classifier's checkpoint step and when it was saved)."""
  conditional = is_class_conditional(config)
  method = config.sampling.method.lower()
  unused = {k for name, keys in _METHOD_SETTINGS.items() if name != method for k in keys}
  sampling = {k: v for k, v in config.sampling.to_dict().items()
              if k not in _NOT_SAMPLER_SETTINGS and (conditional or k not in _CLASS_SETTINGS)
              and k not in unused}
  # Fields added later count only when they change the network's meaning (old tags stay).
  precondition = config.model.get('preconditioning', '')
  model = {k: v for k, v in config.model.to_dict().items()
           if (k not in ('num_classes', 'preconditioning') or v)
           and (k != 'sigma_data' or precondition)}
  settings = {'seed': config.seed, 'sampling': sampling, 'model': model,
              'data': config.data.to_dict(), 'rows_per_shard': shard_size(config),
              'training': {k: config.training[k] for k in ('sde', 'continuous')}}
  if conditional:
    settings['condition'] = 'class'
    if not run_common.is_class_conditional(config) and workdir is not None:
      from scorejax import checkpoints, run_class_conditional

      step_dir = checkpoints.find_step_dir(run_class_conditional.classifier_dir(config, workdir))
      settings['classifier_checkpoint'] = str(step_dir.resolve())
      # A classifier retrained from scratch to the same step must not reuse these shards.
      settings['classifier_saved_at'] = checkpoints.saved_at(step_dir)
  return settings


def samples_directory(config, workdir: pathlib.Path, step: int) -> pathlib.Path:
  """`workdir/eval/ckpt_<step>/sampler_<tag>`, `<tag>` a hash of `sampler_settings`."""
  text = json.dumps(sampler_settings(config, workdir), sort_keys=True, default=str)
  tag = hashlib.sha256(text.encode()).hexdigest()[:10]
  return workdir / 'eval' / f'ckpt_{step}' / f'sampler_{tag}'


def shard_size(config) -> int:
  """Samples per shard: `sampling.batch_size` (at most `eval.num_samples`), device-aligned."""
  return run_common.sharded_batch_size(min(config.sampling.batch_size, config.eval.num_samples))


def evaluate_samples(context: EvalContext) -> dict[str, float]:
  """Draws (or resumes) the samples of `context.step` and returns their quality metrics.

  Returns:
    The metrics of the data kind (see the module docstring), plus `num_samples`,
    `sample_shards_drawn` (shards sampled by this call; 0 when all were already on disk)
    and `sample_nfe` (score evaluations per shard, when any shard was drawn).
  """
  config = context.config
  num_samples = config.eval.num_samples
  rows = shard_size(config)
  labels = None
  if is_class_conditional(config):
    from scorejax import run_class_conditional

    class_sampler = run_class_conditional.make_class_sampler(
        config, context.workdir, context.model, context.sde, rows)
    # Every shard draws the same labels (balanced over the classes for class_label=-1).
    labels = run_class_conditional.sample_labels(class_sampler.num_classes, rows,
                                                 config.sampling.class_label)
    sampler = lambda key, params: class_sampler(key, params, labels)
  else:
    sampler = run_common.make_sharded_sampler(config, context.model, context.sde, rows)
  nfes: list[int] = []

  def draw(key: jax.Array) -> np.ndarray:
    samples, nfe = sampler(key, context.params)
    nfes.append(int(run_common.host_array(nfe)))
    return run_common.to_data_range(config, run_common.host_array(samples))

  directory = samples_directory(config, context.workdir, context.step)
  if jax.process_index() == 0 and not (directory / 'settings.json').is_file():
    directory.mkdir(parents=True, exist_ok=True)
    (directory / 'settings.json').write_text(json.dumps(
        sampler_settings(config, context.workdir), indent=2, sort_keys=True, default=str))
  logging.info('eval samples of step %d in %s', context.step, directory)
  key = jax.random.fold_in(context.key, SAMPLES_STREAM)
  paths = write_shards(draw, key, directory, num_samples, shard_size(config))
  kind = sample_kind(config)
  if kind == 'images':
    result = _image_metrics(config, paths)
  else:
    samples = np.concatenate(list(quality.iterate_shards(paths, num_samples)))
    if kind == 'toy':
      distribution = toy_data.make_toy(config.data.dataset.lower())
      reference = distribution.sample(config.seed + REFERENCE_STREAM, NUM_TOY_REFERENCE)
      result = quality.lowdim_sample_metrics(key, samples, reference, distribution.log_prob)
      result = {f'sample_{name}': value for name, value in result.items()}
    else:
      from scorejax import digits_classifier

      shard_labels = None if labels is None else np.resize(labels, len(samples))
      result = digits_classifier.load_evaluator().metrics(samples, shard_labels)
    result['num_samples'] = float(len(samples))
  result['sample_shards_drawn'] = len(nfes)
  if nfes:
    result['sample_nfe'] = float(np.mean(nfes))
  return result


def write_shards(draw, key: jax.Array, directory: pathlib.Path, num_samples: int,
                 rows_per_shard: int) -> list[pathlib.Path]:
  """`quality.write_sample_shards` on process 0; other processes draw the same shards.

  Every process must take part in each sharded sampling call, so processes other than
  0 follow process 0's count of finished shards and write nothing; after a barrier all
  read process 0's files (a shared filesystem, as for checkpoints).
  """
  if jax.process_count() == 1:
    return quality.write_sample_shards(draw, key, directory, num_samples)
  from jax.experimental import multihost_utils

  done = 0
  if jax.process_index() == 0 and directory.is_dir():
    done = len(quality.sample_shards(directory))
  done = int(multihost_utils.broadcast_one_to_all(np.int32(done)))
  if jax.process_index() == 0:
    quality.write_sample_shards(draw, key, directory, num_samples)
  else:
    for index in range(done, -(-num_samples // rows_per_shard)):
      draw(jax.random.fold_in(key, index))
  multihost_utils.sync_global_devices(f'eval samples {directory}')
  return quality.sample_shards(directory)


def _image_metrics(config, paths: list[pathlib.Path]) -> dict[str, float]:
  feature_fn = quality.make_inception_feature_fn(inception_path(config))
  stats_path = config.eval.fid_stats_path
  reference = quality.load_reference_stats(stats_path)
  reference_features = None
  with np.load(stats_path) as data:
    if 'pool_3' in data.files:
      reference_features = np.asarray(data['pool_3'], np.float64)
  return quality.compute_sample_metrics(
      quality.iterate_shards(paths, config.eval.batch_size), reference, feature_fn,
      reference_features=reference_features)
