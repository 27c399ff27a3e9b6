"""A variational bound on the negative log-likelihood of the reverse-SDE model (its ELBO).

Owns `negative_elbo(key, score_fn, sde, x, ...) -> (bound, terms)` and
`elbo_bits_per_dim(key, score_fn, sde, x, ...) -> bpd`. Where `scorejax.likelihood` gives the
exact likelihood of the probability-flow ODE (an adaptive solve, ~100-200 Jacobian products
of the network per example), this bounds the likelihood of the *stochastic* model that the
SDE samplers draw from, with a handful of plain forwards per example, and it is the bound that
likelihood-weighted training minimises (`losses.sde_loss(..., likelihood_weighting=True)`).

The model: `x_T ~ p_T` (the prior), the reverse SDE with the learned score `s` from `T` down to
`eps`, then a Gaussian decoder `p(x_0 | x_eps) = N(x_eps / alpha_eps, (sigma_eps / alpha_eps)^2
I)` (the inverse of the forward kernel `x_t = alpha_t x_0 + sigma_t z`). The variational
posterior is the forward process given `x_0`: `x_eps` from the kernel, then the forward SDE,
whose marginals are the kernel `N(alpha_t x_0, sigma_t^2 I)` at every `t` in `[eps, T]` and whose
time reversal is the reverse SDE with the kernel's score `-z / sigma_t` in place of `s`. Both
path measures have the diffusion `g`, so by Girsanov's theorem their KL divergence is the KL of
their starting laws plus the integrated squared difference of the drifts (Song, Durkan, Murray
& Ermon 2021, Sec. 4, written in this Girsanov form; Kingma et al. 2021 for VP), and

  -log p(x_0) <= decoder + prior + diffusion,
  decoder   = E[-log p(x_0 | x_eps)] = D/2 (1 + log(2 pi sigma_eps^2 / alpha_eps^2)),
  prior     = KL(N(alpha_T x_0, sigma_T^2 I) || N(0, v I))  (v = `sde.prior_std^2`)
            = 1/2 sum(sigma_T^2 / v + alpha_T^2 x_0^2 / v - 1 - log(sigma_T^2 / v)),
  diffusion = 1/2 int_eps^T g(t)^2 E_z ||s(alpha_t x_0 + sigma_t z, t) + z / sigma_t||^2 dt.

`diffusion` is `(T - eps)` times the expected likelihood-weighted loss of `losses.sde_losses`
(`reduce_mean=False`, `importance_weighting=True`): with `num_times` stratified times per
example from the density `g^2 / sigma_t^2 / Z` on `[eps, T]` (`losses.importance_times`;
uniform in log-SNR on the VP SDEs), it is estimated by

  Z (||sigma_t s + z||^2 / 2 - c_t (||z||^2 / 2 - D / 2)),  c_t = (alpha_t^2 / (alpha_t^2 +
  sigma_t^2))^2.

Uniform times are not offered: there the weight `g^2 / sigma_t^2` grows like `1/t` near 0 on
the VP SDEs, and the estimator's variance is infinite. The second term is a control variate
with mean zero for any `c_t`, so the estimate stays unbiased. Near `eps`, `sigma_t s` vanishes
and `||sigma_t s + z||^2 / 2` is the noise's own `||z||^2 / 2`: this `Z D / 2`, which grows
like `D/2 log(1/eps)`, cancels against the decoder's `D/2 log(sigma_eps^2)`. Near `T`,
`sigma_t s + z` vanishes. `c_t` is the squared Wiener shrinkage of unit-variance data, so it
goes from 1 at `eps` to 0 at `T`. On 2-D and 8-D Gaussian data it cuts the standard deviation
of one draw by ~40%. `decoder` and `prior` are exact expectations.

The gap of the bound is the KL divergence between the two path measures given `x_0`. With the
exact score of smooth data it vanishes as `eps -> 0` and `p_T -> prior`: on Gaussian data it is
below 1e-4 nats (VP, sub-VP) and 2e-3 nats (VE) at `eps = 1e-5` (`tests/test_elbo.py`). So the
bound measures how far the learned score is from the data's: a score error adds exactly
`1/2 int g^2 E||s - grad log p_t||^2 dt`.

For VE, `sigma(eps) >= sigma_min` does not vanish: the decoder blurs at the scale `sigma_min`,
as the probability-flow likelihood from `eps` measures the data blurred by `p_0eps`.

References:
  Song, Durkan, Murray & Ermon 2021, "Maximum Likelihood Training of Score-Based Diffusion
  Models", NeurIPS: Sec. 4 (the bound), Sec. 5 (importance sampling of t), Table 2 (bounds
  and ODE bits/dim). Kingma, Salimans, Poole & Ho 2021, "Variational Diffusion Models", NeurIPS
  (the continuous-time VP bound, stratified times).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scorejax import checks, fast_solvers, likelihood, losses
from scorejax import sde as sde_lib

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

__all__ = ['TERMS', 'elbo_bits_per_dim', 'negative_elbo']

TERMS = ('decoder', 'prior', 'diffusion')


def _decoder_term(sde: sde_lib.SDE, dim: int, eps: float) -> Array:
  alpha, sigma = fast_solvers.kernel(sde, eps)
  return 0.5 * dim * (1.0 + jnp.log(2.0 * math.pi * (sigma / alpha) ** 2))


def _prior_term(sde: sde_lib.SDE, x0: Array) -> Array:
  mean, sigma = sde.marginal_prob(x0, jnp.full((x0.shape[0],), sde.T, jnp.float32))
  variance = float(sde.prior_std) ** 2
  ratio = sigma**2 / variance  # [B]
  dim = int(np.prod(x0.shape[1:]))
  squares = jnp.sum(mean.reshape(x0.shape[0], -1) ** 2, axis=-1) / variance
  return 0.5 * (dim * (ratio - 1.0 - jnp.log(ratio)) + squares)


@functools.partial(jax.jit, static_argnames=('score_fn', 'num_times'))
def _negative_elbo(key, score_fn, sde, x0, num_times, eps):
  batch, dim = x0.shape[0], int(np.prod(x0.shape[1:]))
  normalizer = losses.importance_normalizer(sde, eps)

  def stratum(total, m):
    key_u, key_z = jax.random.split(jax.random.fold_in(key, m))
    u = (m + jax.random.uniform(key_u, (batch,))) / num_times  # stratum m of [0, 1)
    t = losses.importance_times(sde, u, eps)
    z = jax.random.normal(key_z, x0.shape, x0.dtype).reshape(batch, -1)
    alpha, sigma = fast_solvers.kernel(sde, t)
    xt = sde_lib.batch_mul(alpha, x0) + sde_lib.batch_mul(sigma, z.reshape(x0.shape))
    scaled = sde_lib.batch_mul(sigma, sde_lib.evaluate_score(score_fn, xt, t)).reshape(batch, -1)
    # The control variate's coefficient c_t = (alpha^2 / (alpha^2 + sigma^2))^2 (docstring).
    control = (alpha**2 / (alpha**2 + sigma**2)) ** 2 * 0.5 * (jnp.sum(z**2, axis=-1) - dim)
    return total + normalizer * (0.5 * jnp.sum((scaled + z) ** 2, axis=-1) - control), None

  total, _ = jax.lax.scan(stratum, jnp.zeros((batch,), jnp.float32), jnp.arange(num_times))
  terms = {
      'decoder': jnp.broadcast_to(_decoder_term(sde, dim, eps), (batch,)),
      'prior': _prior_term(sde, x0),
      'diffusion': total / num_times,
  }
  return terms['decoder'] + terms['prior'] + terms['diffusion'], terms


def negative_elbo(
    key: Array,
    score_fn: ScoreFn,
    sde: sde_lib.SDE,
    x: Array,
    *,
    num_times: int = 16,
    eps: float = 1e-5,
) -> tuple[Array, dict[str, Array]]:
  """An unbiased estimate of the variational bound on `-log p(x)` of the reverse-SDE model.

  Args:
    key: PRNG key for the times and the noise.
    score_fn: `score_fn(x [B, ...], t [B]) -> [B, ...]` (a static argument of the program).
    sde: the forward SDE (one with `likelihood_weight_integral` and `prior_std`: all of
      `scorejax.sde`).
    x: `[B, ...]` data in model space.
    num_times: stratified times per example (`num_times` forwards of the network each).
    eps: the decoder's time (module docstring).

  Returns:
    `(bound [B], terms)` in nats: the estimate of `decoder + prior + diffusion`, and `terms`, a
    dict of `[B]` arrays with the keys of `TERMS`.

  Raises:
    ValueError: for `num_times < 1` or `eps` outside `(0, T)`.
  """
  checks.check_count('num_times', num_times)
  checks.check_time('eps', eps, sde.T)
  return _negative_elbo(key, score_fn, sde, jnp.asarray(x, jnp.float32), num_times, eps)


def elbo_bits_per_dim(
    key: Array,
    score_fn: ScoreFn,
    sde: sde_lib.SDE,
    x: Array,
    *,
    centered: bool = False,
    dequantize: bool = True,
    num_repeats: int = 1,
    num_times: int = 16,
    eps: float = 1e-5,
) -> Array:
  """The bound of `negative_elbo` in bits/dim of 8-bit images, by the protocol of
  `likelihood.bits_per_dim` (dequantization, data scaling, offset): an upper bound on the
  model's bits/dim of the discrete data, in expectation.

  Returns:
    `bpd [B]`, averaged over the repeats.
  """
  def nll(repeat_key, y):
    return negative_elbo(repeat_key, score_fn, sde, y, num_times=num_times, eps=eps)[0], 0
  return likelihood.dequantized_bits_per_dim(key, nll, x, centered=centered,
                                             dequantize=dequantize, num_repeats=num_repeats)[0]
