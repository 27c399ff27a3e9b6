"""Inpainting and colorization of test images: `main.py --mode=sample` with
`sampling.condition='inpaint'` or `'colorize'`.

Takes the first `sampling.num_samples` images of the test split (in order, no
dequantization), hides part of each (`sampling.mask` for inpainting; the colour, keeping the
channel mean, for colorization) and completes them with the PC sampler of `sampling.*`
(`scorejax.conditional`; `sampling.n_resample` > 1 adds RePaint resampling,
`sampling.guidance` > 0 reconstruction guidance), each batch split over all devices. Writes
`samples/<condition>_<step>.npz` (`samples`, `originals`, `observed`: the known pixels with
the hidden ones mid-gray, or the gray image; for inpainting `mask` `[N, H, W, 1]`, 1 = known;
images NHWC in [0, 1]; `nfe` per batch) and `samples/<condition>_<step>.png` (rows of
originals, inputs and completions). The same seed and checkpoint give the same completions.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from scorejax import conditional, distributed, images, run_common
from scorejax.models import make_model

CONDITIONS = ('inpaint', 'colorize')
CONDITIONAL_STREAM = 5  # fold_in constant of the key (distinct from plain sampling's)


def check_condition(config) -> None:
  """Fails on conditional settings that cannot run, naming the field and the choices.

  Raises:
    ValueError: one line.
  """
  s = config.sampling
  if s.condition not in CONDITIONS:
    raise ValueError(f'unknown sampling.condition {s.condition!r}; valid choices: '
                     f"{['', *CONDITIONS, 'class']} ('' draws unconditional samples)")
  if s.method.lower() != 'pc':
    raise ValueError(f'sampling.condition={s.condition} runs the PC sampler; set '
                     f'sampling.method=pc (got {s.method!r})')
  if run_common.is_toy(config):
    raise ValueError(f'sampling.condition={s.condition} needs images; data.dataset='
                     f'{config.data.dataset} is 2-D')
  if s.condition == 'colorize' and config.data.num_channels < 2:
    raise ValueError(f'sampling.condition=colorize needs colour images; data.num_channels='
                     f'{config.data.num_channels}')
  if s.condition == 'inpaint' and s.mask not in conditional.MASKS:
    raise ValueError(f'unknown sampling.mask {s.mask!r}; valid choices: '
                     f'{list(conditional.MASKS)}')
  if s.n_resample < 1:
    raise ValueError(f'sampling.n_resample must be >= 1, got {s.n_resample}')
  if not s.guidance >= 0:
    raise ValueError(f'sampling.guidance must be >= 0, got {s.guidance}')
  if s.guidance and (s.corrector.lower() != 'none' or s.predictor.lower() == 'none'):
    raise ValueError(f"sampling.guidance > 0 needs sampling.corrector='none' and a predictor, "
                     f'got sampling.predictor={s.predictor!r}, sampling.corrector='
                     f'{s.corrector!r}')


def _test_images(config, count: int) -> np.ndarray:
  """The first `count` test images (model range), in order, on every process; fewer if the
  split is smaller."""
  data = run_common.make_data(config, 'test', 1, num_epochs=1, shuffle=False,
                              uniform_dequantization=False, whole_batches=True)
  count = min(count, data.num_steps)
  return np.concatenate([data.batch_at(index)['image'] for index in range(count)])


def _observation(config, originals: np.ndarray, key: jax.Array):
  """`(observed, mask)` in the model range, both `[B, H, W, C]`."""
  if config.sampling.condition == 'inpaint':
    mask = conditional.make_mask(config.sampling.mask, originals.shape, key)
    return originals, np.broadcast_to(mask, originals.shape).copy()
  gray = originals.mean(-1, keepdims=True)
  mask = np.zeros(originals.shape, np.float32)
  mask[..., 0] = 1.0
  return np.broadcast_to(gray, originals.shape).copy(), mask


def _pad(rows: np.ndarray, size: int) -> np.ndarray:
  """`rows` completed to `size` by repeating the last one (a short last batch)."""
  return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), 0)])


def _global(rows: np.ndarray, sharding) -> jax.Array:
  """A global array split along `sharding` from the whole value every process holds."""
  return jax.make_array_from_callback(rows.shape, sharding, lambda index: rows[index])


def _make_sampler(config, model, sde, mesh):
  s = config.sampling
  builder = distributed.batch_sharded_score_builder(
      run_common.score_fn_builder(config, model, sde), mesh)
  basis = (conditional.colorization_basis(config.data.num_channels)
           if s.condition == 'colorize' else None)
  sampler = conditional.make_conditional_sampler(
      builder, sde, basis=basis, n_resample=s.n_resample, guidance=float(s.guidance),
      **run_common.pc_options(config))
  rows, replicated = distributed.batch_sharding(mesh), distributed.replicated_sharding(mesh)
  return jax.jit(sampler, in_shardings=(replicated, replicated, rows, rows),
                 out_shardings=(rows, replicated))


def run(config, workdir: pathlib.Path, params, step: int) -> dict:
  """Completes test images with the restored `params`; returns `{'path', 'nfe', 'step'}`."""
  s = config.sampling
  sde = run_common.make_sde(config)
  mesh = distributed.make_mesh()
  batch_size = run_common.sharded_batch_size(min(s.batch_size, s.num_samples), mesh)
  sample_fn = _make_sampler(config, make_model(config), sde, mesh)
  key = jax.random.fold_in(jax.random.key(config.seed), CONDITIONAL_STREAM)
  originals = _test_images(config, s.num_samples)
  observed, mask = _observation(config, originals, jax.random.fold_in(key, 0))
  chunks, nfes = [], []
  rows = distributed.batch_sharding(mesh)
  with tqdm.tqdm(total=len(originals), desc=s.condition, unit='img',
                 disable=jax.process_index() != 0, dynamic_ncols=True) as progress:
    for index, start in enumerate(range(0, len(originals), batch_size)):
      part = slice(start, start + batch_size)
      count = len(originals[part])
      batch_observed, batch_mask = (_global(_pad(a[part], batch_size), rows)
                                    for a in (observed, mask))
      samples, nfe = sample_fn(jax.random.fold_in(key, index + 1), params, batch_observed,
                               batch_mask)
      chunks.append(run_common.host_array(samples)[:count])
      nfes.append(int(run_common.host_array(jnp.asarray(nfe))))
      progress.update(count)
  samples = np.concatenate(chunks)
  to_data = lambda a: run_common.to_data_range(config, a).astype(np.float32)
  result = dict(samples=to_data(samples), originals=to_data(originals),
                observed=to_data(observed))
  if s.condition == 'inpaint':  # hidden pixels shown mid-gray
    result['observed'] = result['observed'] * mask + 0.5 * (1 - mask)
    result['mask'] = mask[..., :1]
  directory = workdir / 'samples'
  path = directory / f'{s.condition}_{step}.npz'
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(path, nfe=np.asarray(nfes), step=step, **result)
    shown = min(16, len(samples))
    rows_of = [result[name][:shown] for name in ('originals', 'observed', 'samples')]
    scale = max(1, 64 // samples.shape[1])
    images.save_image_grid(directory / f'{s.condition}_{step}.png', np.concatenate(rows_of),
                           nrow=shown, scale=scale)
  logging.info('wrote %d %s completions to %s (NFE per batch: %s)', len(samples),
               s.condition, path, nfes)
  return {'path': str(path), 'nfe': nfes, 'step': step}
