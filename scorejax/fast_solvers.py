"""Few-step samplers of the probability-flow ODE: DDIM, DPM-Solver and DPM-Solver++.

Owns `fast_sample(key, score_fn, sde, shape, *, method='dpmpp_2m', n_steps=20, ...)
-> (samples, nfe)`, its builder `make_fast_sampler` (one jitted function of `(key, params)`,
as `scorejax.sampling`'s builders), `FAST_METHODS` and `TIME_GRIDS`.

Every SDE of `scorejax.sde` has a Gaussian kernel `x_t = alpha_t x_0 + sigma_t z` (VE:
`alpha_t = 1`), and its probability-flow ODE is semi-linear. In the log signal-to-noise time
`lambda_t = log(alpha_t / sigma_t)` (increasing as `t` goes from `T` to 0), with
`h = lambda_t - lambda_s` from a time `s` to a later-in-sampling time `t < s`, its exact
solution is, for the noise prediction `eps(x, t) = -sigma_t score(x, t)` and the data
prediction `x0(x, t) = (x + sigma_t^2 score(x, t)) / alpha_t`:

  x_t = (alpha_t / alpha_s) x_s - sigma_t int_0^h e^(h - u) eps(lambda_s + u) du
      = (sigma_t / sigma_s) x_s + alpha_t int_0^h e^(u - h) x0(lambda_s + u) du.

The linear part is integrated exactly; the methods differ in how they approximate the
prediction under the integral:

- `'ddim'`: constant (DPM-Solver-1 = DDIM with eta = 0), 1 NFE per step, first order.
- `'dpm_solver_2'`, `'dpm_solver_3'`: single-step DPM-Solver with the noise prediction and
  intermediate points at `lambda_s + r h` (r = 1/2; r = 1/3, 2/3), 2 / 3 NFE per step,
  orders 2 / 3 (Lu et al. 2022a, Algorithms 1 and 2 / Appendix A).
- `'dpmpp_2m'`, `'dpmpp_3m'`: multistep DPM-Solver++ with the data prediction, reusing the
  predictions of the previous steps, 1 NFE per step, orders 2 / 3. `'dpmpp_2m'` is
  Algorithm 2 of Lu et al. 2022b exactly; `'dpmpp_3m'` integrates the Taylor expansion of
  the quadratic through the last three predictions exactly (its terms `phi_1`, `h phi_2`,
  `-h^2 phi_3`, below). The first steps use the orders the history allows (1, then 2).

Time grids (`TIME_GRIDS`) from `T` to `eps`: `'logsnr'` (uniform in `lambda`, the DPM-Solver
papers' choice), `'karras'` (uniform in `sigma^(1/7)` with `sigma = sigma_t / alpha_t =
exp(-lambda)`, the grid of Karras et al. 2022, Eq. 5, denser near `eps`), `'uniform'`
(uniform in `t`), `'quadratic'` (uniform in `sqrt(t)`, denser near `eps`). Times of given
`lambda` (log-SNR and Karras grids, single-step intermediate points) are found by bisection
of the SDE's own `marginal_prob`, so any SDE with a Gaussian kernel works, and the grid is
computed once before the loop.

The sampler is one jitted program (a `lax.fori_loop` over the steps). NFE is exact:
`n_steps` (multistep) or `order * n_steps` (single-step), plus one with `denoise` (the final
data prediction `x0(x_eps, eps)`, Tweedie's formula).

References:
  Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM), ICLR.
  Lu et al. 2022a, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model
  Sampling in Around 10 Steps", NeurIPS.
  Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
  Probabilistic Models", arXiv:2211.01095.
  Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
  (EDM), NeurIPS: the `'karras'` grid.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from scorejax import checks
from scorejax import sde as sde_lib

Array = jax.Array
Params = Any
ScoreFn = Callable[[Array, Array], Array]

__all__ = ['FAST_METHODS', 'TIME_GRIDS', 'fast_nfe', 'fast_sample', 'kernel', 'log_snr',
           'make_fast_sampler', 'sampling_times', 'time_of_log_snr']


@dataclasses.dataclass(frozen=True)
class FastMethod:
  order: int
  multistep: bool  # multistep: data prediction, 1 NFE per step; else noise, `order` NFE


FAST_METHODS: dict[str, FastMethod] = {
    'ddim': FastMethod(order=1, multistep=True),
    'dpm_solver_2': FastMethod(order=2, multistep=False),
    'dpm_solver_3': FastMethod(order=3, multistep=False),
    'dpmpp_2m': FastMethod(order=2, multistep=True),
    'dpmpp_3m': FastMethod(order=3, multistep=True),
}
TIME_GRIDS = ('karras', 'logsnr', 'quadratic', 'uniform')
KARRAS_RHO = 7.0  # Karras et al. 2022, Eq. (5)
_BISECTION_STEPS = 40  # halves [eps, T] to below float32 resolution


def _get_method(method: str) -> FastMethod:
  if method not in FAST_METHODS:
    raise ValueError(f'unknown fast sampling method {method!r}; valid choices: '
                     f'{sorted(FAST_METHODS)}')
  return FAST_METHODS[method]


def kernel(sde: sde_lib.SDE, t: Array) -> tuple[Array, Array]:
  """`(alpha_t, sigma_t)` of the kernel `x_t = alpha_t x_0 + sigma_t z`, shaped like `t`."""
  t = jnp.asarray(t, jnp.float32)
  flat = t.reshape(-1)
  mean, std = sde.marginal_prob(jnp.ones((flat.shape[0], 1), jnp.float32), flat)
  return mean[:, 0].reshape(t.shape), jnp.broadcast_to(std, flat.shape).reshape(t.shape)


def log_snr(sde: sde_lib.SDE, t: Array) -> Array:
  """`lambda_t = log(alpha_t / sigma_t)`, decreasing in `t`; shaped like `t`."""
  alpha, sigma = kernel(sde, t)
  return jnp.log(alpha) - jnp.log(sigma)


def time_of_log_snr(sde: sde_lib.SDE, lam: Array, low: Array | float, high: Array | float
                    ) -> Array:
  """The times `t` in `[low, high]` with `log_snr(sde, t) = lam`, by bisection (any shape)."""
  lam = jnp.asarray(lam, jnp.float32)
  low = jnp.full(lam.shape, low, jnp.float32)
  high = jnp.full(lam.shape, high, jnp.float32)

  def halve(_, bounds):
    low, high = bounds
    mid = 0.5 * (low + high)
    too_early = log_snr(sde, mid) > lam  # lambda decreases in t: the root is later
    return jnp.where(too_early, mid, low), jnp.where(too_early, high, mid)

  low, high = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, (low, high))
  return 0.5 * (low + high)


def sampling_times(sde: sde_lib.SDE, n_steps: int, eps: Array | float, kind: str = 'logsnr',
                   rho: float = KARRAS_RHO) -> Array:
  """`[n_steps + 1]` decreasing times from `sde.T` to `eps` (see `TIME_GRIDS`; `rho` is the
  exponent of the `'karras'` grid, 1 = uniform in the noise level)."""
  if kind == 'uniform':
    return jnp.linspace(sde.T, eps, n_steps + 1)
  if kind == 'quadratic':
    return jnp.linspace(jnp.sqrt(sde.T), jnp.sqrt(eps), n_steps + 1) ** 2
  if kind in ('logsnr', 'karras'):
    ends = log_snr(sde, jnp.stack([jnp.asarray(sde.T, jnp.float32), jnp.asarray(eps)]))
    if kind == 'logsnr':
      lams = jnp.linspace(ends[0], ends[1], n_steps + 1)
    else:  # uniform in sigma^(1 / rho), sigma = exp(-lambda) (EDM's noise level)
      roots = jnp.linspace(jnp.exp(-ends[0] / rho), jnp.exp(-ends[1] / rho), n_steps + 1)
      lams = -rho * jnp.log(roots)
    times = time_of_log_snr(sde, lams, eps, sde.T)
    return times.at[0].set(sde.T).at[-1].set(eps)  # the ends exactly
  raise ValueError(f'unknown time_grid {kind!r}; valid choices: {list(TIME_GRIDS)}')


def fast_nfe(method: str, n_steps: int, denoise: bool = False) -> int:
  """The exact number of score evaluations of one `fast_sample` run."""
  spec = _get_method(method)
  return n_steps * (1 if spec.multistep else spec.order) + int(denoise)


def _check(sde: sde_lib.SDE, *, method: str, n_steps: int, time_grid: str, eps: float,
           **_) -> FastMethod:
  spec = _get_method(method)
  if time_grid not in TIME_GRIDS:
    raise ValueError(f'unknown time_grid {time_grid!r}; valid choices: {list(TIME_GRIDS)}')
  checks.check_count('n_steps', n_steps)
  checks.check_time('eps', eps, sde.T)
  return spec


class _Predictions:
  """The score as noise / data predictions at a scalar time, on a `[B, ...]` batch."""

  def __init__(self, score_fn: ScoreFn, sde: sde_lib.SDE):
    self.score_fn, self.sde = score_fn, sde

  def _score(self, x: Array, t: Array) -> tuple[Array, Array, Array]:
    alpha, sigma = kernel(self.sde, t)
    score = sde_lib.evaluate_score(self.score_fn, x, jnp.full((x.shape[0],), t, x.dtype))
    return score, alpha, sigma

  def noise(self, x: Array, t: Array) -> Array:
    score, _, sigma = self._score(x, t)
    return -sigma * score

  def data(self, x: Array, t: Array) -> Array:
    score, alpha, sigma = self._score(x, t)
    return (x + sigma**2 * score) / alpha


def _single_step(predict: _Predictions, sde, x, s, t, inner, order):
  """One DPM-Solver step from `s` to `t` with the noise prediction; `inner`: `[order - 1]`."""
  alpha_s, sigma_s = kernel(sde, s)
  alpha_t, sigma_t = kernel(sde, t)
  lam_s, lam_t = log_snr(sde, s), log_snr(sde, t)
  h = lam_t - lam_s
  eps_s = predict.noise(x, s)
  x_t = (alpha_t / alpha_s) * x - sigma_t * jnp.expm1(h) * eps_s
  if order == 1:
    return x_t

  def first_order_to(time):  # the DDIM step from s to an intermediate time
    alpha, sigma = kernel(sde, time)
    r_h = log_snr(sde, time) - lam_s
    return (alpha / alpha_s) * x - sigma * jnp.expm1(r_h) * eps_s, alpha, sigma, r_h

  u1, *_ = first_order_to(inner[0])
  d1 = predict.noise(u1, inner[0]) - eps_s
  if order == 2:  # r1 = 1/2 (Algorithm 1)
    return x_t - sigma_t * jnp.expm1(h) * d1  # sigma_t / (2 r1) (e^h - 1) D1
  # order 3, r1 = 1/3, r2 = 2/3 (Algorithm 2)
  r1, r2 = 1.0 / 3.0, 2.0 / 3.0
  u2, _, sigma_2, r2_h = first_order_to(inner[1])
  u2 = u2 - sigma_2 * (r2 / r1) * (jnp.expm1(r2_h) / r2_h - 1.0) * d1
  d2 = predict.noise(u2, inner[1]) - eps_s
  return x_t - (sigma_t / r2) * (jnp.expm1(h) / h - 1.0) * d2


def _multistep_update(x, m, lams, h, sigma_ratio, alpha_t, order):
  """The DPM-Solver++ update of order `order` from the data predictions `m[0]` (newest),
  `m[1]`, `m[2]` at log-SNRs `lams[0..2]`, over the step `h`."""
  phi_1 = jnp.expm1(-h)
  x_t = sigma_ratio * x - alpha_t * phi_1 * m[0]
  if order == 1:
    return x_t
  h0 = lams[0] - lams[1]
  if order == 2:  # Algorithm 2: D = (1 + 1/(2r)) m0 - 1/(2r) m1, r = h0 / h
    return x_t - alpha_t * phi_1 * (h / (2.0 * h0)) * (m[0] - m[1])
  # order 3: Newton form of the quadratic through the three predictions, its first and
  # second derivatives at lams[0], integrated exactly against e^(u - h).
  h1 = lams[1] - lams[2]
  d1_0, d1_1 = (m[0] - m[1]) / h0, (m[1] - m[2]) / h1
  d2 = (d1_0 - d1_1) / (h0 + h1)
  derivative, second_derivative = d1_0 + d2 * h0, 2.0 * d2
  phi_2 = phi_1 / h + 1.0
  phi_3 = phi_2 / h - 0.5
  return x_t + alpha_t * h * phi_2 * derivative - alpha_t * h**2 * phi_3 * second_derivative


def _multistep_solve(predict: _Predictions, sde, x, times, order):
  n_steps = times.shape[0] - 1
  lams = log_snr(sde, times)

  def body(i, carry):
    x, m1, m2, lam1, lam2 = carry
    s, t = times[i], times[i + 1]
    m0 = predict.data(x, s)
    alpha_t, sigma_t = kernel(sde, t)
    sigma_s = kernel(sde, s)[1]
    args = (x, (m0, m1, m2), (lams[i], lam1, lam2), lams[i + 1] - lams[i], sigma_t / sigma_s,
            alpha_t)
    x_new = _multistep_update(*args, order=1)
    for k in range(2, order + 1):  # warm-up: order k once k predictions exist
      x_new = jnp.where(i >= k - 1, _multistep_update(*args, order=k), x_new)
    return x_new, m0, m1, lams[i], lam1

  # Before the history exists, placeholders keep the branches not selected finite.
  zeros = jnp.zeros_like(x)
  init = (x, zeros, zeros, lams[0] - 1.0, lams[0] - 2.0)
  return jax.lax.fori_loop(0, n_steps, body, init)[0]


def _single_step_solve(predict: _Predictions, sde, x, times, order):
  lams = log_snr(sde, times)
  fractions = {1: [], 2: [0.5], 3: [1.0 / 3.0, 2.0 / 3.0]}[order]
  inner = [time_of_log_snr(sde, lams[:-1] + r * (lams[1:] - lams[:-1]), times[-1], times[0])
           for r in fractions]
  inner = jnp.stack(inner, axis=1) if inner else jnp.zeros((times.shape[0] - 1, 0))

  def body(i, x):
    return _single_step(predict, sde, x, times[i], times[i + 1], inner[i], order)

  return jax.lax.fori_loop(0, times.shape[0] - 1, body, x)


@functools.partial(jax.jit, static_argnames=('score_fn', 'shape', 'method', 'n_steps',
                                             'time_grid', 'denoise'))
def _fast_sample(key, score_fn, sde, shape, method, n_steps, time_grid, eps, denoise):
  spec = FAST_METHODS[method]
  predict = _Predictions(score_fn, sde)
  x = sde.prior_sampling(jax.random.split(key)[0], shape)  # ode_sample's prior draw
  times = sampling_times(sde, n_steps, eps, time_grid)
  solve = _multistep_solve if spec.multistep else _single_step_solve
  x = solve(predict, sde, x, times, spec.order)
  return predict.data(x, times[-1]) if denoise else x


def fast_sample(
    key: Array,
    score_fn: ScoreFn,
    sde: sde_lib.SDE,
    shape: tuple[int, ...],
    *,
    method: str = 'dpmpp_2m',
    n_steps: int = 20,
    time_grid: str = 'logsnr',
    eps: float = 1e-3,
    denoise: bool = False,
) -> tuple[Array, int]:
  """Samples with a few-step solver of the probability-flow ODE, from `T` to `eps`, in `jit`.

  Args:
    key: PRNG key of the prior sample, drawn as `ode_sample` draws it: for one key, the
      samples converge to `ode_sample`'s as `n_steps` grows (the solvers are deterministic).
    score_fn: `score_fn(x [B, ...], t [B]) -> [B, ...]` (static argument of the program).
    sde: the forward SDE (any with a Gaussian kernel: VE, VP, sub-VP).
    shape: `[B, ...]` of the samples.
    method: a key of `FAST_METHODS`.
    n_steps: steps of the time grid (NFE: `n_steps`, or `order * n_steps` single-step).
    time_grid: one of `TIME_GRIDS`.
    eps: the final time.
    denoise: finish with the data prediction at `eps` (1 NFE).

  Returns:
    `(samples [B, ...], nfe)`, `nfe` a Python int (`fast_nfe`).

  Raises:
    ValueError: for an unknown method or time grid (listing the valid ones), `n_steps < 1`,
      or `eps` outside `(0, T)`.
  """
  _check(sde, method=method, n_steps=n_steps, time_grid=time_grid, eps=eps)
  samples = _fast_sample(key, score_fn, sde, tuple(shape), method, n_steps, time_grid, eps,
                         denoise)
  return samples, fast_nfe(method, n_steps, denoise)


def make_fast_sampler(
    score_fn_builder: Callable[[Params], ScoreFn],
    sde: sde_lib.SDE,
    shape: tuple[int, ...],
    **kwargs: Any,
) -> Callable[[Array, Params], tuple[Array, int]]:
  """A jitted `sample_fn(key, params) -> (samples, nfe)`; see `sampling.make_pc_sampler`.

  Raises:
    ValueError: for the arguments `fast_sample` rejects (checked now).
    TypeError: for a keyword argument `fast_sample` does not take.
  """
  options = checks.keyword_arguments(fast_sample, kwargs)
  _check(sde, **options)
  nfe = fast_nfe(options['method'], options['n_steps'], options['denoise'])

  @jax.jit
  def sample(key, params):
    return fast_sample(key, score_fn_builder(params), sde, shape, **kwargs)[0]

  return lambda key, params: (sample(key, params), nfe)
