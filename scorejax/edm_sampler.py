"""The EDM sampler (Karras et al. 2022, Algorithms 1 and 2): Heun's method in the noise level,
with optional stochastic "churn".

Owns `edm_sample(key, score_fn, sde, shape, *, n_steps=17, rho=7, eps=1e-3, s_churn=0, ...)
-> (samples, nfe)`, its builder `make_edm_sampler` (one jitted function of `(key, params)`, as
`scorejax.sampling`'s builders) and `edm_nfe`.

Every SDE of `scorejax.sde` has a Gaussian kernel `x_t = alpha_t x_0 + sigma_t z`. The scaled
state `y = x / alpha_t` is the data plus Gaussian noise of standard deviation
`s = sigma_t / alpha_t` (EDM's `sigma(t)` with `s(t) = 1`; `s = exp(-lambda_t)` for the
log-SNR `lambda_t` of `scorejax.fast_solvers`), and the probability-flow ODE of any of these
SDEs becomes, in the noise level `s` (EDM Eq. 3 with `sigma(t) = t`),

  dy / ds = (y - D(y; s)) / s = eps(alpha_t y, t),

with `D` the denoiser (the data prediction) and `eps(x, t) = -sigma_t score(x, t)` the noise
prediction of the score network at the time `t` of level `s`. A step from `s_i` to
`s_{i+1} < s_i` on the grid of Karras et al. (Eq. 5: `s^(1/rho)` evenly spaced from `s(T)` to
`s(eps)`, times found by bisection of the SDE's own kernel):

  gamma = min(s_churn / n_steps, sqrt(2) - 1) if s_tmin <= s_i <= s_tmax else 0
  s_hat = min(s_i (1 + gamma), s(T))            # never above the network's trained range
  y_hat = y_i + sqrt(s_hat^2 - s_i^2) s_noise z  # churn: back to a noisier level
  d     = eps(alpha y_hat, t(s_hat))
  y'    = y_hat + (s_{i+1} - s_hat) d             # Euler (= DDIM in this variable)
  y_{i+1} = y_hat + (s_{i+1} - s_hat) (d + eps(alpha_{i+1} y', t_{i+1})) / 2   # Heun

With `s_churn = 0` this is Algorithm 1, the deterministic second-order sampler; with churn it
is Algorithm 2 (added noise and the extra ODE time balance each other when the score is exact,
so the marginals are kept; with a learned score the noise corrects accumulated errors). The
paper's grid ends with a step to `s = 0`, an Euler step, which lands on the data prediction
`D(y_N; s_N) = y_N - s_N eps`: that is `denoise=True` here. So the paper's `N = 18` (35 NFE,
its CIFAR-10 setting) is `n_steps=17, denoise=True`, the defaults. Without `denoise` the state
at `eps`, `alpha_eps y_N`, is returned.

`s_tmin`, `s_tmax` are noise levels `s`, as in the paper (not SDE times). The churn settings
are tuned per model and dataset by grid search in the paper (Table 5; for CIFAR-10 e.g.
`s_churn=30, s_tmin=0.01, s_tmax=1, s_noise=1.007`), and the stochastic sampler wants more
steps than the deterministic one: measure before you trust a setting.

The sampler is one jitted program (a `lax.fori_loop` over the steps); the grid, the churned
levels and their times are computed once before the loop. Step `i` draws its churn noise from
`fold_in(split(key)[1], i)`; the prior draw is `ode_sample`'s (`split(key)[0]`), so without
churn the samples converge to `ode_sample`'s for the same key as `n_steps` grows.

References:
  Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based
  Generative Models" (EDM), NeurIPS: Algorithms 1 and 2, Eq. 5, Table 5.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from scorejax import checks, fast_solvers
from scorejax import sde as sde_lib

Array = jax.Array
Params = Any
ScoreFn = Callable[[Array, Array], Array]

__all__ = ['edm_nfe', 'edm_sample', 'make_edm_sampler']

MAX_GAMMA = math.sqrt(2.0) - 1.0  # at most doubles the variance of a step's noise (EDM Alg. 2)


def edm_nfe(n_steps: int, denoise: bool = True) -> int:
  """The exact number of score evaluations of one `edm_sample` run: two per Heun step."""
  return 2 * n_steps + int(denoise)


def _check(sde: sde_lib.SDE, *, n_steps: int, rho: float, eps: float, s_churn: float,
           s_tmin: float, s_tmax: float, s_noise: float, **_) -> None:
  checks.check_count('n_steps', n_steps)
  checks.check_in_range('rho', rho, low=0.0, low_open=True)
  checks.check_time('eps', eps, sde.T)
  checks.check_in_range('s_churn', s_churn, low=0.0)
  checks.check_in_range('s_noise', s_noise, low=0.0)
  checks.check_in_range('s_tmin', s_tmin, low=0.0)
  low = checks.concrete(s_tmin)
  checks.check_in_range('s_tmax', s_tmax, low=low if low is not None else 0.0)


def _noise_prediction(score_fn: ScoreFn, x: Array, t: Array, sigma: Array) -> Array:
  """`eps(x, t) = -sigma_t score(x, t)` at a scalar time `t` with kernel std `sigma`."""
  return -sigma * sde_lib.evaluate_score(score_fn, x, jnp.full((x.shape[0],), t, x.dtype))


def _churned_levels(sde, times, levels, n_steps, eps, s_churn, s_tmin, s_tmax):
  """`(s_hat [n_steps], t_hat [n_steps])`: each step's raised noise level and its time."""
  gamma = jnp.where((levels[:-1] >= s_tmin) & (levels[:-1] <= s_tmax),
                    min(s_churn / n_steps, MAX_GAMMA), 0.0)
  s_hat = jnp.minimum(levels[:-1] * (1.0 + gamma), levels[0])  # = levels[:-1] where gamma = 0
  t_hat = fast_solvers.time_of_log_snr(sde, -jnp.log(s_hat), eps, sde.T)
  return s_hat, jnp.where(s_hat > levels[:-1], t_hat, times[:-1])  # exact times if not raised


@functools.partial(jax.jit, static_argnames=('score_fn', 'shape', 'n_steps', 'rho', 's_churn',
                                             's_tmin', 's_tmax', 's_noise', 'denoise'))
def _edm_sample(key, score_fn, sde, shape, n_steps, rho, eps, s_churn, s_tmin, s_tmax, s_noise,
                denoise):
  prior_key, churn_key = jax.random.split(key)
  times = fast_solvers.sampling_times(sde, n_steps, eps, 'karras', rho=rho)
  alphas, sigmas = fast_solvers.kernel(sde, times)
  levels = sigmas / alphas
  predict = functools.partial(_noise_prediction, score_fn)
  if s_churn > 0.0:
    s_hat, t_hat = _churned_levels(sde, times, levels, n_steps, eps, s_churn, s_tmin, s_tmax)
    alpha_hat, sigma_hat = fast_solvers.kernel(sde, t_hat)
  else:
    s_hat, t_hat, alpha_hat, sigma_hat = levels[:-1], times[:-1], alphas[:-1], sigmas[:-1]

  def step(i, y):
    if s_churn > 0.0:
      z = jax.random.normal(jax.random.fold_in(churn_key, i), y.shape, y.dtype)
      y = y + jnp.sqrt(jnp.maximum(s_hat[i]**2 - levels[i]**2, 0.0)) * s_noise * z
    h = levels[i + 1] - s_hat[i]
    d = predict(alpha_hat[i] * y, t_hat[i], sigma_hat[i])
    y_euler = y + h * d
    return y + 0.5 * h * (d + predict(alphas[i + 1] * y_euler, times[i + 1], sigmas[i + 1]))

  y = sde.prior_sampling(prior_key, shape) / alphas[0]
  y = jax.lax.fori_loop(0, n_steps, step, y)
  if denoise:
    return y - levels[-1] * predict(alphas[-1] * y, times[-1], sigmas[-1])
  return alphas[-1] * y


def edm_sample(
    key: Array,
    score_fn: ScoreFn,
    sde: sde_lib.SDE,
    shape: tuple[int, ...],
    *,
    n_steps: int = 17,
    rho: float = fast_solvers.KARRAS_RHO,
    eps: float = 1e-3,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float('inf'),
    s_noise: float = 1.0,
    denoise: bool = True,
) -> tuple[Array, int]:
  """Samples with EDM's Heun sampler (Algorithm 2; Algorithm 1 when `s_churn=0`), in `jit`.

  Args:
    key: PRNG key: the prior draw (`ode_sample`'s) and the churn noise.
    score_fn: `score_fn(x [B, ...], t [B]) -> [B, ...]` (static argument of the program).
    sde: the forward SDE (any with a Gaussian kernel: VE, VP, sub-VP, cosine VP).
    shape: `[B, ...]` of the samples.
    n_steps: Heun steps on the Karras grid from `T` to `eps` (NFE `2 n_steps + denoise`).
    rho: exponent of the grid (7 in the paper; 1 = uniform in the noise level).
    eps: the final time.
    s_churn: total churn (0: deterministic); each step's `gamma` is
      `min(s_churn / n_steps, sqrt(2) - 1)`.
    s_tmin, s_tmax: churn only at noise levels `s_tmin <= s <= s_tmax` (noise levels
      `sigma_t / alpha_t`, not times).
    s_noise: scale of the churn noise (slightly above 1 in the paper, against the
      detail lost by a learned denoiser).
    denoise: finish with the data prediction at `eps` (the paper's last step to `s = 0`).

  Returns:
    `(samples [B, ...], nfe)`, `nfe` a Python int (`edm_nfe`).

  Raises:
    ValueError: for `n_steps < 1`, `rho <= 0`, `eps` outside `(0, T)`, a negative `s_churn`,
      `s_noise` or `s_tmin`, or `s_tmax < s_tmin`.
  """
  _check(sde, n_steps=n_steps, rho=rho, eps=eps, s_churn=s_churn, s_tmin=s_tmin,
         s_tmax=s_tmax, s_noise=s_noise)
  samples = _edm_sample(key, score_fn, sde, tuple(shape), n_steps, float(rho), eps,
                        float(s_churn), float(s_tmin), float(s_tmax), float(s_noise), denoise)
  return samples, edm_nfe(n_steps, denoise)


def make_edm_sampler(
    score_fn_builder: Callable[[Params], ScoreFn],
    sde: sde_lib.SDE,
    shape: tuple[int, ...],
    **kwargs: Any,
) -> Callable[[Array, Params], tuple[Array, int]]:
  """A jitted `sample_fn(key, params) -> (samples, nfe)`; see `sampling.make_pc_sampler`.

  Raises:
    ValueError: for the arguments `edm_sample` rejects (checked now).
    TypeError: for a keyword argument `edm_sample` does not take.
  """
  options = checks.keyword_arguments(edm_sample, kwargs)
  _check(sde, **options)
  nfe = edm_nfe(options['n_steps'], options['denoise'])

  @jax.jit
  def sample(key, params):
    return edm_sample(key, score_fn_builder(params), sde, shape, **kwargs)[0]

  return lambda key, params: (sample(key, params), nfe)
