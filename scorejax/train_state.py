"""The training state as data, the optimizer chain and the EMA of the parameters.

`TrainState` holds everything a train step changes: the step counter, the network
parameters, their exponential moving average (used for sampling and evaluation, as in
score_sde) and the optax optimizer state. It is a `flax.struct` dataclass, i.e. a pytree
that checkpoints, shards and donates as a whole.

References:
  Song et al. 2021, Appendix H.1 (Adam, learning-rate warm-up, gradient clipping, EMA
  rates 0.999 / 0.9999); Ho et al. 2020, Appendix B.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

Params = Any


@flax.struct.dataclass
class TrainState:
  """Step counter, parameters, EMA parameters and optimizer state.

  Attributes:
    step: int32 scalar, the number of optimizer updates applied so far.
    params: the network's `params` collection.
    ema_params: exponential moving average of `params` (same tree).
    opt_state: the optax state of the optimizer.
  """

  step: jax.Array
  params: Params
  ema_params: Params
  opt_state: optax.OptState


def create_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
  """A fresh state at step 0 whose EMA starts at `params`."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=optimizer.init(params),
  )


def ema_update(ema_params: Params, params: Params, rate: float) -> Params:
  """`ema <- rate * ema + (1 - rate) * params`, leaf by leaf."""
  return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema_params, params)


def make_lr_schedule(lr: float, warmup: int) -> optax.Schedule:
  """Linear warm-up `lr * min(step / warmup, 1)` (score_sde's schedule), then constant."""
  if warmup <= 0:
    return optax.constant_schedule(lr)
  return optax.linear_schedule(init_value=0.0, end_value=lr, transition_steps=warmup)


def _adam(schedule: optax.Schedule, beta1: float, eps: float, weight_decay: float):
  if weight_decay:
    raise ValueError(
        f'optim.weight_decay={weight_decay} needs optim.optimizer="AdamW" (Adam has no decay)'
    )
  return optax.adam(schedule, b1=beta1, b2=0.999, eps=eps)


def _adamw(schedule: optax.Schedule, beta1: float, eps: float, weight_decay: float):
  return optax.adamw(schedule, b1=beta1, b2=0.999, eps=eps, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'adam': _adam,
    'adamw': _adamw,
}


def make_optimizer(
    name: str,
    *,
    lr: float,
    beta1: float = 0.9,
    eps: float = 1e-8,
    warmup: int = 0,
    grad_clip: float = -1.0,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """Global-norm clipping (if `grad_clip >= 0`) followed by Adam / AdamW with warm-up.

  Args:
    name: `'Adam'` or `'AdamW'` (case-insensitive), as score_sde's `optim.optimizer`.
    lr: peak learning rate.
    beta1: Adam's first-moment decay.
    eps: Adam's epsilon.
    warmup: number of linear warm-up steps (0 for none).
    grad_clip: global-norm clipping threshold; negative disables clipping.
    weight_decay: decoupled weight decay (AdamW only).

  Returns:
    The optax chain.

  Raises:
    ValueError: for an unknown optimizer name, listing the valid ones.
  """
  key = name.lower()
  if key not in OPTIMIZERS:
    raise ValueError(f'unknown optim.optimizer {name!r}; valid choices: {sorted(OPTIMIZERS)}')
  schedule = make_lr_schedule(lr, warmup)
  steps = [optax.clip_by_global_norm(grad_clip)] if grad_clip >= 0 else []
  steps.append(OPTIMIZERS[key](schedule, beta1, eps, weight_decay))
  return optax.chain(*steps)
