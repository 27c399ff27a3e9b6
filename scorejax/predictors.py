"""Single predictor and corrector steps of the predictor-corrector (PC) sampler.

Every step is a pure function in two layers:
- a core `*_update(x, t, noise, score_fn, sde, ...) -> (x, x_mean)` that takes the Gaussian
  noise explicitly (this is how the reference's one-step golden values, computed with an
  injected `z`, are reproduced);
- `predictor_step(key, ...)` / `corrector_step(key, ...)`, which draw that noise from `key`.
`x_mean` is the update without its final noise term (score_sde's `x_mean`), used for the
final denoising step.

Conventions: `x [B, ...]`, `t [B]`, `score_fn(x, t) -> [B, ...]`; `sde` is the forward SDE
(a static pytree). Discrete tables (VE sigmas, VP betas) are indexed as in the reference,
`int(t (N - 1) / T)`, so an SDE whose `N` differs from the number of sampling steps should be
rebuilt with `dataclasses.replace(sde, N=n_steps)` first (as `sampling.pc_sample` does).

References:
  Song et al. 2021, ICLR: Algorithm 1-4 (PC sampling, VE/VP), Eq. (46)-(47) reverse
  diffusion, Appendix F (ancestral sampling), Appendix G (corrector step sizes `snr`).
  Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data
  Distribution" (annealed Langevin dynamics).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scorejax import sde as sde_lib
from scorejax.sde import batch_mul

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def _timestep(t: Array, sde: sde_lib.SDE) -> Array:
  return (t * (sde.N - 1) / sde.T).astype(jnp.int32)


# -- predictors ---------------------------------------------------------------------------


def euler_maruyama_update(
    x: Array, t: Array, noise: Array, score_fn: ScoreFn, sde: sde_lib.SDE,
    probability_flow: bool = False,
) -> tuple[Array, Array]:
  """Euler-Maruyama step of the reverse SDE (or Euler step of the ODE) with `dt = -1/N`.

  `x_mean = x + f_rev(x, t) dt`, `x = x_mean + g_rev(t) sqrt(-dt) noise`. With
  `probability_flow` the reverse diffusion is zero, so this is the ODE's Euler step
  (the reference raises there; here `x == x_mean`).

  Returns:
    `(x [B, ...], x_mean [B, ...])`.
  """
  dt = -1.0 / sde.N
  drift, diffusion = sde.reverse(score_fn, probability_flow).sde(x, t)
  x_mean = x + drift * dt
  return x_mean + batch_mul(diffusion * np.sqrt(-dt), noise), x_mean


def reverse_diffusion_update(
    x: Array, t: Array, noise: Array, score_fn: ScoreFn, sde: sde_lib.SDE,
    probability_flow: bool = False,
) -> tuple[Array, Array]:
  """Reverse diffusion step: the forward discretization run backwards, Eq. (46).

  `x_mean = x - f_rev`, `x = x_mean + G_rev noise` with `(f_rev, G_rev)` from
  `sde.reverse(score_fn, probability_flow).discretize(x, t)`.

  Returns:
    `(x [B, ...], x_mean [B, ...])`.
  """
  f, G = sde.reverse(score_fn, probability_flow).discretize(x, t)
  x_mean = x - f
  return x_mean + batch_mul(G, noise), x_mean


def ancestral_sampling_update(
    x: Array, t: Array, noise: Array, score_fn: ScoreFn, sde: sde_lib.SDE,
    probability_flow: bool = False,
) -> tuple[Array, Array]:
  """Ancestral sampling of the discrete chain: SMLD (VE) or DDPM (VP), Appendix F.

  `probability_flow` is ignored (the step has no ODE form), as in the reference.

  Returns:
    `(x [B, ...], x_mean [B, ...])`.

  Raises:
    ValueError: for SDEs without a discrete ancestral chain (sub-VP).
  """
  del probability_flow
  timestep = _timestep(t, sde)
  if isinstance(sde, sde_lib.VESDE):
    sigmas = jnp.asarray(sde.discrete_sigmas)
    sigma = sigmas[timestep]
    adjacent_sigma = jnp.where(timestep == 0, 0.0, sigmas[jnp.maximum(timestep - 1, 0)])
    score = sde_lib.evaluate_score(score_fn, x, t)
    x_mean = x + batch_mul(sigma**2 - adjacent_sigma**2, score)
    std = jnp.sqrt(adjacent_sigma**2 * (sigma**2 - adjacent_sigma**2) / sigma**2)
    return x_mean + batch_mul(std, noise), x_mean
  if isinstance(sde, sde_lib.VariancePreservingSDE):
    beta = jnp.asarray(sde_lib.discrete_betas(sde, strict=True))[timestep]
    score = sde_lib.evaluate_score(score_fn, x, t)
    x_mean = batch_mul(1.0 / jnp.sqrt(1.0 - beta), x + batch_mul(beta, score))
    return x_mean + batch_mul(jnp.sqrt(beta), noise), x_mean
  raise ValueError(
      f'ancestral_sampling supports VESDE and the VP SDEs (VPSDE, CosineVPSDE) only, got '
      f'{type(sde).__name__}')


def none_predictor_update(
    x: Array, t: Array, noise: Array, score_fn: ScoreFn, sde: sde_lib.SDE,
    probability_flow: bool = False,
) -> tuple[Array, Array]:
  """The identity (corrector-only sampling); costs no score evaluation."""
  del t, noise, score_fn, sde, probability_flow
  return x, x


PREDICTORS: dict[str, Callable[..., tuple[Array, Array]]] = {
    'euler_maruyama': euler_maruyama_update,
    'reverse_diffusion': reverse_diffusion_update,
    'ancestral_sampling': ancestral_sampling_update,
    'none': none_predictor_update,
}


def get_predictor(name: str) -> Callable[..., tuple[Array, Array]]:
  """Looks up a predictor core by name.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  if name not in PREDICTORS:
    raise ValueError(f'unknown predictor {name!r}; valid choices: {sorted(PREDICTORS)}')
  return PREDICTORS[name]


def predictor_step(
    key: Array, x: Array, t: Array, score_fn: ScoreFn, sde: sde_lib.SDE, *,
    predictor: str = 'reverse_diffusion', probability_flow: bool = False,
) -> tuple[Array, Array]:
  """One predictor step with noise drawn from `key`; see `PREDICTORS`.

  Returns:
    `(x [B, ...], x_mean [B, ...])`.

  Raises:
    ValueError: for an unknown predictor.
  """
  update = get_predictor(predictor)
  noise = jax.random.normal(key, x.shape, x.dtype)
  return update(x, t, noise, score_fn, sde, probability_flow)


# -- correctors ---------------------------------------------------------------------------


def _langevin_alpha(t: Array, sde: sde_lib.SDE) -> Array:
  """The `alpha_i = 1 - beta_i` factor of the VP corrector step size (Algorithm 5).

  The reference reads `sde.alphas` and so fails for sub-VP; sub-VP shares VP's `beta(t)`, so
  it uses the same discrete alphas `1 - beta_i / N`. VE uses alpha = 1.
  """
  if isinstance(sde, sde_lib.VariancePreservingSDE | sde_lib.SubVPSDE):
    return jnp.asarray(1.0 - sde_lib.discrete_betas(sde))[_timestep(t, sde)]
  return jnp.ones_like(t)


def _batch_mean_norm(x: Array) -> Array:
  return jnp.mean(jnp.linalg.norm(x.reshape(x.shape[0], -1), axis=-1))


def langevin_update(
    x: Array, t: Array, noise: Array, score_fn: ScoreFn, sde: sde_lib.SDE, snr: float,
) -> tuple[Array, Array]:
  """One Langevin MCMC step with the step size set by the signal-to-noise ratio `snr`.

  `eps = 2 alpha (snr ||z|| / ||s||)^2`, where `||.||` is the **batch mean** of the
  per-sample L2 norms (as in the reference: the batch is coupled, so a sample's step
  depends on the other samples of its batch); `x_mean = x + eps s`,
  `x = x_mean + sqrt(2 eps) z`.

  Returns:
    `(x [B, ...], x_mean [B, ...])`.

  References:
    Song et al. 2021, Algorithm 4 / 5 (corrector of the VE / VP PC samplers).
  """
  score = sde_lib.evaluate_score(score_fn, x, t)
  step_size = (snr * _batch_mean_norm(noise) / _batch_mean_norm(score)) ** 2 * 2
  step_size = step_size * _langevin_alpha(t, sde)
  x_mean = x + batch_mul(step_size, score)
  return x_mean + batch_mul(jnp.sqrt(2 * step_size), noise), x_mean


def annealed_langevin_update(
    x: Array, t: Array, noise: Array, score_fn: ScoreFn, sde: sde_lib.SDE, snr: float,
) -> tuple[Array, Array]:
  """One step of annealed Langevin dynamics: `eps = 2 alpha (snr std(t))^2` per sample.

  Returns:
    `(x [B, ...], x_mean [B, ...])`.

  References:
    Song & Ermon 2019, Algorithm 1.
  """
  score = sde_lib.evaluate_score(score_fn, x, t)
  std = sde.marginal_prob(x, t)[1]
  step_size = (snr * std) ** 2 * 2 * _langevin_alpha(t, sde)
  x_mean = x + batch_mul(step_size, score)
  return x_mean + batch_mul(jnp.sqrt(2 * step_size), noise), x_mean


def none_corrector_update(
    x: Array, t: Array, noise: Array, score_fn: ScoreFn, sde: sde_lib.SDE, snr: float,
) -> tuple[Array, Array]:
  """The identity (predictor-only sampling); costs no score evaluation."""
  del t, noise, score_fn, sde, snr
  return x, x


CORRECTORS: dict[str, Callable[..., tuple[Array, Array]]] = {
    'langevin': langevin_update,
    'ald': annealed_langevin_update,
    'none': none_corrector_update,
}


def get_corrector(name: str) -> Callable[..., tuple[Array, Array]]:
  """Looks up a corrector core by name.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  if name not in CORRECTORS:
    raise ValueError(f'unknown corrector {name!r}; valid choices: {sorted(CORRECTORS)}')
  return CORRECTORS[name]


def corrector_step(
    key: Array, x: Array, t: Array, score_fn: ScoreFn, sde: sde_lib.SDE, *,
    corrector: str = 'langevin', snr: float = 0.16, n_steps: int = 1,
) -> tuple[Array, Array]:
  """`n_steps` corrector updates at time `t`, sub-step `i` drawing its noise from
  `fold_in(key, i)`.

  Returns:
    `(x [B, ...], x_mean [B, ...])` after the last sub-step.

  Raises:
    ValueError: for an unknown corrector.
  """
  update = get_corrector(corrector)
  if corrector == 'none' or n_steps == 0:
    return x, x

  def body(i, carry):
    x, _ = carry
    noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    return update(x, t, noise, score_fn, sde, snr)

  return jax.lax.fori_loop(0, n_steps, body, (x, x))
