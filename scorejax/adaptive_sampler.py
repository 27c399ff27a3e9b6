"""The adaptive-step reverse-SDE sampler of Jolicoeur-Martineau et al. 2021 ("Gotta Go Fast",
Algorithm 1): improved Euler on the reverse SDE, with a step size and a Brownian path of its own
for every sample.

Owns `adaptive_sample(key, score_fn, sde, shape, *, rtol=0.05, atol=0.0078, ...) ->
(samples, nfe)`, its builder `make_adaptive_sampler` (one jitted function of `(key, params)`,
as `scorejax.sampling`'s builders), `adaptive_sample_with_stats` (the same run, with each
sample's accepted and rejected step counts) and the single step `adaptive_update`.

The reverse SDE (Song et al. 2021, Eq. 6) runs from `T` down to `eps`:
`dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw` with `dt < 0`. One attempted step of size
`h > 0` from time `t`, with one draw `z ~ N(0, I)` shared by both stages:

  x'  = x - h f(x, t) + h g(t)^2 s(x, t) + sqrt(h) g(t) z                (Euler-Maruyama)
  x~  = x - h f(x', t-h) + h g(t-h)^2 s(x', t-h) + sqrt(h) g(t-h) z      (same z)
  x'' = (x' + x~) / 2                                                     (improved Euler)

`x' - x''` estimates the local error of the lower-order step. It is measured against a mixed
tolerance, elementwise `delta = max(atol, rtol max(|x'|, |x'_prev|))` with `x'_prev` the `x'`
of the sample's previous accepted step (the prior draw at first), in the scaled L2 norm of
one sample's `D` elements, `E = sqrt(sum(((x' - x'') / delta)^2) / D)`. If `E <= 1` the step
is accepted and the sample moves to the higher-order `x''` (extrapolation), `t <- t - h`,
`x'_prev <- x'`. Accepted or not, the next step is `h <- min(t - eps, safety h E^-exponent)`
(with the updated `t`), so the last step lands on `eps` (there the time is set to `eps`
exactly, not to the rounded `t - h`). Every sample has its own `t`, `h` and `x'_prev`: a
sample that reached `eps` is frozen while the others go on, and the loop ends when all are
done.

Tolerances. `atol` is in the units of the data: the paper's `0.0078 ~ 2/256` is one 8-bit
level of data in `[-1, 1]` (the authors' code uses `0.0039` for VE models trained on
`[0, 1]`). The state is not rescaled: under VE it starts at the scale of `sigma_max`, where
`rtol |x|` dominates `delta`, and it returns to the data scale as `t -> eps`. The other
defaults are those of the authors' code (`h_init = 0.01`, `safety = 0.9`, `exponent = 0.9`);
its experiments sweep `rtol` over 0.01-0.1. As in the paper the step factor is not clipped (no
minimum or maximum growth): a lucky small `E` can be followed by a rejection.

Noise and keys. `split(key)[0]` draws the prior, as `sampling.ode_sample` and
`edm_sampler.edm_sample` do (same key, same `x_T`). The noise of every attempt is an
increment of one Brownian path per sample, `z = (W_b(t) - W_b(t - h)) / sqrt(h)`, read from a
`diffrax.VirtualBrownianTree` on `[eps, T]` with the key `fold_in(split(key)[1], b)`
(`brownian_paths`, `path_values`). Departure from the paper, which draws a fresh `z` for every
attempt: for small steps `x' - x''` is dominated by terms proportional to `z`, so rejecting an
attempt and redrawing selects the noise, and the accepted increments are not those of a
Brownian motion. Measured with exact scores on `N(0.5, 0.25 I)` at the default tolerances, the
fresh draws gave sample variances of 0.40-0.57 at `D = 2` (43% of the attempts rejected) and
0.253-0.256 at `D = 64`, and tighter tolerances did not help; with the paths, 0.244-0.250 at
`D = 2`. A path is a fixed function of its key: a rejected attempt is retried on the same path
over a shorter interval, so no draw is selected, and at smaller tolerances the samples converge
to the exact solution driven by the same path (strong convergence). A sample's trajectory does
not depend on the rest of the batch: the first rows of a larger batch equal a smaller batch's
with the same key (with JAX's default `jax_threefry_partitionable`, under which the prior draw
has that property too). Each attempt reads its sample's path at one new time (`W(t)` of the
accepted time is kept), which costs ~20 normal draws of one sample's shape (the depth of its
tree).

Cost. The batch is evaluated whole: every loop iteration costs two score evaluations,
rejected attempts and already-finished samples included, so `nfe = 2 iterations`, plus one
with `denoise` (`sampling.ode_sample`'s last step: the reverse-diffusion mean at `eps`; the
paper's code adds `std(eps)^2 s(x, eps)` there instead). After `max_steps` iterations the
unfinished samples are returned as NaN, as `scorejax.ode`'s adaptive solves do.

References:
  Jolicoeur-Martineau, Li, Piche-Taillefer, Kachman & Mitliagkas 2021, "Gotta Go Fast When
  Generating Data with Score-Based Models", arXiv:2105.14080: Algorithm 1.
  Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
  Equations", ICLR: Eq. (6) (the reverse SDE).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp

from scorejax import checks
from scorejax import sde as sde_lib
from scorejax.predictors import reverse_diffusion_update
from scorejax.sde import batch_mul

Array = jax.Array
Params = Any
ScoreFn = Callable[[Array, Array], Array]

__all__ = ['AdaptiveStats', 'adaptive_sample', 'adaptive_sample_with_stats', 'adaptive_update',
           'attempted_step', 'brownian_paths', 'make_adaptive_sampler', 'path_values']

# Resolution of the Brownian paths, relative to `T - eps`: below it a path is a Brownian bridge
# between its tree's points (diffrax), far below the smallest steps taken.
_TREE_TOLERANCE = 2.0**-20


class AdaptiveStats(NamedTuple):
  """What one run did: `accepted [B]`, `rejected [B]` step attempts of each sample and the
  loop's `iterations` (a scalar; `nfe = 2 iterations + denoise`), all int32."""

  accepted: Array
  rejected: Array
  iterations: Array


def _check(sde: sde_lib.SDE, *, rtol: float, atol: float, h_init: float, safety: float,
           exponent: float, eps: float, max_steps: int, **_) -> None:
  checks.check_tolerances(rtol, atol)
  checks.check_in_range('h_init', h_init, low=0.0, low_open=True)
  checks.check_in_range('safety', safety, low=0.0, high=1.0, low_open=True)
  checks.check_in_range('exponent', exponent, low=0.0, low_open=True)
  checks.check_time('eps', eps, sde.T)
  checks.check_count('max_steps', max_steps)


def _where(mask: Array, a: Array, b: Array) -> Array:
  """`a` where the per-sample `mask [B]` holds, else `b` (`[B, ...]`)."""
  return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)


def _rms(x: Array) -> Array:
  """The scaled L2 norm `[B]` of each sample: the root mean square of its elements."""
  return jnp.sqrt(jnp.mean(jnp.square(x.reshape(x.shape[0], -1)), axis=-1))


def attempted_step(t: Array, h: Array, eps: float) -> tuple[Array, Array]:
  """`(h, t_next)` of the next attempt: `h = 0` for finished samples, and the last step ends
  on `eps` exactly (not on the rounded `t - h`)."""
  h = jnp.where(t > eps, h, 0.0)
  return h, jnp.where(h >= t - eps, eps, t - h).astype(t.dtype)


def brownian_paths(key: Array, batch: int, event_shape: tuple[int, ...], T: float, eps: float):
  """One Brownian path `W_b` on `[eps, T]` (`W_b(eps) = 0`) per sample:
  `diffrax.VirtualBrownianTree`s (batched), with the keys `fold_in(key, b)`; `path_values` reads
  them."""
  tolerance = _TREE_TOLERANCE * (T - eps)
  return jax.vmap(lambda b: diffrax.VirtualBrownianTree(
      eps, T, tolerance, event_shape, jax.random.fold_in(key, b)))(jnp.arange(batch))


def path_values(paths, times: Array) -> Array:
  """`W_b(times_b)` `[B, ...]` of each sample's path (one tree descent each)."""
  return jax.vmap(lambda path, time: path.evaluate(time))(paths, times)


def adaptive_update(
    x: Array, x_prev: Array, t: Array, h: Array, noise: Array, score_fn: ScoreFn,
    sde: sde_lib.SDE, *, rtol: float, atol: float, safety: float, exponent: float, eps: float,
) -> tuple[Array, Array, Array, Array, Array]:
  """One attempted step of every sample (traceable), with the noise `z [B, ...]` given.

  Samples with `t <= eps` are done: they keep their state, and their `h` is 0.

  Args:
    x, x_prev: `[B, ...]` states and the `x'` of each sample's last accepted step.
    t, h: `[B]` times and step sizes.
    noise: `[B, ...]` standard normal draw of the step.
    score_fn: `score_fn(x [B, ...], t [B]) -> [B, ...]`.
    sde: the forward SDE.
    rtol, atol, safety, exponent, eps: as in `adaptive_sample`.

  Returns:
    `(x, x_prev, t, h, accepted [B] bool)` after the attempt; `h` is the next step's size.
  """
  reverse = sde.reverse(score_fn)
  active = t > eps
  h, t_next = attempted_step(t, h, eps)
  sqrt_h = jnp.sqrt(h)
  drift, diffusion = reverse.sde(x, t)
  x_euler = x - batch_mul(h, drift) + batch_mul(sqrt_h * diffusion, noise)
  drift_next, diffusion_next = reverse.sde(x_euler, t_next)
  x_tilde = x - batch_mul(h, drift_next) + batch_mul(sqrt_h * diffusion_next, noise)
  x_heun = 0.5 * (x_euler + x_tilde)
  delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_euler), jnp.abs(x_prev)))
  error = _rms((x_euler - x_heun) / delta)
  accepted = active & (error <= 1.0)  # False for a NaN error: the sample never finishes
  t = jnp.where(accepted, t_next, t)
  # error = 0 gives an infinite factor: the step becomes the rest of the interval.
  h_next = jnp.minimum(t - eps, safety * h * error ** (-exponent))
  h_next = jnp.where(t > eps, h_next, 0.0).astype(h.dtype)
  return _where(accepted, x_heun, x), _where(accepted, x_euler, x_prev), t, h_next, accepted


@functools.partial(jax.jit, static_argnames=('score_fn', 'shape', 'denoise'))
def _adaptive_sample(key, score_fn, sde, shape, rtol, atol, h_init, safety, exponent, eps,
                     max_steps, denoise):
  prior_key, noise_key = jax.random.split(key)
  x = sde.prior_sampling(prior_key, shape)
  batch = shape[0]
  t = jnp.full((batch,), sde.T, x.dtype)
  h = jnp.full((batch,), jnp.minimum(h_init, sde.T - eps), x.dtype)
  counts = jnp.zeros((batch,), jnp.int32)
  step = functools.partial(adaptive_update, score_fn=score_fn, sde=sde, rtol=rtol, atol=atol,
                           safety=safety, exponent=exponent, eps=eps)

  paths = brownian_paths(noise_key, batch, tuple(shape[1:]), sde.T, eps)

  def body(carry):
    k, x, x_prev, t, h, w, accepted, rejected = carry  # w = W(t), kept: one descent a step
    active = t > eps
    h_step, t_next = attempted_step(t, h, eps)
    w_next = path_values(paths, t_next)
    noise = batch_mul(1.0 / jnp.sqrt(jnp.where(active, h_step, 1.0)), w - w_next)
    x, x_prev, t, h, accept = step(x, x_prev, t, h, noise)
    w = _where(accept, w_next, w)
    return (k + 1, x, x_prev, t, h, w, accepted + accept, rejected + (active & ~accept))

  def cond(carry):
    return (carry[0] < max_steps) & jnp.any(carry[3] > eps)

  init = (jnp.asarray(0, jnp.int32), x, x, t, h, path_values(paths, t), counts, counts)
  iterations, x, _, t, _, _, accepted, rejected = jax.lax.while_loop(cond, body, init)
  nfe = 2 * iterations
  if denoise:
    x = reverse_diffusion_update(x, jnp.full((batch,), eps, x.dtype), jnp.zeros_like(x),
                                 score_fn, sde)[1]
    nfe = nfe + 1
  x = _where(t <= eps, x, jnp.full_like(x, jnp.nan))
  return x, nfe.astype(jnp.int32), AdaptiveStats(accepted, rejected, iterations)


def adaptive_sample_with_stats(
    key: Array, score_fn: ScoreFn, sde: sde_lib.SDE, shape: tuple[int, ...], **options: Any,
) -> tuple[Array, Array, AdaptiveStats]:
  """`adaptive_sample`'s run (the same keyword arguments), returning
  `(samples, nfe, AdaptiveStats)`.

  Raises:
    ValueError, TypeError: as `adaptive_sample` and `make_adaptive_sampler`.
  """
  options = checks.keyword_arguments(adaptive_sample, options)
  _check(sde, **options)
  return _adaptive_sample(key, score_fn, sde, tuple(shape), **options)


def adaptive_sample(
    key: Array,
    score_fn: ScoreFn,
    sde: sde_lib.SDE,
    shape: tuple[int, ...],
    *,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.01,
    safety: float = 0.9,
    exponent: float = 0.9,
    eps: float = 1e-3,
    max_steps: int = 16384,
    denoise: bool = True,
) -> tuple[Array, Array]:
  """Samples the reverse SDE from `T` to `eps` with per-sample adaptive steps, in `jit`.

  Args:
    key: PRNG key: the prior draw (`ode_sample`'s) and each step's noise.
    score_fn: `score_fn(x [B, ...], t [B]) -> [B, ...]` (static argument of the program);
      per-sample times, and no mixing across the batch.
    sde: the forward SDE (VE, VP, sub-VP, cosine VP).
    shape: `[B, ...]` of the samples.
    rtol: relative tolerance (the paper's `epsilon_rel`).
    atol: absolute tolerance in data units (`epsilon_abs`).
    h_init: the first step size (clipped to `T - eps`).
    safety: safety factor `theta` of the step-size update.
    exponent: exponent `r` of the step-size update `h <- theta h E^-r`.
    eps: the final time.
    max_steps: the most loop iterations; the samples not at `eps` by then are NaN.
    denoise: finish with one reverse-diffusion step at `eps` returning its mean (1 NFE), as
      `sampling.ode_sample`'s `denoise`.

  Returns:
    `(samples [B, ...], nfe)`, `nfe` an int32 scalar array: `2 iterations + denoise`, the
    exact number of score evaluations of the batch.

  Raises:
    ValueError: for negative tolerances or both 0, `h_init <= 0`, `safety` outside `(0, 1]`,
      `exponent <= 0`, `eps` outside `(0, T)`, or `max_steps < 1`.
  """
  samples, nfe, _ = adaptive_sample_with_stats(
      key, score_fn, sde, shape, rtol=rtol, atol=atol, h_init=h_init, safety=safety,
      exponent=exponent, eps=eps, max_steps=max_steps, denoise=denoise)
  return samples, nfe


def make_adaptive_sampler(
    score_fn_builder: Callable[[Params], ScoreFn],
    sde: sde_lib.SDE,
    shape: tuple[int, ...],
    **kwargs: Any,
) -> Callable[[Array, Params], tuple[Array, Array]]:
  """A jitted `sample_fn(key, params) -> (samples, nfe)`; see `sampling.make_pc_sampler`.

  Raises:
    ValueError: for the arguments `adaptive_sample` rejects (checked now).
    TypeError: for a keyword argument `adaptive_sample` does not take.
  """
  _check(sde, **checks.keyword_arguments(adaptive_sample, kwargs))
  return jax.jit(lambda key, params: adaptive_sample(key, score_fn_builder(params), sde, shape,
                                                     **kwargs))
