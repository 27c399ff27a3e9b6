"""The train driver: `run(config, workdir)` for `main.py --mode=train`.

Data parallel over every device of every process: the `TrainState` is replicated and
each batch is split along the `('data',)` mesh axis, in one jitted, state-donating step
(`train.make_train_step`, `training.n_jitted_steps` updates per call; each update over
`training.grad_accum_steps` micro-batches when the batch does not fit in memory at once).
Each process reads its own rows of every global batch (`datasets.make_dataset`).

Resumable and deterministic: update `s` uses the key `fold_in(key, s)` and the batch
`batch_at(s)` (a function of seed and step), and the data position is saved with every
checkpoint, so a run killed at any moment (even SIGKILL) and rerun with the same workdir
ends with bit-identical parameters to an uninterrupted run. SIGTERM saves a preemption
checkpoint before exiting. A non-finite loss stops training (exit status 1) without
saving, so the newest checkpoint is the last good one.

Writes (process 0 only): `metrics.jsonl` and TensorBoard events (`tb/`), `checkpoints/`,
`checkpoints-meta/`, `samples/step_<N>.png` sample grids (2-D data: samples over the true
density and the learned score field), `loss.png`.
"""

from __future__ import annotations

import pathlib
import signal
import time
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from scorejax import checkpoints, checks, convert, distributed, images, run_common, toy_data
from scorejax.checkpoints import Checkpointer
from scorejax.logging_utils import MetricWriter, read_jsonl
from scorejax.models import make_model
from scorejax.train import make_eval_step, make_train_step
from scorejax.train_state import create_train_state, make_lr_schedule, make_optimizer

# Key streams derived from the seed (fold_in constants, never reused for anything else).
INIT_STREAM, TRAIN_STREAM, SAMPLE_STREAM, EVAL_STREAM = 0, 1, 2, 3


class TrainingError(RuntimeError):
  """Training stopped on an unrecoverable condition (e.g. a non-finite loss)."""


def _check_frequencies(training) -> None:
  n = training.n_jitted_steps
  if n < 1:
    raise ValueError(f'training.n_jitted_steps={n} must be >= 1')
  for name in ('log_freq', 'eval_freq', 'snapshot_freq', 'snapshot_freq_for_preemption'):
    value = getattr(training, name)
    if value <= 0 or value % n:
      raise ValueError(
          f'training.{name}={value} must be a positive multiple of '
          f'training.n_jitted_steps={n}'
      )


def _check_accumulation(training) -> None:
  """`training.grad_accum_steps` must split the batch into equal shares on every device."""
  k = training.grad_accum_steps
  checks.check_count('training.grad_accum_steps', k)
  devices = jax.device_count()
  if training.batch_size % (k * devices):
    raise ValueError(
        f'training.batch_size={training.batch_size} must be divisible by '
        f'training.grad_accum_steps={k} times the number of devices ({devices}): every '
        f'micro-batch is split evenly over the devices'
    )


def _check_fits(expected, tree, what: str) -> None:
  """Raises unless `tree` has the names and shapes of `expected` (the model's parameters)."""
  missing, extra, wrong = convert.mismatched_params(tree, expected)
  if not (missing or extra or wrong):
    return
  parts = [f'{len(missing)} missing (e.g. {missing[0]})' if missing else '',
           f'{len(extra)} not in this model (e.g. {extra[0]})' if extra else '',
           f'{len(wrong)} of another shape (e.g. {wrong[0][0]}: {wrong[0][1]} there, '
           f'{wrong[0][2]} here)' if wrong else '']
  raise ValueError(f'{what} do not fit this model (set config.model and config.data as in '
                   f'the run that wrote them): ' + ', '.join(p for p in parts if p))


def initial_weights(config) -> tuple[Any, Any, int]:
  """`(params, ema_params, step)` of `training.init_from` (a workdir, `checkpoints` directory
  or step directory: another run's, or one written by `scripts/convert_checkpoint.py`),
  checked against this config's model.

  Raises:
    FileNotFoundError: no checkpoint there.
    ValueError: the source was trained with other model settings (its `config.json`), or
      its parameters' names or shapes are not this model's.
  """
  source = config.training.init_from
  try:
    run_common.check_trained_settings(config, source)
  except ValueError as error:
    raise ValueError(f'training.init_from: {error}') from None
  params, ema_params, step = checkpoints.restore_weights(source)
  expected, _ = convert.abstract_params(config, run_common.element_shape(config))
  _check_fits(expected, params, f'training.init_from={source}: the parameters of step {step}')
  _check_fits(expected, ema_params, f'training.init_from={source}: the EMA of step {step}')
  return params, ema_params, step


def _crossed(previous: int, current: int, freq: int) -> bool:
  return current // freq > previous // freq


class Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _stack(batches: list[dict]) -> dict:
  return {name: np.stack([b[name] for b in batches]) for name in batches[0]}


def make_optimizer_from_config(config):
  o = config.optim
  optimizer = make_optimizer(
      o.optimizer, lr=o.lr, beta1=o.beta1, eps=o.eps, warmup=o.warmup, grad_clip=o.grad_clip,
      weight_decay=o.weight_decay,
  )
  return optimizer, make_lr_schedule(o.lr, o.warmup)


def write_snapshot(config, directory: pathlib.Path, name: str, samples: np.ndarray,
                   score_fn=None) -> None:
  """Writes `<directory>/<name>.png` of model-range samples (process 0).

  Images: a grid. 2-D data: the samples over the true density, and, with `score_fn`
  (`x [N, 2] -> score [N, 2]`), `score_<name>.png`, the score field as arrows.
  """
  if jax.process_index() != 0:
    return
  directory.mkdir(parents=True, exist_ok=True)
  data = run_common.to_data_range(config, samples)
  if run_common.is_toy(config):
    bound = 4.5
    bounds = (-bound, bound, -bound, bound)
    distribution = toy_data.make_toy(config.data.dataset.lower())
    _, _, logp = toy_data.log_prob_grid(distribution, bound=bound, resolution=200)
    logp = logp[::-1]  # row 0 at the top of the picture
    images.scatter_plot(directory / f'{name}.png', data, bounds, logp)
    if score_fn is not None:
      points = images.grid_points(bounds, 24)
      score = np.asarray(score_fn(points))
      images.vector_field_plot(directory / f'score_{name}.png', points, score, bounds, logp)
  else:
    images.save_image_grid(directory / f'{name}.png', data, scale=max(1, 64 // data.shape[1]))


def write_loss_curve(workdir: pathlib.Path) -> None:
  """`workdir/loss.png` from `metrics.jsonl` (process 0)."""
  path = workdir / 'metrics.jsonl'
  if jax.process_index() != 0 or not path.exists():
    return
  records = [r for r in read_jsonl(path) if 'loss' in r]
  if len(records) >= 2:
    images.line_plot(workdir / 'loss.png', [r['step'] for r in records],
                     [r['loss'] for r in records], log_y=True)


def validate(config, workdir: str) -> None:
  """Fails before anything is written on bad frequencies or data that is not prepared.

  Raises:
    ValueError: inconsistent frequencies or batch size, bad SDE or snapshot-sampler settings,
      or (resuming) model settings other than the checkpoint's.
    DatasetNotPreparedError: the data is not available locally (says how to prepare it).
  """
  _check_frequencies(config.training)
  distributed.process_batch_slice(config.training.batch_size)
  _check_accumulation(config.training)
  sde = run_common.make_sde(config)
  try:  # resuming: the checkpoint must keep its meaning
    checkpoints.find_step_dir(workdir)
  except FileNotFoundError:
    if config.training.init_from:  # a new run started from other weights
      initial_weights(config)
  else:
    run_common.check_trained_settings(config, workdir)
  try:  # the objective's own checks; the model is only needed when the loss is called
    run_common.make_loss_fn(config, None, sde)
  except ValueError as error:
    raise ValueError(f'training settings: {error}') from None
  if config.training.snapshot_sampling:
    run_common.check_sampling(config)
  run_common.check_class_labels(config)
  for split in ('train', 'test'):
    run_common.make_data(config, split, config.training.batch_size)


def run(config, workdir: str) -> dict:
  """Trains (or resumes) the model of `config` in `workdir`.

  Returns:
    A summary: `{'step': final step, 'status': 'done' | 'preempted'}`.

  Raises:
    TrainingError: on a non-finite loss (nothing is saved for that step).
    ValueError: for inconsistent frequencies or batch sizes.
  """
  workdir = pathlib.Path(workdir)
  training = config.training
  _check_frequencies(training)
  is_main = jax.process_index() == 0
  mesh = distributed.make_mesh()
  replicated = distributed.replicated_sharding(mesh)
  stacked_batch = distributed.batch_sharding(mesh, leading_axes=1)
  flat_batch = distributed.batch_sharding(mesh)
  distributed.process_batch_slice(training.batch_size)  # checks divisibility
  _check_accumulation(training)

  key = jax.random.key(config.seed)
  train_key = jax.random.fold_in(key, TRAIN_STREAM)
  sde = run_common.make_sde(config)
  train_data = run_common.make_data(config, 'train', training.batch_size)
  model = make_model(config)
  optimizer, schedule = make_optimizer_from_config(config)
  # Created inside jit with replicated outputs: valid global arrays on every host.
  state = jax.jit(
      lambda k: create_train_state(
          run_common.init_params(model, k, train_data.element_shape), optimizer),
      out_shardings=replicated,
  )(jax.random.fold_in(key, INIT_STREAM))
  logging.info('model %s: %d parameters', config.model.name,
               sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)))

  checkpointer = Checkpointer(workdir, max_to_keep=training.max_to_keep or None)
  data_state = {'step': 0}
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, meta, ckpt_step = restored
    data_state = meta.get('data', {'step': ckpt_step})
    logging.info('resumed from checkpoint at step %d%s', ckpt_step,
                 ' (training.init_from is read only by a new run)' if training.init_from else '')
  elif training.init_from:
    params, ema_params, source_step = initial_weights(config)
    state = jax.jit(
        lambda p, e: create_train_state(p, optimizer).replace(ema_params=e),
        out_shardings=replicated)(params, ema_params)
    logging.info('parameters and EMA from %s (step %d); optimizer state fresh, step 0',
                 training.init_from, source_step)
  step = int(run_common.host_array(state.step))
  if data_state['step'] != step:
    raise TrainingError(f'checkpoint data position {data_state} does not match step {step}')

  loss_fn = run_common.make_loss_fn(config, model, sde)
  train_step = jax.jit(
      make_train_step(loss_fn, optimizer, ema_rate=config.model.ema_rate, lr_schedule=schedule,
                      accum_steps=training.grad_accum_steps),
      in_shardings=(replicated, stacked_batch, replicated),
      out_shardings=(replicated, replicated),
      donate_argnums=0,
  )
  eval_loss_fn = run_common.make_loss_fn(config, model, sde, train=False)
  eval_step = jax.jit(make_eval_step(eval_loss_fn, training.grad_accum_steps),
                      in_shardings=(replicated, flat_batch, replicated), out_shardings=replicated)
  eval_data = run_common.make_data(config, 'test', training.batch_size)
  snapshot_count = config.sampling.num_samples
  if not run_common.is_toy(config):
    snapshot_count = min(snapshot_count, 64)
  sampler = None
  if training.snapshot_sampling:
    sampler = run_common.make_sharded_sampler(
        config, model, sde, run_common.sharded_batch_size(snapshot_count, mesh), mesh)
  score_builder = run_common.score_fn_builder(config, model, sde)

  writer = MetricWriter(workdir)
  preemption = Preemption()
  iterator = train_data.iterator(start_step=data_state['step'])
  progress = tqdm.tqdm(total=training.n_iters, initial=step, disable=not is_main,
                       desc='train', dynamic_ncols=True)
  pending: list[dict] = []
  last_saved = step
  timer = (time.perf_counter(), step)
  status = 'done'

  def flush_metrics() -> None:
    """Fetches pending metrics; stops on a non-finite loss; logs averages."""
    nonlocal timer
    if not pending:
      return
    fetched = run_common.host_tree(pending)
    pending.clear()
    merged = {k: np.concatenate([np.atleast_1d(m[k]) for m in fetched]) for k in fetched[0]}
    if not merged['finite'].all():
      bad = step - len(merged['finite']) + int(np.argmin(merged['finite'])) + 1
      progress.close()
      writer.close()
      checkpointer.wait()
      raise TrainingError(
          f'non-finite loss or gradient at step {bad}: stopping without saving; the newest '
          f'checkpoint (step {last_saved}) is the last good state'
      )
    now = time.perf_counter()
    steps_per_sec = (step - timer[1]) / max(now - timer[0], 1e-9)
    timer = (now, step)
    scalars = {k: float(np.mean(v)) for k, v in merged.items() if k != 'finite'}
    scalars['steps_per_sec'] = steps_per_sec
    scalars['images_per_sec'] = steps_per_sec * training.batch_size
    writer.write_scalars(step, scalars)
    progress.set_postfix(loss=f"{scalars['loss']:.4g}", refresh=False)

  def save(preempt: bool) -> None:
    nonlocal last_saved
    flush_metrics()
    meta = {'step': step, 'data': iterator.get_state(), 'seed': config.seed,
            'dataset': config.data.dataset}
    checkpointer.save(step, state, meta, preemption=preempt)
    last_saved = step

  try:
    while step < training.n_iters:
      n = min(training.n_jitted_steps, training.n_iters - step)
      batch = distributed.global_batch(_stack([next(iterator) for _ in range(n)]),
                                       stacked_batch, batch_axis=1)
      if pending:
        # One step in flight at a time: the next batch was read while the last step ran,
        # and the CPU backend's cross-device all-reduces were seen to deadlock with
        # hundreds of queued steps (XLA rendezvous timeout).
        jax.block_until_ready(pending[-1]['loss'])
      state, metrics = train_step(state, batch, train_key)
      pending.append(metrics)
      previous, step = step, step + n
      progress.update(n)
      if _crossed(previous, step, training.log_freq) or step == training.n_iters:
        flush_metrics()
      if _crossed(previous, step, training.eval_freq):
        test = eval_data.batch_at(step // training.eval_freq)
        eval_loss = eval_step(state.ema_params, distributed.global_batch(test, flat_batch),
                              jax.random.fold_in(jax.random.fold_in(key, EVAL_STREAM), step))
        writer.write_scalars(step, {'eval_loss': float(run_common.host_array(eval_loss))})
      snapshot = _crossed(previous, step, training.snapshot_freq) or step == training.n_iters
      if snapshot:
        save(preempt=False)
        if sampler is not None:
          samples, _ = sampler(jax.random.fold_in(jax.random.fold_in(key, SAMPLE_STREAM), step),
                               state.ema_params)
          ema = run_common.host_tree(state.ema_params)
          score_fn = None
          if run_common.is_toy(config):
            t_small = max(config.sampling.eps, 0.01)
            score = score_builder(ema)
            score_fn = lambda x, s=score, t=t_small: s(x, np.full((len(x),), t, np.float32))
          samples = run_common.host_array(samples)[:snapshot_count]
          write_snapshot(config, workdir / 'samples', f'step_{step}', samples, score_fn)
          if not run_common.is_toy(config):
            writer.write_image(step, 'samples',
                               images.image_grid(run_common.to_data_range(config, samples)))
      elif _crossed(previous, step, training.snapshot_freq_for_preemption):
        save(preempt=True)
      if preemption.requested:
        logging.warning('SIGTERM received: saving a preemption checkpoint at step %d', step)
        save(preempt=True)
        status = 'preempted'
        break
    flush_metrics()
  finally:
    preemption.restore()
    progress.close()
    checkpointer.wait()
    writer.close()
  write_loss_curve(workdir)
  logging.info('training %s at step %d', status, step)
  return {'step': step, 'status': status}
