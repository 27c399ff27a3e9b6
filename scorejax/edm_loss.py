"""EDM's training objective (Karras et al. 2022, Sec. 5, Table 1) on any SDE of `scorejax.sde`.

The loss is a weighted denoising error at noise levels drawn log-normally:

  s ~ exp(N(p_mean, p_std^2)),   x_t = alpha_t x_0 + sigma_t z  at the time t of level s,
  loss = lambda(s) ||D(x_t, t) - x_0||^2,   lambda(s) = (s^2 + sigma_data^2) / (s sigma_data)^2,

where `s = sigma_t / alpha_t` is the noise level of the scaled state `x_t / alpha_t` (EDM's
sigma; `scorejax.edm_sampler` samples in it) and `D = (x_t + sigma_t^2 score) / alpha_t` is
the denoiser (Tweedie's formula) of any score function. With the EDM preconditioning of
`scorejax.models.score` the weighted error is exactly the squared error of the raw network
`F` against its target `(x_0 - c_skip y) / c_out`, whose variance is 1 at every level: the
network sees a well-scaled regression problem everywhere. Without it the objective still
applies (a score network trained with EDM's noise distribution and weighting).

Levels outside the SDE's range `[s(eps), s(T)]` are clipped to it (the network is evaluated
only where the SDE defines times), and `t` is found by bisection of the SDE's own kernel, so
VE, VP, sub-VP and the cosine VP SDE all work. EDM's `p_mean = -1.2, p_std = 1.2` put most
levels between 0.03 and 3 (data in [-1, 1], `sigma_data = 0.5`). Reduced over dimensions by
the mean, or by half the sum (`reduce_mean=False`), as `losses.sde_loss`.

References:
  Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based
  Generative Models" (EDM), NeurIPS: Sec. 5, Eq. 2 and 8, Table 1 ("ours" column).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from scorejax import checks, fast_solvers, losses
from scorejax import sde as sde_lib

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
Metrics = dict[str, Array]

__all__ = ['EDM_P_MEAN', 'EDM_P_STD', 'check_arguments', 'edm_loss', 'edm_losses', 'edm_weight',
           'level_range']

EDM_P_MEAN = -1.2  # log-normal noise levels of the paper (Table 1)
EDM_P_STD = 1.2


def edm_weight(s: Array, sigma_data: float) -> Array:
  """`lambda(s) = (s^2 + sigma_data^2) / (s sigma_data)^2`: `1 / c_out(s)^2`."""
  return (s**2 + sigma_data**2) / (s * sigma_data) ** 2


def level_range(sde: sde_lib.SDE, eps: float) -> tuple[Array, Array]:
  """`(s(eps), s(T))`, the noise levels the SDE defines between `eps` and `T`."""
  alpha, sigma = fast_solvers.kernel(sde, jnp.array([eps, sde.T], jnp.float32))
  levels = sigma / alpha
  return levels[0], levels[1]


def edm_losses(score_fn: ScoreFn, sde: sde_lib.SDE, x0: Array, s: Array, z: Array, *,
               sigma_data: float = 0.5, eps: float = 1e-5, reduce_mean: bool = False
               ) -> Array:
  """Per-example EDM loss `[B]` at noise levels `s [B]` (clipped to the SDE's range) and
  noise `z`."""
  low, high = level_range(sde, eps)
  s = jnp.clip(s, low, high)
  t = fast_solvers.time_of_log_snr(sde, -jnp.log(s), eps, sde.T)
  alpha, sigma = fast_solvers.kernel(sde, t)
  xt = sde_lib.batch_mul(alpha, x0) + sde_lib.batch_mul(sigma, z)
  score = sde_lib.evaluate_score(score_fn, xt, t)
  denoised = sde_lib.batch_mul(1.0 / alpha, xt + sde_lib.batch_mul(sigma**2, score))
  weight = edm_weight(sigma / alpha, sigma_data)
  return losses.reduce_dims((denoised - x0) ** 2, reduce_mean) * weight


def edm_loss(
    key: Array,
    score_fn: ScoreFn,
    sde: sde_lib.SDE,
    batch: Array,
    *,
    sigma_data: float = 0.5,
    p_mean: float = EDM_P_MEAN,
    p_std: float = EDM_P_STD,
    eps: float = 1e-5,
    reduce_mean: bool = False,
) -> tuple[Array, Metrics]:
  """EDM's training loss with `log s ~ N(p_mean, p_std^2)` and `z ~ N(0, I)`.

  Args:
    key: PRNG key.
    score_fn: `score_fn(x [B, ...], t [B]) -> [B, ...]`.
    sde: the forward SDE (any with a Gaussian kernel).
    batch: `[B, ...]` data.
    sigma_data: the data's standard deviation in the weighting.
    p_mean, p_std: the log-normal distribution of the noise levels.
    eps: the smallest time (levels below `s(eps)` are clipped to it).
    reduce_mean: average over dimensions instead of half-summing.

  Returns:
    `(loss, metrics)`.

  Raises:
    ValueError: for `eps` outside `(0, T)`, `sigma_data <= 0` or `p_std < 0`.
  """
  check_arguments(sde, sigma_data=sigma_data, p_std=p_std, eps=eps)
  key_s, key_z = jax.random.split(key)
  s = jnp.exp(p_mean + p_std * jax.random.normal(key_s, (batch.shape[0],)))
  z = jax.random.normal(key_z, batch.shape, batch.dtype)
  return losses.summarize(edm_losses(score_fn, sde, batch, s, z, sigma_data=sigma_data,
                                     eps=eps, reduce_mean=reduce_mean))


def check_arguments(sde: sde_lib.SDE, *, sigma_data: float, p_std: float, eps: float) -> None:
  """One-line errors for the numbers `edm_loss` takes."""
  checks.check_time('eps', eps, sde.T)
  checks.check_in_range('sigma_data', sigma_data, low=0.0, low_open=True)
  checks.check_in_range('p_std', p_std, low=0.0)
