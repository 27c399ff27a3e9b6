"""Class-conditional samples: `main.py --mode=sample --config.sampling.condition=class`.

An unconditional score model (`model.num_classes = 0`) is guided by the noise-conditional
classifier of `--mode=train_classifier` (`sampling.classifier`, default
`<workdir>/classifier`; its EMA parameters): its gradient, scaled by
`sampling.classifier_scale`, is added to the score. A class-conditional score model
(`model.num_classes > 0`, trained with `training.class_dropout`) needs no classifier: it is
guided classifier-free with weight `sampling.cfg_weight`. Either way the configured sampler
(`sampling.method` 'pc', 'ode', 'fast', 'edm' or 'adaptive') runs on the guided score
(`scorejax.classifier_guidance`), each batch split over all devices.
`sampling.class_label` picks the class; -1 draws classes 0, 1, ..., K-1 in turn. Writes
`samples/class_<step>.npz` (`samples` NHWC in [0, 1], `labels`, `nfe` per batch, `scale`:
the classifier scale or the classifier-free weight, `guidance`: 'classifier' or 'free') and
`samples/class_<step>.png` (one row per class). On the digits it also reports how often the
packaged digits classifier (the digits-FID network) reads the requested class (`accuracy`),
with the digits-FID of the samples. The same seed and checkpoints give the same samples.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from scorejax import (
    checkpoints,
    classifier_guidance,
    distributed,
    images,
    run_classifier,
    run_common,
)
from scorejax.models import make_model

CLASS_STREAM = 6  # fold_in constant of the key (distinct from the other sampling modes')


def classifier_dir(config, workdir: pathlib.Path) -> pathlib.Path:
  """`sampling.classifier`, else `<workdir>/classifier`."""
  path = config.sampling.classifier
  return pathlib.Path(path) if path else pathlib.Path(workdir) / run_classifier.CLASSIFIER_DIR


def check(config, workdir: pathlib.Path) -> dict:
  """Fails on settings class-conditional sampling cannot run; returns the classifier's
  definition (`{'num_classes': K}` for a class-conditional model).

  Raises:
    ValueError: one line naming the field (and the valid values).
    FileNotFoundError: no classifier (the message says how to train one).
  """
  s = config.sampling
  if run_common.is_toy(config):
    raise ValueError(f'sampling.condition=class needs labelled images; data.dataset='
                     f'{config.data.dataset} is 2-D')
  if not (s.classifier_scale >= 0 and math.isfinite(s.classifier_scale)):
    raise ValueError(f'sampling.classifier_scale must be finite and >= 0, got '
                     f'{s.classifier_scale}')
  if run_common.is_class_conditional(config):
    if not (s.cfg_weight >= 0 and math.isfinite(s.cfg_weight)):
      raise ValueError(f'sampling.cfg_weight must be finite and >= 0, got {s.cfg_weight}')
    num_classes = config.model.num_classes
    _check_label(s.class_label, num_classes,
                 f'the model (model.num_classes={num_classes})')
    return {'num_classes': num_classes}
  directory = classifier_dir(config, workdir)
  saved = run_classifier.read_definition(directory)
  checkpoints.find_step_dir(directory)
  _check_label(s.class_label, saved['num_classes'], f'the classifier in {directory}')
  trained = _provenance(saved)
  here = _provenance(run_classifier.definition(config, saved['num_classes']))
  differ = [k for k in trained if trained[k] != here.get(k)]
  if differ:
    fields = ', '.join(f'{k}={trained[k]!r} (here {here.get(k)!r})' for k in differ)
    raise ValueError(f'the classifier in {directory} was trained on other data or noise: '
                     f'{fields}')
  return saved


def _check_label(label: int, num_classes: int, owner: str) -> None:
  if not -1 <= label < num_classes:
    raise ValueError(f'sampling.class_label={label} is not a class of {owner}: valid choices '
                     f'are 0..{num_classes - 1}, or -1 for all')


def _provenance(definition: dict) -> dict:
  """The `data.*` and SDE settings of a classifier definition, by config field name (a
  definition written before the SDE was recorded has only the data ones)."""
  settings = {f'data.{k}': v for k, v in definition['data'].items() if k != 'dataset'}
  settings.update(definition.get('sde', {}))
  return settings


def sample_labels(num_classes: int, count: int, class_label: int) -> np.ndarray:
  """`count` labels: all `class_label`, or for -1 the classes 0, 1, ..., K-1 in turn."""
  if class_label >= 0:
    return np.full((count,), class_label, np.int32)
  return (np.arange(count) % num_classes).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class ClassSampler:
  """The guided sampler of `sampling.*`, compiled for batches of `batch_size` rows.

  `sampler(key, params, labels [n <= batch_size]) -> (samples [batch_size, ...] split over
  the devices, nfe)`: rows past `n` repeat the last label and are to be dropped.
  """

  sample_fn: Callable[[jax.Array, dict], tuple[jax.Array, jax.Array]]
  classifier_params: Any
  num_classes: int
  guidance: str  # 'classifier' or 'free'
  scale: float  # the classifier scale or the classifier-free weight
  batch_size: int

  def __call__(self, key: jax.Array, params, labels: np.ndarray):
    labels = np.asarray(labels, np.int32)
    padded = np.concatenate([labels, np.repeat(labels[-1:], self.batch_size - len(labels))])
    bundle = {'score': params, 'classifier': self.classifier_params, 'labels': padded}
    return self.sample_fn(key, bundle)


def make_class_sampler(config, workdir: pathlib.Path, model, sde, batch_size: int,
                       mesh=None) -> ClassSampler:
  """The class-conditional sampler of `config` (`check` first), guided by the workdir's
  classifier, or classifier-free for a class-conditional model."""
  s = config.sampling
  saved = check(config, workdir)
  mesh = mesh or distributed.make_mesh()
  if run_common.is_class_conditional(config):
    guidance, scale, classifier_params = 'free', float(s.cfg_weight), None
    class_builder = run_common.class_score_fn_builder(config, model, sde)
    logging.info('classifier-free guidance, weight %g (%d classes)', scale,
                 saved['num_classes'])

    def guided_builder(bundle):
      return classifier_guidance.classifier_free_score_fn(
          class_builder(bundle['score']), bundle['labels'], saved['num_classes'], scale)
  else:
    guidance, scale = 'classifier', float(s.classifier_scale)
    directory = classifier_dir(config, workdir)
    classifier_params, classifier_step = checkpoints.restore_params(directory, use_ema=True)
    logging.info('classifier of step %d from %s (%d classes), scale %g', classifier_step,
                 directory, saved['num_classes'], scale)
    score_builder = run_common.score_fn_builder(config, model, sde)
    logits_builder = run_classifier.logits_fn_builder(run_classifier.make_classifier(saved),
                                                      sde)

    def guided_builder(bundle):
      return classifier_guidance.guided_score_fn(
          score_builder(bundle['score']), logits_builder(bundle['classifier']),
          bundle['labels'], scale)

  sampler = run_common.make_sampler(
      config, model, sde, (batch_size, *run_common.element_shape(config)),
      builder=distributed.batch_sharded_score_builder(guided_builder, mesh))
  replicated = distributed.replicated_sharding(mesh)
  sample_fn = jax.jit(sampler, in_shardings=(replicated, replicated),
                      out_shardings=(distributed.batch_sharding(mesh), replicated))
  return ClassSampler(sample_fn, classifier_params, saved['num_classes'], guidance, scale,
                      batch_size)


def run(config, workdir: pathlib.Path, params, step: int) -> dict:
  """Draws class-conditional samples with the restored score `params`; returns
  `{'path', 'nfe', 'step'}` and, on the digits, the evaluator's `accuracy` and
  `digits_fid`."""
  s = config.sampling
  mesh = distributed.make_mesh()
  batch_size = run_common.sharded_batch_size(min(s.batch_size, s.num_samples), mesh)
  sampler = make_class_sampler(config, workdir, make_model(config), run_common.make_sde(config),
                               batch_size, mesh)
  guidance, scale = sampler.guidance, sampler.scale
  labels = sample_labels(sampler.num_classes, s.num_samples, s.class_label)
  key = jax.random.fold_in(jax.random.key(config.seed), CLASS_STREAM)
  chunks, nfes = [], []
  with tqdm.tqdm(total=len(labels), desc='class', unit='img',
                 disable=jax.process_index() != 0, dynamic_ncols=True) as progress:
    for index, start in enumerate(range(0, len(labels), batch_size)):
      part = labels[start:start + batch_size]
      samples, nfe = sampler(jax.random.fold_in(key, index), params, part)
      chunks.append(run_common.host_array(samples)[:len(part)])
      nfes.append(int(run_common.host_array(nfe)))
      progress.update(len(part))
  samples = run_common.to_data_range(config, np.concatenate(chunks)).astype(np.float32)
  result = {'path': '', 'nfe': nfes, 'step': step}
  if config.data.dataset.lower() == 'digits':
    from scorejax import digits_classifier

    measured = digits_classifier.load_evaluator().metrics(samples, labels)
    result.update(accuracy=measured['accuracy'], digits_fid=measured['digits_fid'])
  out = pathlib.Path(workdir) / 'samples'
  path = out / f'class_{step}.npz'
  result['path'] = str(path)
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    np.savez(path, samples=samples, labels=labels, nfe=np.asarray(nfes), step=step,
             scale=scale, guidance=guidance,
             **{k: result[k] for k in ('accuracy', 'digits_fid') if k in result})
    _save_grid(out / f'class_{step}.png', samples, labels)
  logging.info('wrote %d class-conditional samples to %s (NFE per batch: %s)%s', len(samples),
               path, nfes, ''.join(f', {k}={result[k]:.4g}' for k in ('accuracy', 'digits_fid')
                                   if k in result))
  if 'accuracy' in result:
    logging.info('class metrics: %s', json.dumps({k: round(result[k], 4)
                                                  for k in ('accuracy', 'digits_fid')}))
  return result


def _save_grid(path: pathlib.Path, samples: np.ndarray, labels: np.ndarray) -> None:
  """One row per class (up to 16 samples each), classes in increasing order."""
  classes = np.unique(labels)
  per_row = min(16, max(int(np.sum(labels == k)) for k in classes))
  rows = []
  for k in classes:
    chosen = samples[labels == k][:per_row]
    blank = np.zeros((per_row - len(chosen), *samples.shape[1:]), samples.dtype)
    rows.append(np.concatenate([chosen, blank]))
  images.save_image_grid(path, np.concatenate(rows), nrow=per_row,
                         scale=max(1, 64 // samples.shape[1]))
