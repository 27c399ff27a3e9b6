"""The eval driver: `run(config, workdir)` for `main.py --mode=eval`.

Evaluates one checkpoint (the newest, or `sampling.checkpoint` / `checkpoint_step`), or,
with `eval.watch`, each new periodic checkpoint as training writes it. Each enabled
evaluator of `EVALUATORS` returns a dict of scalars; the results of one checkpoint are
appended, with its step, to `workdir/eval/metrics.jsonl` and TensorBoard (`eval/tb`).

Evaluators (enabled by config):
  'loss'    (`eval.enable_loss`): the training loss (no dropout) on the test split.
  'bpd'     (`eval.enable_bpd`): bits/dim of the test split through the probability-flow
            ODE likelihood, with uniform dequantization and `eval.bpd_num_repeats`
            repeats (the paper's protocol); for 2-D data the NLL in nats, beside the
            true NLL of the toy distribution.
  'elbo'    (`eval.enable_elbo`): the variational bound on the negative log-likelihood of the
            reverse-SDE model (`scorejax.elbo`, `eval.elbo_num_times` forwards per example)
            in bits/dim on the same dequantized batches as 'bpd' (nats for 2-D data): an
            upper bound on the bits/dim of the SDE samplers' model, where 'bpd' is the
            exact bits/dim of the probability-flow ODE's (class-conditional models: also
            given the label, `bpd_elbo_conditional`).
  'samples' (`eval.enable_sampling`): `eval.num_samples` samples drawn over all devices
            into resumable shards `eval/ckpt_<step>/sampler_<tag>/samples_<k>.npz` (one
            folder per sampler settings), then their quality:
            digits-FID / IS for digits, FID / IS / KID (Inception) for images, sliced
            Wasserstein / MMD / true-density NLL for 2-D toys (`run_eval_samples`).

To add a metric: write `fn(context: EvalContext) -> dict[str, float]`, add it to
`EVALUATORS` and to `enabled_evaluators`.

References:
  Song et al. 2021, ICLR, Sec. 4.3 and Appendix D.2 (likelihood via the probability-flow
  ODE, dequantization), Table 2 (bits/dim on CIFAR-10).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from scorejax import checkpoints, checks, run_common, run_eval_samples, toy_data
from scorejax import sde as sde_lib
from scorejax.logging_utils import MetricWriter, read_jsonl
from scorejax.models import make_model

EVAL_MODE_STREAM = 5  # fold_in constant of the eval-mode key
ELBO_STREAM = 1  # fold_in constant of the bound's key (apart from the likelihood's)
# Headline numbers printed after each checkpoint.
SUMMARY_KEYS = ('eval_loss', 'bpd', 'bpd_median', 'bpd_conditional', 'bpd_elbo',
                'bpd_elbo_conditional', 'nll', 'nll_elbo', 'true_nll',
                'digits_fid', 'digits_is', 'accuracy', 'fid', 'inception_score', 'kid',
                'sample_swd', 'sample_mmd', 'sample_nll')


@dataclasses.dataclass
class EvalContext:
  """What an evaluator may use; built by the driver for one checkpoint."""

  config: Any
  workdir: pathlib.Path
  model: Any
  sde: sde_lib.SDE
  params: Any
  step: int
  key: jax.Array


def _test_batches(config, split: str, batch_size: int, num_batches: int, **kwargs):
  data = run_common.make_data(config, split, batch_size, num_epochs=1, shuffle=False, **kwargs)
  total = data.num_steps
  count = total if not num_batches or total is None else min(num_batches, total)
  if count is None:  # infinite toy stream
    count = num_batches or 4
  return [data.batch_at(i) for i in range(count)]


def evaluate_loss(context: EvalContext) -> dict[str, float]:
  """The training objective of the (EMA) parameters on the test split, without dropout."""
  config = context.config
  loss_fn = jax.jit(run_common.make_loss_fn(config, context.model, context.sde, train=False))
  batches = _test_batches(config, 'test', config.eval.batch_size, config.eval.loss_num_batches)
  losses = [float(loss_fn(jax.random.fold_in(context.key, i), context.params, batch)[0])
            for i, batch in enumerate(batches)]
  return {'eval_loss': float(np.mean(losses)), 'eval_loss_batches': len(losses)}


def dequantization_levels(config) -> int:
  """Number of integer pixel levels of the dataset (17 for digits, else 256)."""
  return 17 if config.data.dataset.lower() == 'digits' else 256


def bits_per_dim_offset(config) -> float:
  """`log2(levels) - log2(scale)`: converts the model-range density of dequantized data.

  Data `v` in `{0..L-1}` becomes `y = (v + u) / L` and the model sees `x = a y + b`
  (`a = 2` when centered); then `-log2 P(v) <= -log2 p_x(x) / D - log2 a + log2 L`.
  """
  scale = 2.0 if config.data.centered else 1.0
  return math.log2(dequantization_levels(config)) - math.log2(scale)


def _likelihood_batches(context: EvalContext, key: jax.Array):
  """`(key, batch)` over `eval.bpd_num_repeats` passes of the bits/dim batches; each pass
  draws fresh dequantization noise (a different data seed) and a fresh key."""
  config, e = context.config, context.config.eval
  for repeat in range(max(1, e.bpd_num_repeats)):
    batches = _test_batches(config, e.bpd_dataset, e.batch_size, e.bpd_num_batches,
                            seed=config.seed + repeat,
                            uniform_dequantization=not run_common.is_toy(config))
    for i, batch in enumerate(batches):
      yield jax.random.fold_in(jax.random.fold_in(key, repeat), i), batch


def _to_bpd(config, nll_or_logp, sign: float = -1.0) -> np.ndarray:
  """Bits/dim of the dequantized data from `log p` (`sign=-1`) or from an NLL (`sign=1`)."""
  values = sign * np.asarray(nll_or_logp, np.float64)
  return values / (int(np.prod(run_common.element_shape(config))) * math.log(2)) + \
      bits_per_dim_offset(config)


def _true_nll(config, x) -> np.ndarray:
  distribution = toy_data.make_toy(config.data.dataset.lower())
  return -np.asarray(distribution.log_prob(np.asarray(x)), np.float64)


def _summary(name: str, values: np.ndarray) -> dict[str, float]:
  return {name: float(values.mean()), f'{name}_median': float(np.median(values)),
          f'{name}_std_err': float(values.std() / math.sqrt(len(values))),
          f'{name}_examples': len(values)}


def evaluate_bpd(context: EvalContext) -> dict[str, float]:
  """Bits/dim (images) or NLL in nats (2-D data) through the probability-flow ODE.

  A class-conditional model (`model.num_classes > 0`) gets `bpd` of its "no class" part,
  `-log p(x)`, and `bpd_conditional`, `-log p(x | y)` with each test image's label (the same
  dequantization and Hutchinson noise)."""
  from scorejax import likelihood

  config = context.config
  e = config.eval
  toy = run_common.is_toy(config)
  score_fn = run_common.score_fn_builder(config, context.model, context.sde)

  estimator = e.bpd_estimator
  if estimator == 'auto':
    # The exact divergence costs D Jacobian-vector products: cheap for small D, and free
    # of the Hutchinson noise, whose variance grows like D / std(t)^2 near t = eps.
    estimator = 'exact' if int(np.prod(run_common.element_shape(config))) <= 16 else 'rademacher'

  def solve(key, score, x):
    logp, _, nfe = likelihood.log_likelihood(
        key, score, context.sde, x, estimator=estimator, rtol=e.rtol, atol=e.atol)
    return logp, nfe

  logp_fn = jax.jit(lambda key, params, x: solve(key, score_fn(params), x))
  # A class-conditional model also gets -log p(x | y) with the test labels.
  conditional = run_common.is_class_conditional(config) and not toy
  if conditional:
    class_score_fn = run_common.class_score_fn_builder(config, context.model, context.sde)
    class_logp_fn = jax.jit(lambda key, params, x, y: solve(
        key, lambda x_, t_: class_score_fn(params)(x_, t_, y), x))
  conditional_values = []

  values, nfes, true_nll = [], [], []
  for key, batch in _likelihood_batches(context, context.key):
    x = jnp.asarray(batch['image'])
    logp, nfe = logp_fn(key, context.params, x)
    values.append(-np.asarray(logp, np.float64) if toy else _to_bpd(config, logp))
    if conditional:
      logp_y, _ = class_logp_fn(key, context.params, x, jnp.asarray(batch['label']))
      conditional_values.append(_to_bpd(config, logp_y))
    nfes.append(float(nfe))
    if toy:
      true_nll.append(_true_nll(config, x))
  values = np.concatenate(values)
  if toy:
    return {'nll': float(values.mean()), 'true_nll': float(np.concatenate(true_nll).mean()),
            'nll_nfe': float(np.mean(nfes))}
  result = {**_summary('bpd', values), 'bpd_nfe': float(np.mean(nfes))}
  if conditional:
    given = np.concatenate(conditional_values)
    result.update(bpd_conditional=float(given.mean()),
                  bpd_conditional_median=float(np.median(given)))
  return result


def evaluate_elbo(context: EvalContext) -> dict[str, float]:
  """The variational bound of `scorejax.elbo` on the bits/dim batches (nats for 2-D data).

  `bpd_elbo_prior` is the prior's KL term (bits/dim): it shows whether `p_T` reaches the
  prior. A class-conditional model gets `bpd_elbo` of its "no class" part and
  `bpd_elbo_conditional`, the bound on `-log p(x | y)` with each test image's label (the same
  times and noise)."""
  from scorejax import elbo

  config = context.config
  toy = run_common.is_toy(config)
  score_fn = run_common.score_fn_builder(config, context.model, context.sde)
  bound = lambda key, score, x: elbo.negative_elbo(key, score, context.sde, x,
                                                   num_times=config.eval.elbo_num_times)
  bound_fn = jax.jit(lambda key, params, x: bound(key, score_fn(params), x))
  conditional = run_common.is_class_conditional(config) and not toy
  if conditional:
    class_score_fn = run_common.class_score_fn_builder(config, context.model, context.sde)
    class_bound_fn = jax.jit(lambda key, params, x, y: bound(
        key, lambda x_, t_: class_score_fn(params)(x_, t_, y), x)[0])
  values, conditional_values, priors, true_nll = [], [], [], []
  for key, batch in _likelihood_batches(context,
                                        jax.random.fold_in(context.key, ELBO_STREAM)):
    x = jnp.asarray(batch['image'])
    value, terms = bound_fn(key, context.params, x)
    values.append(np.asarray(value, np.float64) if toy else _to_bpd(config, value, 1.0))
    priors.append(np.asarray(terms['prior'], np.float64))
    if conditional:
      given = class_bound_fn(key, context.params, x, jnp.asarray(batch['label']))
      conditional_values.append(_to_bpd(config, given, 1.0))
    if toy:
      true_nll.append(_true_nll(config, x))
  values, prior = np.concatenate(values), float(np.concatenate(priors).mean())
  if toy:
    return {'nll_elbo': float(values.mean()), 'nll_elbo_prior': prior,
            'true_nll': float(np.concatenate(true_nll).mean())}
  dim = int(np.prod(run_common.element_shape(config)))
  result = {**_summary('bpd_elbo', values), 'bpd_elbo_prior': prior / (dim * math.log(2))}
  if conditional:
    given = np.concatenate(conditional_values)
    result.update(bpd_elbo_conditional=float(given.mean()),
                  bpd_elbo_conditional_median=float(np.median(given)))
  return result


EVALUATORS: dict[str, Callable[[EvalContext], dict[str, float]]] = {
    'loss': evaluate_loss,
    'bpd': evaluate_bpd,
    'elbo': evaluate_elbo,
    'samples': run_eval_samples.evaluate_samples,
}


def enabled_evaluators(config) -> list[str]:
  """Names of the evaluators the config turns on, in `EVALUATORS` order."""
  flags = {'loss': config.eval.enable_loss, 'bpd': config.eval.enable_bpd,
           'elbo': config.eval.enable_elbo, 'samples': config.eval.enable_sampling}
  return [name for name in EVALUATORS if flags.get(name, False)]


def evaluate_checkpoint(config, workdir: pathlib.Path, model, sde, source, step: int | None,
                        writer: MetricWriter) -> dict:
  """Runs every enabled evaluator on one checkpoint and logs the results."""
  params, step = checkpoints.restore_params(source, step, use_ema=config.sampling.use_ema)
  key = jax.random.fold_in(jax.random.key(config.seed), EVAL_MODE_STREAM)
  context = EvalContext(config=config, workdir=workdir, model=model, sde=sde, params=params,
                        step=step, key=key)
  results: dict[str, float] = {}
  for name in enabled_evaluators(config):
    start = time.perf_counter()
    results.update(EVALUATORS[name](context))
    results[f'{name}_seconds'] = time.perf_counter() - start
    logging.info('step %d %s: %s', step, name,
                 {k: v for k, v in results.items() if not k.endswith('_seconds')})
  writer.write_scalars(step, results)
  writer.flush()
  summary = ', '.join(f'{k}={results[k]:.4g}' for k in SUMMARY_KEYS if k in results)
  logging.info('eval of step %d: %s', step, summary)
  if jax.process_index() == 0:
    print(f'eval step {step}: {summary}', flush=True)
  return {'step': step, **results}


def _periodic_steps(workdir: pathlib.Path) -> list[int]:
  directory = workdir / checkpoints.PERIODIC_DIR
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / 'state').is_dir())


def validate(config, workdir: str) -> None:
  """Fails before anything is written when an input of the evaluation is missing.

  Checks the checkpoint (unless watching for new ones), the test split (loss, bits/dim)
  and the Inception weights / reference statistics of image sample metrics.

  Raises:
    FileNotFoundError: a missing checkpoint or metrics file (one line).
    DatasetNotPreparedError: the data is not available locally.
    ValueError: sampler settings the sampler rejects, bad `eval.rtol` / `eval.atol`, or model
      settings other than the training run's (`run_common.check_trained_settings`).
  """
  run_common.make_sde(config)
  if config.eval.enable_sampling:
    run_common.check_sampling(config)
  if config.eval.enable_bpd:
    try:
      checks.check_tolerances(config.eval.rtol, config.eval.atol)
    except ValueError as error:
      raise ValueError(f'likelihood settings (eval.rtol, eval.atol): {error}') from None
  if config.eval.enable_elbo:
    checks.check_count('eval.elbo_num_times', config.eval.elbo_num_times)
  run_eval_samples.validate(config)
  if config.eval.enable_sampling and run_eval_samples.is_class_conditional(config):
    from scorejax import run_class_conditional

    run_class_conditional.check(config, pathlib.Path(workdir))
  source = pathlib.Path(config.sampling.checkpoint) if config.sampling.checkpoint else \
      pathlib.Path(workdir)
  run_common.check_trained_settings(config, source)
  run_common.check_class_labels(config)
  if config.eval.enable_loss or config.eval.enable_bpd or config.eval.enable_elbo:
    run_common.make_data(config, 'test', config.eval.batch_size, num_epochs=1, shuffle=False)
  if not config.eval.watch:
    checkpoints.find_step_dir(source, config.sampling.checkpoint_step or None)


def run(config, workdir: str) -> list[dict]:
  """Evaluates one checkpoint, or (with `eval.watch`) every new one; returns the results."""
  workdir = pathlib.Path(workdir)
  sde = run_common.make_sde(config)
  model = make_model(config)
  writer = MetricWriter(workdir / 'eval', tensorboard=True)
  source = pathlib.Path(config.sampling.checkpoint) if config.sampling.checkpoint else workdir
  results = []
  try:
    if not config.eval.watch:
      results.append(evaluate_checkpoint(config, workdir, model, sde, source,
                                         config.sampling.checkpoint_step or None, writer))
      return results
    done = {r['step'] for r in read_jsonl(workdir / 'eval' / 'metrics.jsonl')} \
        if (workdir / 'eval' / 'metrics.jsonl').exists() else set()
    deadline = time.monotonic() + config.eval.watch_timeout
    while True:
      todo = [s for s in _periodic_steps(workdir) if s not in done]
      for step in todo:
        results.append(evaluate_checkpoint(config, workdir, model, sde, workdir, step, writer))
        done.add(step)
        deadline = time.monotonic() + config.eval.watch_timeout
      if done and max(done) >= config.training.n_iters:
        return results
      if time.monotonic() > deadline:
        logging.info('no new checkpoint for %ds: stopping', config.eval.watch_timeout)
        return results
      time.sleep(5)
  finally:
    writer.close()
