"""The classifier driver: `run(config, workdir)` for `main.py --mode=train_classifier`.

Trains the noise-conditional classifier `p_t(y | x)` that class-conditional sampling
(`--mode=sample --config.sampling.condition=class`, `scorejax.run_class_conditional`) adds to
the score model: `scorejax.classifier_guidance.classifier_loss` on the labelled training
split with the data settings (`data.*`) and forward SDE (`training.sde`, `model.*` noise
settings) of the score model, and the network and optimizer of `classifier.*`. Data
parallel over every device and process as training is (`train.make_train_step`: replicated
state, batch split over the mesh, an EMA of the parameters); SIGTERM saves a checkpoint, and
a rerun resumes from the newest one.

Writes under `<workdir>/classifier/` (process 0): `checkpoints/`, `metrics.jsonl` and
TensorBoard events, `config.json` (what defines the classifier: `classifier.*`, the number
of classes, the data shape and scaling; sampling rebuilds the network from it) and
`accuracy.json` (test accuracy and cross-entropy of the EMA parameters at several times).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from scorejax import classifier_guidance, distributed, run_common, run_train
from scorejax.checkpoints import Checkpointer
from scorejax.logging_utils import MetricWriter
from scorejax.models.classifier import NoiseConditionalClassifier
from scorejax.train import make_train_step
from scorejax.train_state import create_train_state, make_optimizer

CLASSIFIER_DIR = 'classifier'
# Key streams (fold_in constants, distinct from the score model's).
INIT_STREAM, TRAIN_STREAM, EVAL_STREAM = 10, 11, 12
# Times of the accuracy table, as fractions of T (0 stands for classifier.eps; 1e-3 is the
# samplers' default last time).
EVAL_FRACTIONS = (0.0, 1e-3, 0.1, 0.25, 0.5, 0.75, 1.0)
_NETWORK_FIELDS = ('channels', 'num_res_blocks', 'embedding_dim', 'fourier_scale')


def definition(config, num_classes: int) -> dict[str, Any]:
  """What a classifier checkpoint means: network fields, classes, data shape and scaling,
  and the forward SDE whose noised data it learned (the same noise level means different
  inputs under different SDEs: VP scales the data down, VE does not)."""
  c = config.classifier
  data = config.data
  sde = config.training.sde.lower()
  noise_fields = {'vesde': ('sigma_min', 'sigma_max'), 'vpsde': ('beta_min', 'beta_max'),
                  'subvpsde': ('beta_min', 'beta_max'),
                  'cosinevpsde': ('cosine_s', 'logsnr_min')}.get(sde, ())
  return {
      'num_classes': int(num_classes),
      'network': {k: list(c[k]) if k == 'channels' else c[k] for k in _NETWORK_FIELDS},
      'data': {'dataset': data.dataset.lower(), 'image_size': data.image_size,
               'num_channels': data.num_channels, 'centered': data.centered},
      'sde': {'training.sde': sde, **{f'model.{k}': config.model[k] for k in noise_fields}},
  }


def make_classifier(saved: dict[str, Any]) -> NoiseConditionalClassifier:
  """The network of a `definition`."""
  network = saved['network']
  return NoiseConditionalClassifier(
      num_classes=int(saved['num_classes']), channels=tuple(int(c) for c in network['channels']),
      num_res_blocks=int(network['num_res_blocks']),
      embedding_dim=int(network['embedding_dim']), fourier_scale=float(network['fourier_scale']))


def logits_fn_builder(classifier: NoiseConditionalClassifier, sde):
  """`params -> logits_fn(x, t)`."""
  return lambda params: classifier_guidance.make_logits_fn(
      lambda x, level: classifier.apply({'params': params}, x, level), sde)


def read_definition(directory: pathlib.Path) -> dict[str, Any]:
  """The `config.json` of a classifier directory.

  Raises:
    FileNotFoundError: no classifier there (one line saying how to train one).
  """
  path = directory / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(f'no classifier in {directory} (no config.json): train one with '
                            f'--mode=train_classifier, or set sampling.classifier')
  return json.loads(path.read_text())


def _check_settings(config) -> None:
  c = config.classifier
  positive = ('n_iters', 'batch_size', 'log_freq', 'snapshot_freq')
  for name in positive:
    if c[name] < 1:
      raise ValueError(f'classifier.{name} must be >= 1, got {c[name]}')
  if not c.lr > 0:
    raise ValueError(f'classifier.lr must be > 0, got {c.lr}')
  if not 0.0 <= c.ema_rate < 1.0:
    raise ValueError(f'classifier.ema_rate must be in [0, 1), got {c.ema_rate}')
  if not c.channels or min(c.channels) < 1 or c.num_res_blocks < 1:
    raise ValueError(f'classifier.channels must be positive widths and classifier.'
                     f'num_res_blocks >= 1, got {tuple(c.channels)} and {c.num_res_blocks}')
  if c.eval_num_batches < 0:
    raise ValueError(f'classifier.eval_num_batches must be >= 0, got {c.eval_num_batches}')
  sde = run_common.make_sde(config)
  if not 0.0 < c.eps < sde.T:
    raise ValueError(f'classifier.eps must be in (0, T={sde.T}), got {c.eps}')
  if run_common.is_toy(config):
    raise ValueError(f'--mode=train_classifier needs labelled images; data.dataset='
                     f'{config.data.dataset} is 2-D')
  devices = jax.device_count()
  if c.batch_size % devices:
    raise ValueError(f'classifier.batch_size={c.batch_size} must be divisible by the number '
                     f'of devices ({devices})')


def validate(config, workdir: str) -> None:
  """Fails before anything is written on bad settings, unlabelled or unprepared data, or a
  classifier in the workdir trained under other settings.

  Raises:
    ValueError: one line naming the field.
    DatasetNotPreparedError: the data is not available locally.
  """
  _check_settings(config)
  data = run_common.make_data(config, 'train', config.classifier.batch_size, with_labels=True)
  run_common.make_data(config, 'test', config.classifier.batch_size, with_labels=True)
  directory = pathlib.Path(workdir) / CLASSIFIER_DIR
  if (directory / 'config.json').is_file():
    saved, current = read_definition(directory), definition(config, data.num_classes)
    if saved != current:
      raise ValueError(f'the classifier in {directory} was trained with {saved}, here '
                       f'{current}: resume with its settings or use another workdir')


def run(config, workdir: str) -> dict:
  """Trains (or resumes) the classifier; returns `{'step', 'status', 'accuracy': {t: value}}`.

  SIGTERM saves a checkpoint after the current step and returns with status 'preempted'
  (no accuracy table); a rerun resumes there, and training to the end gives the same
  parameters as an uninterrupted run.
  """
  c = config.classifier
  directory = pathlib.Path(workdir) / CLASSIFIER_DIR
  is_main = jax.process_index() == 0
  mesh = distributed.make_mesh()
  replicated = distributed.replicated_sharding(mesh)
  stacked_batch = distributed.batch_sharding(mesh, leading_axes=1)
  sde = run_common.make_sde(config)
  train_data = run_common.make_data(config, 'train', c.batch_size, with_labels=True)
  saved = definition(config, train_data.num_classes)
  classifier = make_classifier(saved)
  logits_fn = logits_fn_builder(classifier, sde)
  optimizer = make_optimizer('AdamW' if c.weight_decay else 'Adam', lr=c.lr,
                             weight_decay=c.weight_decay)
  key = jax.random.key(config.seed)

  def init(k):
    x = jnp.zeros((1, *train_data.element_shape), jnp.float32)
    params = classifier.init(k, x, jnp.zeros((1,), jnp.float32))['params']
    return create_train_state(params, optimizer)

  state = jax.jit(init, out_shardings=replicated)(jax.random.fold_in(key, INIT_STREAM))
  logging.info('classifier: %d parameters, %d classes',
               sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
               saved['num_classes'])
  checkpointer = Checkpointer(directory, max_to_keep=2)
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, _, restored_step = restored
    logging.info('classifier: resumed from step %d', restored_step)
  step = int(run_common.host_array(state.step))
  if is_main:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / 'config.json').write_text(json.dumps(saved, indent=2))

  def loss_fn(key, params, batch):
    return classifier_guidance.classifier_loss(key, logits_fn(params), sde, batch['image'],
                                               batch['label'], eps=c.eps)

  train_step = jax.jit(make_train_step(loss_fn, optimizer, ema_rate=c.ema_rate),
                       in_shardings=(replicated, stacked_batch, replicated),
                       out_shardings=(replicated, replicated), donate_argnums=0)
  train_key = jax.random.fold_in(key, TRAIN_STREAM)
  writer = MetricWriter(directory)
  iterator = train_data.iterator(start_step=step)
  pending: list[dict] = []
  progress = tqdm.tqdm(total=c.n_iters, initial=step, disable=not is_main, desc='classifier',
                       dynamic_ncols=True)
  preemption = run_train.Preemption()
  status = 'done'
  try:
    while step < c.n_iters:
      batch = distributed.global_batch({k: v[None] for k, v in next(iterator).items()},
                                       stacked_batch, batch_axis=1)
      if pending:  # one step in flight at a time, as in run_train (CPU all-reduce queues)
        jax.block_until_ready(pending[-1]['loss'])
      state, metrics = train_step(state, batch, train_key)
      pending.append(metrics)
      step += 1
      progress.update(1)
      if step % c.log_freq == 0 or step == c.n_iters:
        fetched = run_common.host_tree(pending)
        pending.clear()
        if not all(bool(np.all(m['finite'])) for m in fetched):
          raise run_train.TrainingError(
              f'classifier: non-finite loss or gradient before step {step}; the newest '
              'checkpoint is the last good state')
        scalars = {k: float(np.mean([np.mean(m[k]) for m in fetched]))
                   for k in ('loss', 'accuracy', 'grad_norm')}
        writer.write_scalars(step, scalars)
        progress.set_postfix(loss=f"{scalars['loss']:.3f}", acc=f"{scalars['accuracy']:.3f}",
                             refresh=False)
      requested = preemption.requested
      if step % c.snapshot_freq == 0 or step == c.n_iters:
        checkpointer.save(step, state, {'step': step})
      elif requested:
        logging.warning('SIGTERM received: saving the classifier at step %d', step)
        checkpointer.save(step, state, {'step': step}, preemption=True)
      if requested:
        status = 'preempted'
        break
  finally:
    preemption.restore()
    progress.close()
    checkpointer.wait()
    writer.close()
  if status == 'preempted':
    return {'step': step, 'status': status}
  accuracy = evaluate(config, classifier, sde, state.ema_params, mesh)
  if is_main:
    (directory / 'accuracy.json').write_text(json.dumps({'step': step, **accuracy}, indent=2))
  logging.info('classifier step %d, test accuracy by time: %s', step,
               {t: round(float(v['accuracy']), 4) for t, v in accuracy.items()})
  return {'step': step, 'status': status,
          'accuracy': {t: v['accuracy'] for t, v in accuracy.items()}}


def evaluate(config, classifier, sde, params, mesh) -> dict[str, dict[str, float]]:
  """Test accuracy and cross-entropy at the times `EVAL_FRACTIONS * T` (the first: eps).

  Every test image is noised once per time with the same noise, from `EVAL_STREAM`.
  """
  c = config.classifier
  flat = distributed.batch_sharding(mesh)
  data = run_common.make_data(config, 'test', c.batch_size, with_labels=True, num_epochs=1,
                              shuffle=False, uniform_dequantization=False)
  logits_fn = logits_fn_builder(classifier, sde)

  @jax.jit
  def totals(params, batch, key, time):
    t = jnp.full((batch['image'].shape[0],), time, jnp.float32)
    z = jax.random.normal(key, batch['image'].shape)
    nll, correct = classifier_guidance.classifier_losses(logits_fn(params), sde, batch['image'],
                                                         batch['label'], t, z)
    return jnp.sum(nll), jnp.sum(correct)

  num_batches = data.num_steps if not c.eval_num_batches else min(c.eval_num_batches,
                                                                  data.num_steps)
  times = sorted({max(f * sde.T, c.eps) for f in EVAL_FRACTIONS})
  sums = np.zeros((len(times), 2))
  key = jax.random.fold_in(jax.random.key(config.seed), EVAL_STREAM)
  for index in range(num_batches):
    batch = distributed.global_batch(data.batch_at(index), flat)
    for j, time in enumerate(times):
      values = totals(params, batch, jax.random.fold_in(key, index), time)
      sums[j] += [float(run_common.host_array(v)) for v in values]
  count = num_batches * c.batch_size
  return {f'{time:.4g}': {'accuracy': float(sums[j, 1] / count),
                          'cross_entropy': float(sums[j, 0] / count)}
          for j, time in enumerate(times)}
