"""What the train / eval / sample drivers share: config -> typed objects, host transfers.

This is driver code: it reads the ConfigDict and builds the SDE, the network and its
parameters, the loss, the datasets and the sampler as plain typed objects, which the
library modules then use without ever seeing the config.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from scorejax import (
  adaptive_sampler,
  checks,
  datasets,
  distributed,
  edm_sampler,
  fast_solvers,
  sampling,
)
from scorejax import sde as sde_lib
from scorejax.models import EDMPreconditioning, make_preconditioning, make_score_fn
from scorejax.train import LossFn

# sampling.method: scorejax.sampling ('pc', 'ode'), .fast_solvers, .edm_sampler,
# .adaptive_sampler
SAMPLING_METHODS = ('pc', 'ode', 'fast', 'edm', 'adaptive')

Params = Any
ConfigDict = ml_collections.ConfigDict


def make_sde(config: ConfigDict) -> sde_lib.SDE:
  """The forward SDE named by `training.sde` with the `model.*` noise settings."""
  return sde_lib.make_sde(
      config.training.sde,
      sigma_min=config.model.sigma_min,
      sigma_max=config.model.sigma_max,
      beta_min=config.model.beta_min,
      beta_max=config.model.beta_max,
      num_scales=config.model.num_scales,
      cosine_s=config.model.cosine_s,
      logsnr_min=config.model.logsnr_min,
  )


# Model fields that only training reads; every other `model.*` field shapes the network or
# the score convention.
_TRAINING_ONLY_MODEL_FIELDS = frozenset({'ema_rate', 'dropout'})


def _meaning_settings(config: dict) -> dict[str, Any]:
  """The settings that give a checkpoint its meaning, as `{'section.field': value}` (those
  `config` has)."""
  training, model, data = (config.get(name, {}) for name in ('training', 'model', 'data'))
  settings = {f'training.{k}': training[k] for k in ('sde', 'continuous') if k in training}
  settings.update({f'data.{k}': data[k] for k in ('image_size', 'num_channels', 'centered')
                   if k in data})
  for field, value in model.items():
    # Continuous-time networks take t, not a step index: N only sets the sampler's steps.
    if field in _TRAINING_ONLY_MODEL_FIELDS or (
        field == 'num_scales' and training.get('continuous', True)):
      continue
    if field == 'sigma_data' and not model.get('preconditioning'):  # read by it alone
      continue
    settings[f'model.{field}'] = value
  return settings


def check_trained_settings(config: ConfigDict, source: str | pathlib.Path) -> None:
  """Fails when `config` defines the model otherwise than the run that trained `source`.

  `source` is a workdir, its `checkpoints` directory or a step directory; the training run's
  config is the workdir's `config.json` (written by `main.py --mode=train`). The same
  parameters under another SDE, time convention, network or data scaling give wrong samples
  and numbers without any error, so sampling and evaluation stop here instead. Settings the
  training config does not have (a config written by an older scorejax) are not compared;
  nothing is checked without a `config.json` (imported checkpoints).

  Raises:
    ValueError: one line naming each differing field, its trained and its current value.
  """
  source = pathlib.Path(source)
  workdir = source.parent.parent if (source / 'state').is_dir() else \
      source.parent if source.name == 'checkpoints' else source
  path = workdir / 'config.json'
  if not path.is_file():
    return
  try:
    trained = _meaning_settings(json.loads(path.read_text()))
  except (ValueError, AttributeError) as error:  # not a config written by main.py
    logging.warning('not comparing the model settings with %s: %s', path, error)
    return
  current = _meaning_settings(json.loads(config.to_json_best_effort()))
  differ = [k for k in sorted(trained) if k in current and trained[k] != current[k]]
  if differ:
    fields = ', '.join(f'{k}={trained[k]!r} (here {current[k]!r})' for k in differ)
    flags = ' '.join(f'--config.{k}={json.dumps(trained[k])}' for k in differ)
    raise ValueError(f'the model in {workdir} was trained with {fields} ({path}); its '
                     f'parameters mean something else under other settings: pass {flags}')


def is_toy(config: ConfigDict) -> bool:
  """Whether `data.dataset` is a 2-D toy (`[B, D]` data instead of images)."""
  return datasets.DATASETS.get(config.data.dataset.lower()) == 'toy'


def make_data(
    config: ConfigDict, split: str, batch_size: int, *, num_epochs: int | None = None,
    shuffle: bool = True, seed: int | None = None, uniform_dequantization: bool | None = None,
    num_threads: int | None = None, whole_batches: bool = False,
    with_labels: bool | None = None,
) -> datasets.Dataset:
  """The per-host input pipeline of `split` with the config's data settings.

  `seed` and `uniform_dequantization`, when given, replace the config's values; with
  `whole_batches` every process reads every row (not only its own). `with_labels` adds the
  class labels (`'label'`); by default a class-conditional model (`model.num_classes > 0`)
  gets them.
  In-memory datasets (2-D toys, digits) are read in the caller's thread by default
  (`num_threads=0`): their batches cost well under a train step, and prefetch threads
  would only compete with XLA for the CPU cores; files (tfds, image folders) use grain's
  reader threads.
  """
  if num_threads is None and is_in_memory(config):
    num_threads = 0
  if uniform_dequantization is None:
    uniform_dequantization = config.data.uniform_dequantization
  if with_labels is None:
    with_labels = is_class_conditional(config)
  return datasets.make_dataset(
      config.data.dataset,
      split=split,
      batch_size=batch_size,
      image_size=config.data.image_size,
      centered=config.data.centered,
      random_flip=config.data.random_flip if split == 'train' else False,
      uniform_dequantization=uniform_dequantization,
      seed=config.seed if seed is None else seed,
      data_dir=config.data.data_dir or None,
      num_epochs=num_epochs,
      shuffle=shuffle,
      num_channels=None if is_toy(config) else config.data.num_channels,
      num_threads=num_threads,
      with_labels=with_labels,
      **(dict(process_index=0, process_count=1) if whole_batches else {}),
  )


def is_class_conditional(config: ConfigDict) -> bool:
  """Whether the score network takes class labels (`model.num_classes > 0`)."""
  return config.model.get('num_classes', 0) > 0


def check_class_labels(config: ConfigDict) -> None:
  """A class-conditional model needs a labelled dataset with as many classes.

  Raises:
    ValueError: one line naming `model.num_classes` and what the data has.
  """
  if not is_class_conditional(config):
    return
  if is_toy(config) or config.data.dataset.lower() not in datasets.labelled_datasets():
    raise ValueError(f'model.num_classes={config.model.num_classes} needs class labels, but '
                     f'data.dataset={config.data.dataset} has none; labelled datasets: '
                     f'{datasets.labelled_datasets()}')
  data = make_data(config, 'train', 1)
  if data.num_classes != config.model.num_classes:
    raise ValueError(f'model.num_classes={config.model.num_classes} but data.dataset='
                     f'{config.data.dataset} has {data.num_classes} classes')


def is_in_memory(config: ConfigDict) -> bool:
  """Whether `data.dataset` is generated or embedded (toys, digits) rather than read."""
  return datasets.DATASETS.get(config.data.dataset.lower()) in ('toy', 'embedded')


def init_params(model, key: jax.Array, element_shape: tuple[int, ...]) -> Params:
  """Initialises the `params` collection of `model` for examples of `element_shape`.

  Pure (jit it with `out_shardings` to create replicated parameters on many hosts).
  """
  x = jnp.zeros((1, *element_shape), jnp.float32)
  labels = jnp.ones((1,), jnp.float32)
  param_key, dropout_key = jax.random.split(key)
  variables = model.init({'params': param_key, 'dropout': dropout_key}, x, labels, train=False)
  return variables['params']


def model_fn(model, params: Params, *, train: bool = False, dropout_key: jax.Array | None = None):
  """`model_fn(x, labels) -> out` with `params` (and a dropout key when training) bound."""
  rngs = {'dropout': dropout_key} if train and dropout_key is not None else None
  return functools.partial(model.apply, {'params': params}, train=train, rngs=rngs)


def preconditioning(config: ConfigDict) -> EDMPreconditioning | None:
  """`model.preconditioning` ('' or 'edm', with `model.sigma_data`).

  Raises:
    ValueError: for an unknown name (listing the valid ones), `model.sigma_data <= 0`, or
      `model.scale_by_sigma=True` with a preconditioning (which scales the output itself).
  """
  result = make_preconditioning(config.model.preconditioning, config.model.sigma_data)
  if result is not None and config.model.scale_by_sigma:
    raise ValueError('model.scale_by_sigma=True divides the network output by sigma, which '
                     'model.preconditioning scales already (c_out): set '
                     'model.scale_by_sigma=False')
  return result


def score_fn_builder(config: ConfigDict, model, sde: sde_lib.SDE) -> Callable[[Params], Callable]:
  """`params -> score_fn(x, t)` for evaluation (no dropout), with the time convention
  (`training.continuous`) and `model.preconditioning` of `config`; a class-conditional
  network gives its unconditional ("no class") score."""
  continuous, precondition = config.training.continuous, preconditioning(config)
  return lambda params: make_score_fn(model_fn(model, params), sde, continuous,
                                      preconditioning=precondition)


def class_score_fn_builder(config: ConfigDict, model,
                           sde: sde_lib.SDE) -> Callable[[Params], Callable]:
  """`params -> class_score_fn(x, t, class_labels)` of a class-conditional network."""
  continuous, precondition = config.training.continuous, preconditioning(config)

  def build(params):
    def class_score_fn(x, t, class_labels):
      network = functools.partial(model_fn(model, params), class_labels=class_labels)
      return make_score_fn(network, sde, continuous, preconditioning=precondition)(x, t)
    return class_score_fn

  return build


def make_loss_fn(config: ConfigDict, model, sde: sde_lib.SDE, *, train: bool = True) -> LossFn:
  """`loss_fn(key, params, batch) -> (loss, metrics)` of the configured objective.

  Continuous training uses the SDE denoising score-matching loss; discrete training uses
  the SMLD loss for the VE SDE and the DDPM loss for the VP SDE (`losses.make_loss_fn`).
  `train=False` turns dropout off (evaluation).
  """
  from scorejax import losses

  training = config.training
  loss_fn = losses.make_loss_fn(
      sde, model, train=train, reduce_mean=training.reduce_mean,
      continuous=training.continuous, likelihood_weighting=training.likelihood_weighting,
      importance_weighting=training.importance_weighting, eps=training.eps,
      class_dropout=training.class_dropout, objective=training.objective,
      preconditioning=preconditioning(config), sigma_data=config.model.sigma_data,
      p_mean=training.p_mean, p_std=training.p_std,
  )
  return lambda key, params, batch: loss_fn(params, key, batch)


def pc_options(config: ConfigDict) -> dict[str, Any]:
  """The keyword arguments of `sampling.pc_sample` that `sampling.*` sets (the conditional
  samplers take them too)."""
  s = config.sampling
  return dict(predictor=s.predictor.lower(), corrector=s.corrector.lower(), snr=s.snr,
              n_corrector_steps=s.n_steps_each, n_steps=s.num_steps or None,
              denoise=s.noise_removal, eps=s.eps, probability_flow=s.probability_flow)


def make_sampler(
    config: ConfigDict, model, sde: sde_lib.SDE, shape: tuple[int, ...],
    builder: Callable[[Params], Callable] | None = None,
) -> Callable[[jax.Array, Params], tuple[jax.Array, Any]]:
  """The configured sampler as a compiled `sample_fn(key, params) -> (samples, nfe)`.

  `builder` (`params -> score_fn`) replaces the model's `score_fn_builder`.

  Raises:
    ValueError: for an unknown `sampling.method` (listing the valid ones).
  """
  s = config.sampling
  builder = builder or score_fn_builder(config, model, sde)
  n_steps = s.num_steps or None
  if s.method.lower() == 'pc':
    return sampling.make_pc_sampler(builder, sde, shape, **pc_options(config))
  if s.method.lower() == 'ode':
    return sampling.make_ode_sampler(
        builder, sde, shape, rtol=s.rtol, atol=s.atol, eps=s.eps, method=s.ode_method.lower(),
        n_steps=n_steps, denoise=s.noise_removal,
    )
  if s.method.lower() == 'fast':
    options = dict(n_steps=s.num_steps) if s.num_steps else {}
    return fast_solvers.make_fast_sampler(
        builder, sde, shape, method=s.fast_method.lower(), time_grid=s.time_grid.lower(),
        eps=s.eps, denoise=s.noise_removal, **options,
    )
  if s.method.lower() == 'edm':
    options = dict(n_steps=s.num_steps) if s.num_steps else {}
    return edm_sampler.make_edm_sampler(
        builder, sde, shape, rho=s.rho, eps=s.eps, s_churn=s.s_churn, s_tmin=s.s_tmin,
        s_tmax=s.s_tmax, s_noise=s.s_noise, denoise=s.noise_removal, **options,
    )
  if s.method.lower() == 'adaptive':
    checks.check_tolerances(s.adaptive_rtol, s.adaptive_atol,
                            ('sampling.adaptive_rtol', 'sampling.adaptive_atol'))
    return adaptive_sampler.make_adaptive_sampler(
        builder, sde, shape, rtol=s.adaptive_rtol, atol=s.adaptive_atol, eps=s.eps,
        denoise=s.noise_removal,
    )
  raise ValueError(f"unknown sampling.method {s.method!r}; valid choices: "
                   f"{list(SAMPLING_METHODS)}")


def check_sampling(config: ConfigDict) -> None:
  """Fails on `sampling.*` settings the configured sampler rejects, before anything runs.

  Unknown names, numbers out of range, a VP grid too coarse for the tables its steps read:
  the sampler's own checks, run on a stand-in score (one step on a 1x1 stand-in is traced
  abstractly; nothing is compiled).

  Raises:
    ValueError: one line naming the setting (and, from `make_sde`, the SDE's fields).
  """
  sde = make_sde(config)
  stand_in = lambda params: (lambda x, t: -x)
  try:
    make_sampler(config, None, sde, (1, 1), builder=stand_in)
  except ValueError as error:
    raise ValueError(f'sampling settings (sampling.method={config.sampling.method}): '
                     f'{error}') from None


def sharded_batch_size(batch_size: int, mesh: jax.sharding.Mesh | None = None) -> int:
  """`batch_size` rounded up to a multiple of the mesh's device count."""
  count = (mesh or distributed.make_mesh()).size
  return -(-batch_size // count) * count


def make_sharded_sampler(
    config: ConfigDict, model, sde: sde_lib.SDE, batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[jax.Array, Params], tuple[jax.Array, Any]]:
  """The configured sampler with its batch split over the `('data',)` mesh.

  `sample_fn(key, params) -> (samples [batch_size, ...], nfe)`: parameters and key are
  replicated, and every score evaluation is constrained to the batch sharding, so each
  device integrates its own rows (the adaptive ODE's error norm is an all-reduce). The
  prior noise is a function of the key alone (JAX's random numbers do not depend on the
  sharding), so a seed gives the same samples on any number of devices, up to float
  reassociation in the network.

  Args:
    config: the experiment config (`sampling.*`).
    model: the score network.
    sde: the forward SDE.
    batch_size: samples per call; a multiple of the mesh size (see `sharded_batch_size`).
    mesh: the device mesh (default: every device, `distributed.make_mesh()`).

  Raises:
    ValueError: if `batch_size` does not split over the mesh, or for an unknown method.
  """
  mesh = mesh or distributed.make_mesh()
  if batch_size % mesh.size:
    raise ValueError(f'sampling batch {batch_size} must be a multiple of the {mesh.size} devices')
  rows = distributed.batch_sharding(mesh)
  replicated = distributed.replicated_sharding(mesh)
  sharded_builder = distributed.batch_sharded_score_builder(
      score_fn_builder(config, model, sde), mesh)
  sampler = make_sampler(config, model, sde, (batch_size, *element_shape(config)),
                         builder=sharded_builder)
  return jax.jit(sampler, in_shardings=(replicated, replicated),
                 out_shardings=(rows, replicated))


def host_array(x: jax.Array) -> np.ndarray:
  """The whole value of an array as numpy, on every process: replicated arrays are read
  from a local shard, batch-sharded multi-process ones are all-gathered."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.sharding.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def host_tree(tree: Any) -> Any:
  return jax.tree.map(host_array, tree)


def to_data_range(config: ConfigDict, samples: np.ndarray) -> np.ndarray:
  """Model-range samples -> data range: images in [0, 1] (clipped), toys unchanged."""
  if is_toy(config):
    return np.asarray(samples, np.float32)
  inverse = datasets.get_data_inverse_scaler(config.data.centered)
  return np.clip(np.asarray(inverse(np.asarray(samples, np.float32))), 0.0, 1.0)


def draw_samples(
    sample_fn: Callable, key: jax.Array, params: Params, num_samples: int, batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list]:
  """Draws `num_samples` samples in batches (batch `i` uses `fold_in(key, i)`).

  Returns:
    `(samples [num_samples, ...] model range, nfe of each batch)`.
  """
  chunks, nfes = [], []
  for index in range(math.ceil(num_samples / batch_size)):
    samples, nfe = sample_fn(jax.random.fold_in(key, index), params)
    chunks.append(host_array(samples))
    nfes.append(int(host_array(jnp.asarray(nfe))))
    if progress is not None:
      progress(len(chunks[-1]))
  return np.concatenate(chunks)[:num_samples], nfes


def element_shape(config: ConfigDict) -> tuple[int, ...]:
  """Shape of one example: `(H, W, C)` for images, `(D,)` for 2-D toys."""
  if is_toy(config):
    return (2,)
  return (config.data.image_size, config.data.image_size, config.data.num_channels)
