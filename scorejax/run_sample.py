"""The sample driver: `run(config, workdir)` for `main.py --mode=sample`.

Restores the newest checkpoint of the workdir (or `sampling.checkpoint` /
`sampling.checkpoint_step`), with the EMA parameters unless `sampling.use_ema=False`,
and draws `sampling.num_samples` samples with the configured sampler (`sampling.method`
'pc', 'ode', 'fast', 'edm' or 'adaptive' and their options) in batches of
`sampling.batch_size` (rounded up to a multiple of the device count), each batch split over
all devices. Writes
`samples/samples_<step>.npz` (array `samples`: images NHWC float32 in [0, 1], 2-D data in
its own coordinates; `nfe`: score evaluations per batch) and `samples/samples_<step>.png`.
The same seed and checkpoint give the same samples. Checkpoints written by the
importers (`params` or `ema_params` only) work too. With `sampling.condition` ('inpaint',
'colorize') it completes test images instead (`scorejax.run_conditional`); with 'class' it
draws class-conditional samples (`scorejax.run_class_conditional`).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import tqdm
from absl import logging

from scorejax import checkpoints, run_class_conditional, run_common, run_conditional, run_train
from scorejax.models import make_model

SAMPLE_MODE_STREAM = 4  # fold_in constant of the sample-mode key (distinct from training's)


def checkpoint_source(config, workdir: pathlib.Path) -> pathlib.Path:
  """Where inference reads parameters: `sampling.checkpoint`, else the workdir."""
  return pathlib.Path(config.sampling.checkpoint) if config.sampling.checkpoint else workdir


def validate(config, workdir: str) -> None:
  """Fails before anything is written when the checkpoint to sample from is missing.

  Raises:
    FileNotFoundError: no such checkpoint (one line naming where it looked).
    ValueError: sampler settings the sampler rejects (`run_common.check_sampling`), or model
      settings other than the training run's (`run_common.check_trained_settings`).
  """
  run_common.check_sampling(config)
  if config.sampling.condition == 'class':
    run_class_conditional.check(config, pathlib.Path(workdir))
  elif config.sampling.condition:
    run_conditional.check_condition(config)
  run_common.check_trained_settings(config, checkpoint_source(config, pathlib.Path(workdir)))
  checkpoints.find_step_dir(checkpoint_source(config, pathlib.Path(workdir)),
                            config.sampling.checkpoint_step or None)


def restore_for_inference(config, workdir: pathlib.Path):
  """`(params, step)` of the checkpoint named by `sampling.checkpoint*` (or the newest)."""
  source = checkpoint_source(config, workdir)
  params, step = checkpoints.restore_params(
      source, config.sampling.checkpoint_step or None, use_ema=config.sampling.use_ema
  )
  logging.info('restored %s parameters of step %d from %s',
               'EMA' if config.sampling.use_ema else 'raw', step, source)
  return params, step


def run(config, workdir: str) -> dict:
  """Draws samples from a trained model; returns `{'path': npz path, 'nfe': [...]}`."""
  workdir = pathlib.Path(workdir)
  params, step = restore_for_inference(config, workdir)
  if config.sampling.condition == 'class':
    return run_class_conditional.run(config, workdir, params, step)
  if config.sampling.condition:
    return run_conditional.run(config, workdir, params, step)
  sde = run_common.make_sde(config)
  model = make_model(config)
  batch_size = run_common.sharded_batch_size(
      min(config.sampling.batch_size, config.sampling.num_samples))
  sample_fn = run_common.make_sharded_sampler(config, model, sde, batch_size)
  key = jax.random.fold_in(jax.random.key(config.seed), SAMPLE_MODE_STREAM)
  is_main = jax.process_index() == 0
  with tqdm.tqdm(total=config.sampling.num_samples, desc='sample', unit='img',
                 disable=not is_main, dynamic_ncols=True) as progress:
    samples, nfes = run_common.draw_samples(
        sample_fn, key, params, config.sampling.num_samples, batch_size, progress.update
    )
  data = run_common.to_data_range(config, samples)
  directory = workdir / 'samples'
  path = directory / f'samples_{step}.npz'
  if is_main:
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(path, samples=data.astype(np.float32), nfe=np.asarray(nfes), step=step)
    run_train.write_snapshot(config, directory, f'samples_{step}',
                             samples if run_common.is_toy(config) else samples[:256])
  logging.info('wrote %d samples to %s (NFE per batch: %s)', len(data), path, nfes)
  return {'path': str(path), 'nfe': nfes, 'step': step}
