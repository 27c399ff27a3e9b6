"""Controllable generation: inpainting and colorization with an unconditional score model.

Owns `pc_inpaint`, `pc_colorize` and the mechanism they share, `pc_sample_observed(key,
score_fn, sde, observed, mask, *, basis=None, ...) -> (samples, nfe)`: predictor-corrector
sampling of `x` given some coordinates of `y = x @ basis` (an orthonormal change of basis of
the channels; the identity for inpainting). After every corrector and predictor step the
observed coordinates of `y` are replaced by the observation perturbed to the time the sample
has reached, `y_t = m(t) y_obs + s(t) z` (`sde.marginal_prob`), the rest is left to the
score model; the returned samples hold the observation exactly. This is the method of Song
et al. 2021, Section 5 and Appendix I.4 (score_sde's `controllable_generation`), with two
deliberate differences: the observation is perturbed to `t_{i+1}` after the predictor step
of `t_i` (the reference uses `t_i` both times), and `x_mean` keeps the predictor's own mean
in the unobserved coordinates (the reference takes them from `x`).

With `n_resample = r > 1`, each step is taken `r` times: before every retake the sample is
pushed back to its grid time by one step of the forward chain (`sde.discretize`, the step
the reverse-diffusion predictor inverts), so the unobserved coordinates get more chances to
agree with the observation (RePaint, Lugmayr et al. 2022, with jumps of one step). NFE is
`r` times the PC sampler's.

With `guidance = w > 0` (reconstruction guidance, Ho et al. 2022, "Video Diffusion Models",
Eq. 7, on top of replacement), the predictor's score is corrected so that its denoised
estimate `x0_hat = (x + std^2 s) / alpha` (Tweedie) moves by `-(w alpha / 2) grad ||A x0_hat -
y||^2` in the unobserved coordinates: the gradient, through the score network, of how far
the model's guess of the clean data is from the observation. Each score evaluation becomes
a VJP (the NFE count is unchanged, each costs ~3 forwards), and it needs `corrector='none'`
(the guided score is computed at the predictor's input). When observed and unobserved
coordinates are independent the gradient is zero and nothing changes; between two modes
(below) weight 5 leaves ~1% of the samples in the wrong mode where replacement leaves ~30%.

Replacement is exact when the observed and unobserved coordinates of the data are
independent, and an approximation otherwise (it does not sample the exact conditional:
between two modes of a Gaussian mixture it leaves ~16% of the samples in the mode the
observation rules out; 20 resampling rounds at the same NFE leave ~4%, see
`tests/test_conditional.py`). It needs an SDE
whose perturbation kernel is isotropic with a mean linear in `x` (VE, VP and sub-VP), so that
perturbing `y` equals perturbing `x` and changing basis.

The whole sampler is one jitted program; the observation, mask and basis are traced
arguments (new data does not recompile), the score function is static.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scorejax import checks, sampling
from scorejax import sde as sde_lib

Array = jax.Array
ScoreFn = sampling.ScoreFn

__all__ = ['MASKS', 'colorization_basis', 'make_conditional_sampler', 'make_mask',
           'pc_colorize', 'pc_inpaint', 'pc_sample_observed']

MASKS = ('right_half', 'bottom_half', 'center', 'random')


def colorization_basis(channels: int = 3) -> np.ndarray:
  """An orthonormal `[C, C]` basis whose first column is `1 / sqrt(C)`: in `y = x @ basis`,
  `y[..., 0] = sqrt(C) * mean(x, channels)` (the gray level) and the other coordinates are
  the colour."""
  checks.check_count('channels', channels)
  q, _ = np.linalg.qr(np.concatenate([np.ones((channels, 1)), np.eye(channels)[:, 1:]], 1))
  return (q * np.sign(q[0, 0])).astype(np.float32)  # QR may flip the first column's sign


def _forward_step(key: Array, x: Array, t: Array, sde: sde_lib.SDE) -> Array:
  """One step of the forward chain into grid time `t`: `x + f + G z` from `sde.discretize`
  (the step the reverse-diffusion predictor inverts)."""
  f, G = sde.discretize(x, t)
  return x + f + sde_lib.batch_mul(G, jax.random.normal(key, x.shape, x.dtype))


@functools.partial(
    jax.jit,
    static_argnames=('score_fn', 'predictor', 'corrector', 'n_corrector_steps', 'denoise',
                     'probability_flow', 'n_resample', 'guidance'),
)
def _pc_sample_observed(key, score_fn, sde, observed, mask, basis, predictor, corrector, snr,
                        n_corrector_steps, denoise, eps, probability_flow, n_resample,
                        guidance):
  prior_key, init_key, loop_key = jax.random.split(key, 3)
  mask = jnp.broadcast_to(mask, observed.shape).astype(observed.dtype)
  to_y = (lambda x: x) if basis is None else (lambda x: x @ basis)
  from_y = (lambda y: y) if basis is None else (lambda y: y @ basis.T)
  y_observed = to_y(observed)

  def replace(x, y_values):
    return from_y(to_y(x) * (1 - mask) + y_values * mask)

  def constrain(key, x, x_mean, t):
    mean, std = sde.marginal_prob(y_observed, t)
    noisy = mean + sde_lib.batch_mul(std, jax.random.normal(key, x.shape, x.dtype))
    return replace(x, noisy), replace(x_mean, mean)

  pc_step = functools.partial(
      sampling.pc_step, sde=sde, predictor=predictor, corrector=corrector,
      snr=snr, n_corrector_steps=n_corrector_steps, probability_flow=probability_flow,
      constrain=constrain)

  def guided_score(x, t):
    """The score plus reconstruction guidance on the unobserved coordinates: the score
    whose denoised estimate moves by `-(w alpha / 2) grad ||A x0_hat(x) - y||^2`."""
    alpha, std = sde.marginal_prob(jnp.ones_like(x), t)

    def denoised(x):  # Tweedie: E[x_0 | x_t] = (x_t + std^2 s) / alpha
      score = sde_lib.evaluate_score(score_fn, x, t)
      return (x + sde_lib.batch_mul(std**2, score)) / alpha, score

    x0, pullback, score = jax.vjp(denoised, x, has_aux=True)
    (gradient,) = pullback(from_y((to_y(x0) - y_observed) * mask))  # of ||.||^2 / 2
    gradient = from_y(to_y(gradient) * (1 - mask))
    return score - guidance * sde_lib.batch_mul(1.0 / std**2, alpha**2 * gradient)

  def one_step(key, x, t, t_next):
    if not guidance:
      return pc_step(key, x, t, t_next, score_fn=score_fn)
    # No corrector (checked): the predictor's one score evaluation is at this x, so the
    # guided score computed here (with the gradient, from one VJP) is the one it needs.
    guided = guided_score(x, t)
    return pc_step(key, x, t, t_next, score_fn=lambda x, t: guided)

  def step(key, x, t, t_next):
    def attempt(j, carry):  # RePaint: go back to t and step again, n_resample times in all
      x, _ = carry
      attempt_key = jax.random.fold_in(key, j)
      x = jnp.where(j > 0, _forward_step(jax.random.fold_in(attempt_key, 2), x, t, sde), x)
      return one_step(attempt_key, x, t, t_next)

    return jax.lax.fori_loop(0, n_resample, attempt, (x, x))

  x = sde.prior_sampling(prior_key, observed.shape)
  x, _ = constrain(init_key, x, x, jnp.full((x.shape[0],), sde.T))
  x, x_mean = sampling.pc_loop(loop_key, x, sde, eps, step)
  return replace(x_mean if denoise else x, y_observed)


def pc_sample_observed(
    key: Array, score_fn: ScoreFn, sde: sde_lib.SDE, observed: Array, mask: Array, *,
    basis: Array | None = None, n_resample: int = 1, guidance: float = 0.0,
    **pc_options: Any,
) -> tuple[Array, int]:
  """PC sampling of `x` given the coordinates of `y = x @ basis` where `mask` is 1.

  Args:
    key: PRNG key; the result is a deterministic function of it.
    score_fn: `score_fn(x [B, ...], t [B]) -> [B, ...]` of the unconditional model (static).
    sde: the forward SDE (VE, VP or sub-VP).
    observed: `[B, ...]` with `observed @ basis` holding the observation where `mask` is 1
      (any values elsewhere); in the model's data range (after the data scaler).
    mask: 1 where `observed @ basis` is observed, 0 where it is sampled; broadcastable to
      `observed.shape` (e.g. `[B, H, W, 1]` or `[H, W, C]`).
    basis: `[C, C]` orthonormal matrix acting on the last axis; `None` is the identity.
    n_resample: RePaint rounds per step (1: none).
    guidance: reconstruction guidance weight `w >= 0` (0: replacement only); needs
      `corrector='none'` and a predictor. Each score evaluation becomes a VJP.
    **pc_options: the keyword arguments of `sampling.pc_sample` (predictor, corrector, snr,
      n_corrector_steps, n_steps, denoise, eps, probability_flow), with its defaults.

  Returns:
    `(samples [B, ...], nfe)`: samples whose observed coordinates equal the observation;
    `nfe` is the number of score evaluations, as for `pc_sample`.

  Raises:
    ValueError: for a mask that does not broadcast to `observed`, a mask with values other
      than 0 and 1, a basis that is not orthonormal `[C, C]`, or the settings `pc_sample`
      rejects.
    TypeError: for a keyword `pc_sample` does not take.
  """
  sde, options, nfe = _check_settings(sde, n_resample, guidance, pc_options)
  observed = jnp.asarray(observed, jnp.float32)
  _check_observation(observed, mask, basis)
  basis = None if basis is None else jnp.asarray(basis, jnp.float32)
  samples = _pc_sample_observed(
      key, score_fn, sde, observed, jnp.asarray(mask), basis,
      options['predictor'], options['corrector'], options['snr'],
      options['n_corrector_steps'], options['denoise'], options['eps'],
      options['probability_flow'], n_resample, float(guidance))
  return samples, nfe


def pc_inpaint(
    key: Array, score_fn: ScoreFn, sde: sde_lib.SDE, data: Array, mask: Array,
    **pc_options: Any,
) -> tuple[Array, int]:
  """Fills the pixels of `data` where `mask` is 0, keeping those where it is 1.

  Args:
    data: `[B, ...]` images (NHWC) or vectors in the model's data range.
    mask: 1 = known, 0 = to inpaint; broadcastable to `data.shape`.
    **pc_options: as `pc_sample_observed`.

  Returns:
    `(samples [B, ...], nfe)`, equal to `data` where `mask` is 1.
  """
  return pc_sample_observed(key, score_fn, sde, data, mask, **pc_options)


def pc_colorize(
    key: Array, score_fn: ScoreFn, sde: sde_lib.SDE, gray: Array, *, channels: int = 3,
    **pc_options: Any,
) -> tuple[Array, int]:
  """Colour images whose channel mean is `gray`.

  Args:
    gray: `[B, H, W, 1]`, the channel mean of the images to find, in the model's data range.
    channels: channels of the model's images.
    **pc_options: as `pc_sample_observed`.

  Returns:
    `(samples [B, H, W, channels], nfe)` whose mean over channels equals `gray`.
  """
  gray = jnp.asarray(gray, jnp.float32)
  if gray.ndim != 4 or gray.shape[-1] != 1:
    raise ValueError(f'gray must be [B, H, W, 1] (the channel mean), got shape {gray.shape}')
  basis = colorization_basis(channels)
  # Any image with this gray level: its first coordinate sqrt(C) * gray is what is observed.
  observed = jnp.broadcast_to(gray, gray.shape[:-1] + (channels,))
  mask = np.eye(channels, dtype=np.float32)[0]
  return pc_sample_observed(key, score_fn, sde, observed, mask, basis=basis, **pc_options)


def make_mask(kind: str, shape: tuple[int, ...], key: Array | None = None) -> np.ndarray:
  """An inpainting mask `[B, H, W, 1]` (1 = known pixel) for images of `shape` `[B, H, W, C]`.

  `'right_half'` / `'bottom_half'`: that half is inpainted; `'center'`: the central square of
  half the side; `'random'`: each pixel independently with probability 1/2 (drawn from `key`).

  Raises:
    ValueError: for an unknown kind (listing `MASKS`), or `'random'` without a key.
  """
  if kind not in MASKS:
    raise ValueError(f'unknown mask {kind!r}; valid choices: {list(MASKS)}')
  batch, height, width = shape[:3]
  mask = np.ones((batch, height, width, 1), np.float32)
  if kind == 'right_half':
    mask[:, :, width // 2:] = 0
  elif kind == 'bottom_half':
    mask[:, height // 2:] = 0
  elif kind == 'center':
    top, left = height // 4, width // 4
    mask[:, top:top + height - height // 2, left:left + width - width // 2] = 0
  else:
    if key is None:
      raise ValueError("mask 'random' needs a key")
    mask = np.asarray(jax.random.bernoulli(key, 0.5, mask.shape), np.float32)
  return mask


def make_conditional_sampler(
    score_fn_builder: Callable[[Any], ScoreFn], sde: sde_lib.SDE, *,
    basis: Array | None = None, n_resample: int = 1, guidance: float = 0.0,
    **pc_options: Any,
) -> Callable[[Array, Any, Array, Array], tuple[Array, int]]:
  """A jitted `sample_fn(key, params, observed, mask) -> (samples, nfe)` for repeated use.

  Parameters, observations and masks are traced (one compilation per shape), as in
  `sampling.make_pc_sampler`; the arguments are those of `pc_sample_observed`, checked now.

  Raises:
    ValueError / TypeError: as `pc_sample_observed`, for the settings (not the data).
  """
  _, _, nfe = _check_settings(sde, n_resample, guidance, pc_options)

  @jax.jit
  def sample(key, params, observed, mask):
    return pc_sample_observed(key, score_fn_builder(params), sde, observed, mask, basis=basis,
                              n_resample=n_resample, guidance=guidance, **pc_options)[0]

  return lambda key, params, observed, mask: (sample(key, params, observed, mask), nfe)


def _check_settings(sde: sde_lib.SDE, n_resample: int, guidance: float,
                    pc_options: dict[str, Any]) -> tuple[sde_lib.SDE, dict[str, Any], int]:
  """Checks the sampler settings; returns the SDE on the grid, `pc_sample`'s options with
  its defaults, and the NFE of one run."""
  options = checks.keyword_arguments(sampling.pc_sample, pc_options)
  sde, n_steps = sampling.check_pc_options(sde, **options)
  checks.check_count('n_resample', n_resample)
  checks.check_in_range('guidance', guidance, low=0.0)
  if guidance and (options['corrector'] != 'none' or options['predictor'] == 'none'):
    raise ValueError(f"guidance needs corrector='none' and a predictor, got predictor="
                     f"{options['predictor']!r}, corrector={options['corrector']!r}")
  nfe = n_resample * sampling.pc_nfe(options['predictor'], options['corrector'],
                                     options['n_corrector_steps'], n_steps)
  return sde, options, nfe


def _check_observation(observed: Array, mask: Any, basis: Any) -> None:
  try:
    np.broadcast_shapes(np.shape(mask), observed.shape)
  except ValueError:
    raise ValueError(f'mask of shape {np.shape(mask)} does not broadcast to the observation '
                     f'of shape {observed.shape}') from None
  values = checks.concrete_array(mask)  # None when traced: not checked
  if values is not None and not np.all(np.isin(np.unique(values), (0, 1))):
    raise ValueError('mask must hold 0 (sample) and 1 (observed) only, got values '
                     f'{np.unique(values)[:5].tolist()}')
  if basis is None:
    return
  channels = observed.shape[-1]
  if np.shape(basis) != (channels, channels):
    raise ValueError(f'basis must be [{channels}, {channels}] (the last axis of the '
                     f'observation), got shape {np.shape(basis)}')
  matrix = checks.concrete_array(basis)
  if matrix is not None:
    deviation = np.abs(matrix.astype(np.float64).T @ matrix - np.eye(channels)).max()
    if deviation > 1e-5:
      raise ValueError('basis must be orthonormal (basis.T @ basis = I); its largest '
                       f'deviation is {deviation:.3g}')
