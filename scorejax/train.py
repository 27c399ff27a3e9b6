"""The training step: loss gradient, optimizer update and EMA, as one pure function.

`make_train_step` returns `step_fn(state, batches, key) -> (state, metrics)` that applies
`n` updates (a `lax.scan` over the leading axis of `batches`, score_sde's
`n_jitted_steps`). The key of update `s` is `fold_in(key, s)`, so the result depends only
on (key, step, data) and not on how many updates are fused per call, on the number of
devices, or on where a run was interrupted and resumed. An update whose loss or
gradient is not finite leaves the state unchanged and reports `finite = False`, so a
broken state is never produced (the driver stops on it).

The driver jits `step_fn` with the state replicated and the batch split over the
`('data',)` mesh (see `distributed.py`); nothing here depends on the device layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from scorejax.train_state import Params, TrainState, ema_update

Batch = Any
# loss_fn(key, params, batch) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[jax.Array, Params, Batch], tuple[jax.Array, dict[str, jax.Array]]]
StepFn = Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    ema_rate: float,
    lr_schedule: optax.Schedule | None = None,
) -> StepFn:
  """Builds the (un-jitted) train step.

  Args:
    loss_fn: `loss_fn(key, params, batch) -> (loss, metrics)`, a scalar loss to minimise.
    optimizer: the optax transformation (see `train_state.make_optimizer`).
    ema_rate: decay of the parameter EMA.
    lr_schedule: if given, its value at each step is reported as metric `lr`.

  Returns:
    `step_fn(state, batches, key) -> (state, metrics)`: `batches` is a pytree whose
    leaves are `[n, B, ...]` (n updates); `metrics` leaves are `[n]` (`loss`,
    `grad_norm`, `lr`, `finite` and the loss's own metrics).
  """

  def update(state: TrainState, batch: Batch, key: jax.Array):
    step_key = jax.random.fold_in(key, state.step)
    (loss, aux), grads = jax.value_and_grad(
        lambda params: loss_fn(step_key, params, batch), has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(state: TrainState) -> TrainState:
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      return TrainState(
          step=state.step + 1,
          params=params,
          ema_params=ema_update(state.ema_params, params, ema_rate),
          opt_state=opt_state,
      )

    # A branch rather than `where(finite, new, old)`: the update stays one in-place pass
    # over the state (a select would read and write the whole state again: ~0.2 s per
    # CIFAR-10 DDPM++ step on CPU).
    new_state = jax.lax.cond(finite, apply, lambda state: state, state)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'finite': finite, **aux}
    if lr_schedule is not None:
      metrics['lr'] = jnp.asarray(lr_schedule(state.step), jnp.float32)
    return new_state, metrics

  def step_fn(state: TrainState, batches: Batch, key: jax.Array):
    return jax.lax.scan(lambda s, b: update(s, b, key), state, batches)

  return step_fn


def make_eval_step(loss_fn: LossFn) -> Callable[[Params, Batch, jax.Array], jax.Array]:
  """`eval_step(params, batch, key) -> loss`: the training loss without gradients."""

  def eval_step(params: Params, batch: Batch, key: jax.Array) -> jax.Array:
    loss, _ = loss_fn(key, params, batch)
    return loss

  return eval_step
