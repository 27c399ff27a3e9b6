"""In-graph ODE solving for the probability-flow ODE (sampling and likelihood).

Owns `solve_ode(vector_field, y0, t0, t1, ...) -> (y1, nfe)` and the `ODE_METHODS` dict:
adaptive embedded Runge-Kutta solvers from diffrax (`'tsit5'`, `'dopri5'`) with a
`PIDController(rtol, atol)`, and fixed-step `'euler'` / `'heun'` written as a `lax.fori_loop`.
Everything stays inside `jit`: no host round trip per step, unlike the reference's
`scipy.integrate.solve_ivp`.

Counting function evaluations (NFE). Tsit5 and Dopri5 have 7 stages with the FSAL property
(first-same-as-last): the vector field is evaluated once at `t0` when the solver starts,
then 6 times per step attempt, accepted or rejected (diffrax's `stats['num_steps']` counts
both). So `nfe = 1 + 6 * num_steps`, which `tests/test_sampling.py` checks against a
host-side counter incremented inside the vector field. The error norm is the RMS over the
whole state (all samples of the batch together), as in scipy's RK45, so tolerances mean the
same thing as in the reference. Fixed-step Euler costs `n_steps` evaluations, Heun (explicit
trapezoid) `2 n_steps`.

References:
  Song et al. 2021, ICLR, Eq. (13) probability-flow ODE, Appendix D.1-D.2.
  Tsitouras 2011, "Runge-Kutta pairs of order 5(4) satisfying only the first column
  simplifying assumption"; Dormand & Prince 1980.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from scorejax import checks

Array = jax.Array
PyTree = Any
VectorField = Callable[[Array, PyTree], PyTree]


@dataclasses.dataclass(frozen=True)
class _Adaptive:
  solver_cls: type
  evals_per_step: int  # new evaluations per step attempt (FSAL: stages - 1)
  init_evals: int  # evaluations before the first step


@dataclasses.dataclass(frozen=True)
class _Fixed:
  evals_per_step: int


@dataclasses.dataclass(frozen=True)
class _ScipyRK45:
  evals_per_step: int = 6  # FSAL Dormand-Prince: 6 new evaluations per attempt
  init_evals: int = 2  # f(t0, y0) and the initial step selection's probe


ODE_METHODS: dict[str, _Adaptive | _Fixed | _ScipyRK45] = {
    'rk45': _ScipyRK45(),
    'tsit5': _Adaptive(diffrax.Tsit5, evals_per_step=6, init_evals=1),
    'dopri5': _Adaptive(diffrax.Dopri5, evals_per_step=6, init_evals=1),
    'euler': _Fixed(evals_per_step=1),
    'heun': _Fixed(evals_per_step=2),
}


def get_ode_method(method: str) -> _Adaptive | _Fixed | _ScipyRK45:
  """Looks up `method` in `ODE_METHODS`.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  if method not in ODE_METHODS:
    raise ValueError(f'unknown ODE method {method!r}; valid choices: {sorted(ODE_METHODS)}')
  return ODE_METHODS[method]


def check_solver_arguments(method: str, *, rtol: float, atol: float, n_steps: int,
                           max_steps: int = 16384) -> None:
  """Checks `solve_ode`'s arguments before anything is traced.

  Raises:
    ValueError: for an unknown method (listing the valid ones); for the fixed-step methods, an
      `n_steps` below 1; for the adaptive ones, negative tolerances or both 0, or a
      `max_steps` below 1.
  """
  spec = get_ode_method(method)
  if isinstance(spec, _Fixed):
    checks.check_count('n_steps', n_steps)
  else:
    checks.check_tolerances(rtol, atol)
    checks.check_count('max_steps', max_steps)


def _fixed_step_solve(vector_field, y0, t0, t1, n_steps, heun):
  times = jnp.linspace(t0, t1, n_steps + 1)

  def body(i, y):
    t, t_next = times[i], times[i + 1]
    dt = t_next - t
    dy = vector_field(t, y)
    y_euler = jax.tree.map(lambda a, b: a + dt * b, y, dy)
    if not heun:
      return y_euler
    dy_next = vector_field(t_next, y_euler)
    return jax.tree.map(lambda a, b, c: a + 0.5 * dt * (b + c), y, dy, dy_next)

  return jax.lax.fori_loop(0, n_steps, body, y0)


# Dormand-Prince 5(4), scipy's `RK45` tableau. Row 6 of `_DP_A` is the 5th-order weights, so
# the 7th stage is `f(t + h, y_new)` (first-same-as-last).
_DP_C = np.array([0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1])
_DP_A = np.zeros((7, 7))
_DP_A[1, :1] = [1 / 5]
_DP_A[2, :2] = [3 / 40, 9 / 40]
_DP_A[3, :3] = [44 / 45, -56 / 15, 32 / 9]
_DP_A[4, :4] = [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729]
_DP_A[5, :5] = [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]
_DP_A[6, :6] = [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]
_DP_E = np.array([-71 / 57600, 0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40])
_SAFETY, _MIN_FACTOR, _MAX_FACTOR, _ERROR_EXPONENT = 0.9, 0.2, 10.0, -1 / 5


def _rms_norm(tree: PyTree) -> Array:
  leaves = jax.tree.leaves(tree)
  size = sum(leaf.size for leaf in leaves)
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in leaves) / size)


def _scaled(error: PyTree, y: PyTree, y_new: PyTree, rtol: float, atol: float) -> PyTree:
  return jax.tree.map(
      lambda e, a, b: e / (atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b))), error, y, y_new)


def _combine(y: PyTree, h: Array, weights: Array, stages: PyTree) -> PyTree:
  """`y + h sum_j weights[j] stages[j]`, stages stacked on a leading axis of size 7."""
  return jax.tree.map(
      lambda a, k: a + (h * jnp.tensordot(weights.astype(k.dtype), k, axes=1)).astype(a.dtype),
      y, stages)


def rk45_solve(
    vector_field: VectorField,
    y0: PyTree,
    t0: float,
    t1: float,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 16384,
) -> tuple[PyTree, Array]:
  """In-graph Dormand-Prince 5(4) with the step-size control of `scipy.integrate.RK45`.

  The same method, initial step (Hairer's `select_initial_step`), error norm (RMS over every
  component of the state of `error / (atol + rtol max(|y|, |y_new|))`) and I-controller
  (`factor = 0.9 err^(-1/5)` clipped to `[0.2, 10]`, no growth right after a rejection) as
  scipy, in a `lax.while_loop`, so a run takes the steps the reference's host loop takes
  (up to float32 rounding of the state) without leaving the device. The stages run in an
  inner `fori_loop` so the vector field is compiled once, not seven times.

  NFE is `2 + 6 * attempts`, exactly scipy's `nfev`: `f(t0, y0)`, one probe of the initial
  step selection, then six evaluations per step attempt (FSAL).

  Args:
    vector_field: `(t scalar, y pytree) -> dy/dt`.
    y0: the initial state (a pytree of float arrays).
    t0: the initial time.
    t1: the final time (either direction).
    rtol: relative tolerance.
    atol: absolute tolerance.
    max_steps: the most step attempts; past it the state is returned as NaN.

  Returns:
    `(y1, nfe)`, `nfe` an int32 scalar.

  References:
    Dormand & Prince 1980; Hairer, Norsett & Wanner, Solving ODEs I, Sec. II.4 (initial
    step size); scipy `integrate/_ivp/rk.py` (the controller reproduced here).
  """
  dtype = jax.tree.leaves(y0)[0].dtype
  t0, t1 = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)
  direction = jnp.sign(t1 - t0)
  interval = jnp.abs(t1 - t0)
  f0 = vector_field(t0, y0)

  # Initial step (Hairer et al. II.4), with scipy's constants; order + 1 = 5.
  scale = jax.tree.map(lambda y: atol + rtol * jnp.abs(y), y0)
  divide = lambda a, b: jax.tree.map(jnp.divide, a, b)
  d0, d1 = _rms_norm(divide(y0, scale)), _rms_norm(divide(f0, scale))
  h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-30))
  h0 = jnp.minimum(h0, interval)
  f_probe = vector_field(t0 + direction * h0, jax.tree.map(lambda y, f: y + direction * h0 * f,
                                                           y0, f0))
  d2 = _rms_norm(divide(jax.tree.map(jnp.subtract, f_probe, f0), scale)) / h0
  h1 = jnp.where((d1 <= 1e-15) & (d2 <= 1e-15), jnp.maximum(1e-6, h0 * 1e-3),
                 (0.01 / jnp.maximum(jnp.maximum(d1, d2), 1e-30)) ** (1 / 5))
  h_abs = jnp.minimum(jnp.minimum(100 * h0, h1), interval).astype(dtype)

  c, a, e = jnp.asarray(_DP_C, dtype), jnp.asarray(_DP_A, dtype), jnp.asarray(_DP_E, dtype)

  def attempt(carry):
    t, y, f, h_abs, rejected, attempts, _ = carry
    min_step = 10 * jnp.abs(jnp.nextafter(t, t + direction) - t)
    h_abs = jnp.maximum(h_abs, min_step)
    t_new = jnp.where(direction * (t + direction * h_abs - t1) > 0, t1, t + direction * h_abs)
    h = t_new - t
    stages = jax.tree.map(lambda leaf: jnp.zeros((7,) + leaf.shape, leaf.dtype).at[0].set(leaf),
                          f)

    def stage(s, stages):
      y_s = _combine(y, h, a[s], stages)
      f_s = vector_field(t + c[s] * h, y_s)
      return jax.tree.map(lambda k, v: k.at[s].set(v), stages, f_s)

    stages = jax.lax.fori_loop(1, 7, stage, stages)
    y_new = _combine(y, h, a[6], stages)
    error = jax.tree.map(lambda k: h * jnp.tensordot(e.astype(k.dtype), k, axes=1), stages)
    error_norm = _rms_norm(_scaled(error, y, y_new, rtol, atol))
    accept = error_norm < 1
    factor = _SAFETY * jnp.maximum(error_norm, 1e-30) ** _ERROR_EXPONENT
    grow = jnp.where(error_norm == 0, _MAX_FACTOR, jnp.minimum(_MAX_FACTOR, factor))
    grow = jnp.where(rejected, jnp.minimum(1.0, grow), grow)
    h_next = jnp.abs(h) * jnp.where(accept, grow, jnp.maximum(_MIN_FACTOR, factor))
    keep = lambda new, old: jax.tree.map(lambda u, v: jnp.where(accept, u, v), new, old)
    f_new = jax.tree.map(lambda k: k[6], stages)
    return (jnp.where(accept, t_new, t), keep(y_new, y), keep(f_new, f), h_next.astype(dtype),
            ~accept, attempts + 1, accept & (t_new == t1))

  def not_done(carry):
    return (~carry[-1]) & (carry[5] < max_steps)

  init = (t0, y0, f0, h_abs, jnp.asarray(False), jnp.asarray(0, jnp.int32), t0 == t1)
  _, y1, _, _, _, attempts, done = jax.lax.while_loop(not_done, attempt, init)
  y1 = jax.tree.map(lambda y: jnp.where(done, y, jnp.nan), y1)
  return y1, (2 + 6 * attempts).astype(jnp.int32)


def solve_ode(
    vector_field: VectorField,
    y0: PyTree,
    t0: float,
    t1: float,
    *,
    method: str = 'tsit5',
    rtol: float = 1e-5,
    atol: float = 1e-5,
    n_steps: int = 1000,
    max_steps: int = 16384,
) -> tuple[PyTree, Array]:
  """Integrates `dy/dt = vector_field(t, y)` from `t0` to `t1` (either direction), in-graph.

  Args:
    vector_field: `(t scalar, y pytree) -> dy/dt` with the structure of `y`.
    y0: the initial state (any pytree of float arrays).
    t0: the initial time.
    t1: the final time (`t1 < t0` integrates backwards).
    method: a key of `ODE_METHODS`.
    rtol: relative tolerance of the adaptive solvers.
    atol: absolute tolerance of the adaptive solvers.
    n_steps: number of steps of the fixed-step methods.
    max_steps: step budget of the adaptive solvers: a solve that needs more step attempts
      returns a NaN state (every method, so that a run inside `jit` never stops on an error).

  Returns:
    `(y1, nfe)`: the state at `t1` and the number of vector-field evaluations (int32 scalar).

  Raises:
    ValueError: for bad arguments (`check_solver_arguments`).
  """
  check_solver_arguments(method, rtol=rtol, atol=atol, n_steps=n_steps, max_steps=max_steps)
  spec = get_ode_method(method)
  if isinstance(spec, _ScipyRK45):
    return rk45_solve(vector_field, y0, t0, t1, rtol=rtol, atol=atol, max_steps=max_steps)
  if isinstance(spec, _Fixed):
    y1 = _fixed_step_solve(vector_field, y0, t0, t1, n_steps, heun=spec.evals_per_step == 2)
    return y1, jnp.asarray(spec.evals_per_step * n_steps, jnp.int32)
  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(lambda t, y, args: vector_field(t, y)),
      spec.solver_cls(),
      t0=t0,
      t1=t1,
      dt0=None,
      y0=y0,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True),
      max_steps=max_steps,
      throw=False,
  )
  solved = solution.result == diffrax.RESULTS.successful
  y1 = jax.tree.map(lambda y: jnp.where(solved, y[-1], jnp.nan), solution.ys)
  nfe = spec.init_evals + spec.evals_per_step * solution.stats['num_steps']
  return y1, jnp.asarray(nfe, jnp.int32)
