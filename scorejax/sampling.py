"""Samplers of score-based models: predictor-corrector (PC) and the probability-flow ODE.

Owns `pc_sample(key, score_fn, sde, shape, ...) -> (samples, nfe)` and
`ode_sample(key, score_fn, sde, shape, ...) -> (samples, nfe)`, plus builders
(`make_pc_sampler`, `make_ode_sampler`) that return one jitted function of `(key, params)` for
the drivers. The single steps live in `scorejax.predictors` (`PREDICTORS`, `CORRECTORS`,
re-exported here) and the in-graph ODE solvers in `scorejax.ode` (`ODE_METHODS`). Few-step
solvers of the same probability-flow ODE (DDIM, DPM-Solver, DPM-Solver++) are in
`scorejax.fast_solvers`.

Each sampler is one compiled program: the PC sampler is a `lax.fori_loop` over the time grid
`linspace(T, eps, N)` (corrector, then predictor, at each time, as in score_sde), and the ODE
sampler integrates from `T` to `eps` with an adaptive solver inside `jit` (diffrax), never a
Python loop around the model nor scipy on the host.

NFE (number of score evaluations) is exact: PC costs
`N * (predictor_cost + n_corrector_steps * corrector_cost)` with cost 1 per step and 0 for
`'none'`; the ODE sampler counts solver evaluations (see `scorejax.ode`), plus one when
`denoise`.

References:
  Song et al. 2021, ICLR: Algorithm 1 (PC sampling), Eq. (13) and Appendix D
  (probability-flow ODE sampling), Appendix G (denoising at the last step).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from scorejax import checks
from scorejax import ode as ode_lib
from scorejax import sde as sde_lib
from scorejax.ode import ODE_METHODS
from scorejax.predictors import (
    CORRECTORS,
    PREDICTORS,
    corrector_step,
    get_corrector,
    get_predictor,
    predictor_step,
    reverse_diffusion_update,
)

Array = jax.Array
Params = Any
ScoreFn = Callable[[Array, Array], Array]

__all__ = [
    'CORRECTORS', 'ODE_METHODS', 'PREDICTORS', 'make_ode_sampler', 'make_pc_sampler',
    'ode_sample', 'pc_loop', 'pc_nfe', 'pc_sample', 'pc_step', 'pc_times',
]


def _with_steps(sde: sde_lib.SDE, n_steps: int | None) -> tuple[sde_lib.SDE, int]:
  """Rebuilds `sde` with `N = n_steps` so its discrete tables match the sampling grid."""
  if n_steps is None or n_steps == sde.N:
    return sde, sde.N
  checks.check_count('n_steps', n_steps)
  return dataclasses.replace(sde, N=n_steps), n_steps


def check_pc_options(sde: sde_lib.SDE, *, predictor: str, corrector: str, snr: float,
                     n_corrector_steps: int, n_steps: int | None, eps: float,
                     probability_flow: bool, **_) -> tuple[sde_lib.SDE, int]:
  """Checks `pc_sample`'s arguments before tracing; returns the SDE on the grid and `N`."""
  get_predictor(predictor)
  get_corrector(corrector)
  checks.check_in_range('snr', snr, low=0.0)
  checks.check_count('n_corrector_steps', n_corrector_steps, minimum=0)
  sde, n_steps = _with_steps(sde, n_steps)
  checks.check_time('eps', eps, sde.T)

  # One step on a 1x1 stand-in, traced only: a discrete table the grid cannot hold (VP betas
  # with few steps) or a predictor the SDE lacks raises now, not inside the first call.
  # The predictor goes first so that its errors (the more specific ones) come first.
  def one_step(x, t):
    key = jax.random.key(0)
    score_fn = lambda x, t: -x
    x, _ = predictor_step(key, x, t, score_fn, sde, predictor=predictor,
                          probability_flow=probability_flow)
    return corrector_step(key, x, t, score_fn, sde, corrector=corrector, snr=1.0,
                          n_steps=n_corrector_steps)

  jax.eval_shape(one_step, jax.ShapeDtypeStruct((1, 1), jnp.float32),
                 jax.ShapeDtypeStruct((1,), jnp.float32))
  return sde, n_steps


def _check_ode(sde: sde_lib.SDE, *, method: str, rtol: float, atol: float, eps: float,
               n_steps: int | None, **_) -> int:
  """Checks `ode_sample`'s arguments before tracing; returns the fixed-step count."""
  n_steps = sde.N if n_steps is None else n_steps
  ode_lib.check_solver_arguments(method, rtol=rtol, atol=atol, n_steps=n_steps)
  checks.check_time('eps', eps, sde.T)
  return n_steps


def pc_nfe(predictor: str, corrector: str, n_corrector_steps: int, n_steps: int) -> int:
  """The exact number of score evaluations of one PC sampling run."""
  predictor_cost = 0 if predictor == 'none' else 1
  corrector_cost = 0 if corrector == 'none' else n_corrector_steps
  return n_steps * (predictor_cost + corrector_cost)


def pc_step(
    key: Array, x: Array, t: Array, t_next: Array, score_fn: ScoreFn, sde: sde_lib.SDE, *,
    predictor: str, corrector: str, snr: float, n_corrector_steps: int,
    probability_flow: bool,
    constrain: Callable[[Array, Array, Array, Array], tuple[Array, Array]] | None = None,
) -> tuple[Array, Array]:
  """One PC step at grid time `t [B]`: the correctors, then the predictor (traceable).

  `constrain(key, x, x_mean, t) -> (x, x_mean)`, when given, runs after the correctors (at
  `t`) and after the predictor (at `t_next`, the time the sample has reached), each time with
  a key of its own; conditional samplers (`scorejax.conditional`) put their observations back
  there. Without it, `t_next` is not used.

  Returns:
    `(x, x_mean)` after the predictor.
  """
  corrector_key, predictor_key = jax.random.split(key)
  x, x_mean = corrector_step(corrector_key, x, t, score_fn, sde, corrector=corrector,
                             snr=snr, n_steps=n_corrector_steps)
  if constrain is not None:
    x, x_mean = constrain(jax.random.fold_in(key, 0), x, x_mean, t)
  x, x_mean = predictor_step(predictor_key, x, t, score_fn, sde, predictor=predictor,
                             probability_flow=probability_flow)
  if constrain is not None:
    x, x_mean = constrain(jax.random.fold_in(key, 1), x, x_mean, t_next)
  return x, x_mean


def pc_loop(key: Array, x: Array, sde: sde_lib.SDE, eps: float,
            step: Callable[[Array, Array, Array, Array], tuple[Array, Array]],
            ) -> tuple[Array, Array]:
  """The loop over the PC grid `linspace(T, eps, sde.N)` from `x` at time `T`: traceable, not
  jitted (the samplers jit it whole).

  Step `i` is `step(fold_in(key, i), x, t_i, t_{i+1}) -> (x, x_mean)` with `t [B]` (`t_{i+1}`
  is `eps` after the last step), e.g. `pc_step` with its options bound.

  Returns:
    `(x, x_mean)` after the last step.
  """
  timesteps = pc_times(sde, eps)

  def body(i, carry):
    x, _ = carry
    t = jnp.full((x.shape[0],), timesteps[i])
    t_next = jnp.full_like(t, timesteps[jnp.minimum(i + 1, sde.N - 1)])
    return step(jax.random.fold_in(key, i), x, t, t_next)

  return jax.lax.fori_loop(0, sde.N, body, (x, x))


def pc_times(sde: sde_lib.SDE, eps: float) -> Array:
  """The PC grid `linspace(T, eps, N)` (score_sde's)."""
  return jnp.linspace(sde.T, eps, sde.N)


@functools.partial(
    jax.jit,
    static_argnames=('score_fn', 'shape', 'predictor', 'corrector', 'n_corrector_steps',
                     'denoise', 'probability_flow'),
)
def _pc_sample(key, score_fn, sde, shape, predictor, corrector, snr, n_corrector_steps,
               denoise, eps, probability_flow):
  prior_key, loop_key = jax.random.split(key)
  x = sde.prior_sampling(prior_key, shape)
  step = functools.partial(pc_step, score_fn=score_fn, sde=sde, predictor=predictor,
                           corrector=corrector, snr=snr, n_corrector_steps=n_corrector_steps,
                           probability_flow=probability_flow)
  x, x_mean = pc_loop(loop_key, x, sde, eps, step)
  return x_mean if denoise else x


def pc_sample(
    key: Array,
    score_fn: ScoreFn,
    sde: sde_lib.SDE,
    shape: tuple[int, ...],
    *,
    predictor: str = 'reverse_diffusion',
    corrector: str = 'langevin',
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    n_steps: int | None = None,
    denoise: bool = True,
    eps: float = 1e-3,
    probability_flow: bool = False,
) -> tuple[Array, int]:
  """Predictor-corrector sampling from the prior at `T` down to `eps`, in one jitted loop.

  At each of the `n_steps` times `linspace(T, eps, n_steps)`: `n_corrector_steps` corrector
  steps, then one predictor step. With `denoise`, the last predictor step's `x_mean` (the
  update without its noise) is returned (score_sde's `noise_removal`). Step `i` draws its
  noise from `fold_in(key, i)`; the whole run is a deterministic function of `key`.

  Args:
    key: PRNG key.
    score_fn: `score_fn(x [B, ...], t [B]) -> [B, ...]`; a static argument of the jitted
      loop (a new closure recompiles; use `make_pc_sampler` to pass parameters instead).
    sde: the forward SDE. When `n_steps != sde.N` it is rebuilt with `N = n_steps`, so the
      discrete tables (reverse diffusion, ancestral, Langevin alphas) follow the grid.
    shape: `[B, ...]` of the samples (images NHWC).
    predictor: a key of `PREDICTORS`.
    corrector: a key of `CORRECTORS`.
    snr: signal-to-noise ratio of the corrector step size.
    n_corrector_steps: corrector steps per time.
    n_steps: number of times of the grid; `None` means `sde.N`.
    denoise: return the noise-free mean of the last step.
    eps: the last time (the ODE/SDE is not integrated to 0, where scores blow up).
    probability_flow: predictors follow the probability-flow ODE instead of the reverse SDE.

  Returns:
    `(samples [B, ...], nfe)`, with `nfe` the number of score evaluations (a Python int).

  Raises:
    ValueError: for an unknown predictor or corrector (listing the valid ones), an
      unsupported combination (ancestral sampling on sub-VP), a number out of its range
      (`snr < 0`, `n_corrector_steps < 0`, `n_steps < 1`, `eps` outside `(0, T)`), or a VP /
      sub-VP grid too coarse for the DDPM tables a step reads (`sde.discrete_betas`).
  """
  sde, n_steps = check_pc_options(sde, predictor=predictor, corrector=corrector, snr=snr,
                                  n_corrector_steps=n_corrector_steps, n_steps=n_steps,
                                  eps=eps, probability_flow=probability_flow)
  samples = _pc_sample(key, score_fn, sde, tuple(shape), predictor, corrector, snr,
                       n_corrector_steps, denoise, eps, probability_flow)
  return samples, pc_nfe(predictor, corrector, n_corrector_steps, n_steps)


def make_pc_sampler(
    score_fn_builder: Callable[[Params], ScoreFn],
    sde: sde_lib.SDE,
    shape: tuple[int, ...],
    **kwargs: Any,
) -> Callable[[Array, Params], tuple[Array, int]]:
  """A jitted `sample_fn(key, params) -> (samples, nfe)` for repeated sampling.

  Parameters are traced arguments (not constants baked into the program), so one
  compilation serves every call, e.g. as checkpoints or EMA parameters change.

  Args:
    score_fn_builder: `params -> score_fn`, e.g. `lambda p: make_score_fn(partial(model.apply,
      p), sde)`.
    sde: the forward SDE.
    shape: `[B, ...]` of the samples.
    **kwargs: keyword arguments of `pc_sample`.

  Returns:
    The sampler; `nfe` is a Python int.

  Raises:
    ValueError: for the arguments `pc_sample` rejects (checked now, not at the first call).
    TypeError: for a keyword argument `pc_sample` does not take.
  """
  options = checks.keyword_arguments(pc_sample, kwargs)
  _, n_steps = check_pc_options(sde, **options)
  nfe = pc_nfe(options['predictor'], options['corrector'], options['n_corrector_steps'], n_steps)

  @jax.jit
  def sample(key, params):
    return pc_sample(key, score_fn_builder(params), sde, shape, **kwargs)[0]

  return lambda key, params: (sample(key, params), nfe)


def _probability_flow_drift(score_fn: ScoreFn, sde: sde_lib.SDE, batch: int):
  reverse = sde.reverse(score_fn, probability_flow=True)
  return lambda t, x: reverse.sde(x, jnp.full((batch,), t, x.dtype))[0]


@functools.partial(jax.jit, static_argnames=('score_fn', 'shape', 'method', 'n_steps',
                                             'denoise'))
def _ode_sample(key, score_fn, sde, shape, rtol, atol, eps, method, n_steps, denoise):
  prior_key, denoise_key = jax.random.split(key)
  x = sde.prior_sampling(prior_key, shape)
  drift_fn = _probability_flow_drift(score_fn, sde, shape[0])
  x, nfe = ode_lib.solve_ode(drift_fn, x, sde.T, eps, method=method, rtol=rtol, atol=atol,
                             n_steps=n_steps)
  if denoise:
    noise = jax.random.normal(denoise_key, shape, x.dtype)
    x = reverse_diffusion_update(x, jnp.full((shape[0],), eps), noise, score_fn, sde)[1]
    nfe = nfe + 1
  return x, nfe


def ode_sample(
    key: Array,
    score_fn: ScoreFn,
    sde: sde_lib.SDE,
    shape: tuple[int, ...],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-3,
    method: str = 'tsit5',
    n_steps: int | None = None,
    denoise: bool = False,
) -> tuple[Array, Array]:
  """Samples by integrating the probability-flow ODE (Eq. 13) from `T` to `eps`, in `jit`.

  `dx/dt = f(x, t) - g(t)^2 score(x, t) / 2`, started from `sde.prior_sampling`. Adaptive
  methods (`'rk45'`: scipy's controller, same NFE; `'tsit5'`, `'dopri5'`: diffrax) use
  `rtol` / `atol` with an RMS error norm over the whole batch state, as scipy's RK45 in the
  reference; `'euler'` / `'heun'` take `n_steps` uniform steps.

  Args:
    key: PRNG key (prior sample; denoising noise, unused by `x_mean`).
    score_fn: `score_fn(x [B, ...], t [B]) -> [B, ...]` (static argument of the program).
    sde: the forward SDE.
    shape: `[B, ...]` of the samples.
    rtol: relative tolerance.
    atol: absolute tolerance.
    eps: the final time.
    method: a key of `ODE_METHODS`.
    n_steps: steps of the fixed-step methods; `None` means `sde.N`.
    denoise: finish with one reverse-diffusion step at `eps` returning its mean (1 NFE), as
      the reference's `denoise=True` (off by default there too).

  Returns:
    `(samples [B, ...], nfe)`, `nfe` an int32 scalar array: the exact number of score
    evaluations.

  Raises:
    ValueError: for an unknown method (listing the valid ones), `eps` outside `(0, T)`, or
      bad solver arguments (`scorejax.ode.check_solver_arguments`).
  """
  n_steps = _check_ode(sde, method=method, rtol=rtol, atol=atol, eps=eps, n_steps=n_steps)
  return _ode_sample(key, score_fn, sde, tuple(shape), rtol, atol, eps, method, n_steps,
                     denoise)


def make_ode_sampler(
    score_fn_builder: Callable[[Params], ScoreFn],
    sde: sde_lib.SDE,
    shape: tuple[int, ...],
    **kwargs: Any,
) -> Callable[[Array, Params], tuple[Array, Array]]:
  """A jitted `sample_fn(key, params) -> (samples, nfe)`; see `make_pc_sampler`.

  Raises:
    ValueError: for the arguments `ode_sample` rejects (checked now).
    TypeError: for a keyword argument `ode_sample` does not take.
  """
  _check_ode(sde, **checks.keyword_arguments(ode_sample, kwargs))
  return jax.jit(lambda key, params: ode_sample(key, score_fn_builder(params), sde, shape,
                                                **kwargs))
