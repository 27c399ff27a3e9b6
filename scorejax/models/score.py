"""Network output -> score: the pure function that ties a network to an SDE.

A network is a `model_fn(x, labels) -> out` (parameters, and a dropout key when
training, already bound). `make_score_fn` turns it into `score_fn(x, t)` exactly as
score_sde's `get_score_fn` does, so that networks trained with the reference (and
their imported checkpoints) give the same scores:

* VP / sub-VP, continuous: `labels = 999 t`, `score = -out / std(t)` (the network
  predicts the noise `z` of `x_t = mean + std z`).
* VP, discrete (DDPM): `labels = t (N - 1)`, `std = sqrt(1 - alphas_cumprod)[labels]`.
  sub-VP is always treated as continuous, as in the reference.
* VE, continuous: `labels = sigma(t)` (NCSN++ embeds `log sigma` with Fourier features
  and divides by sigma itself when `scale_by_sigma`), `score = out`.
* VE, discrete (SMLD): `labels = round((T - t) (N - 1))`, an index into the
  *descending* table of noise levels, `score = out`.

With `preconditioning=EDMPreconditioning(sigma_data)` (continuous time only, any SDE) the
network is instead the `F` of Karras et al. 2022 (Sec. 5, Table 1): in the scaled state
`y = x / alpha_t` at noise level `s = sigma_t / alpha_t` (`x_t = alpha_t x_0 + sigma_t z`),

  D(y; s) = c_skip(s) y + c_out(s) F(c_in(s) y, labels),     score = (alpha_t D - x) / sigma_t^2,

  c_in = 1 / sqrt(s^2 + sigma_data^2),  c_skip = sigma_data^2 / (s^2 + sigma_data^2),
  c_out = s sigma_data / sqrt(s^2 + sigma_data^2),

so the network's input and its training target (`scorejax.edm_loss`) have unit variance at
every noise level, and at small noise the denoiser is mostly the skip connection. One
departure from the paper: the time input keeps the continuous labels above (`999 t` or
`sigma_t`) instead of EDM's `c_noise = ln(s) / 4`, because the time embeddings of the networks
here (Fourier features of `log sigma`, positional ones of `999 t`) are built for those.

References:
  Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
  Equations", ICLR, Appendix C (noise-conditional score networks for each SDE).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from scorejax import fast_solvers
from scorejax import sde as sde_lib

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]
ScoreFn = Callable[[Array, Array], Array]

# The reference scales continuous VP time by 999, not N - 1, whatever N is.
VP_CONTINUOUS_LABEL_SCALE = 999.0


def _per_sample(a: Array, x: Array) -> Array:
  return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


PRECONDITIONINGS = ('', 'edm')  # model.preconditioning: '' (score_sde's outputs), 'edm'


@dataclasses.dataclass(frozen=True)
class EDMPreconditioning:
  """Karras et al. 2022's network preconditioning (module docstring); `sigma_data` is the
  standard deviation of the data (0.5 for images in [-1, 1] in the paper)."""

  sigma_data: float = 0.5

  def coefficients(self, s: Array) -> tuple[Array, Array, Array]:
    """`(c_in, c_skip, c_out)` at noise levels `s`."""
    total = s**2 + self.sigma_data**2
    c_in = jax.lax.rsqrt(total)
    return c_in, self.sigma_data**2 / total, s * self.sigma_data * c_in


def make_preconditioning(name: str, sigma_data: float) -> EDMPreconditioning | None:
  """The preconditioning named by `model.preconditioning` ('' is none).

  Raises:
    ValueError: for an unknown name (listing the valid ones) or `sigma_data <= 0`.
  """
  if name not in PRECONDITIONINGS:
    raise ValueError(f'unknown model.preconditioning {name!r}; valid choices: '
                     f'{list(PRECONDITIONINGS)}')
  if not name:
    return None
  if not sigma_data > 0:
    raise ValueError(f'model.sigma_data must be > 0, got {sigma_data!r}')
  return EDMPreconditioning(float(sigma_data))


def _continuous_labels(sde: sde_lib.SDE, x: Array, t: Array) -> Array:
  if isinstance(sde, sde_lib.VESDE):
    return sde.marginal_prob(jnp.zeros_like(x), t)[1]
  return t * VP_CONTINUOUS_LABEL_SCALE


def _unknown_sde(sde: sde_lib.SDE) -> TypeError:
  return TypeError(f'no score convention for SDE {type(sde).__name__}; '
                   'valid: VESDE, VariancePreservingSDE (VPSDE, CosineVPSDE), SubVPSDE')


def _preconditioned_score_fn(model_fn: ModelFn, sde: sde_lib.SDE,
                             preconditioning: EDMPreconditioning) -> ScoreFn:
  if not isinstance(sde, sde_lib.VESDE | sde_lib.VariancePreservingSDE | sde_lib.SubVPSDE):
    raise _unknown_sde(sde)

  def score_fn(x: Array, t: Array) -> Array:
    alpha, sigma = (_per_sample(a, x) for a in fast_solvers.kernel(sde, t))
    level = sigma / alpha
    c_in, c_skip, c_out = preconditioning.coefficients(level)
    out = model_fn(c_in * (x / alpha), _continuous_labels(sde, x, t))
    # alpha D - x = alpha c_out F - (1 - c_skip) x: without the cancellation of alpha D
    # against x, which loses every digit at small noise (sub-VP: sigma_t ~ 1e-4 at t = 1e-3).
    skip_complement = level**2 / (level**2 + preconditioning.sigma_data**2)
    return (alpha * c_out * out - skip_complement * x) / sigma**2

  return score_fn


def make_score_fn(model_fn: ModelFn, sde: sde_lib.SDE, continuous: bool = True, *,
                  preconditioning: EDMPreconditioning | None = None) -> ScoreFn:
  """Wraps a network so that its output is the score `grad_x log p_t(x)`.

  Args:
    model_fn: `model_fn(x [B, ...], labels [B]) -> out [B, ...]`.
    sde: a `VESDE`, a VP SDE (`VPSDE`, `CosineVPSDE`, any `VariancePreservingSDE`) or a
      `SubVPSDE`.
    continuous: whether the network was trained with continuous time labels.
    preconditioning: `EDMPreconditioning`: the network is EDM's `F` (continuous only).

  Returns:
    `score_fn(x [B, ...], t [B]) -> score [B, ...]`.

  Raises:
    TypeError: for an SDE class without a known label convention.
    ValueError: for a preconditioning with discrete time labels.
  """
  if preconditioning is not None:
    if not continuous:
      raise ValueError('model.preconditioning needs training.continuous=True (the network '
                       'takes continuous time labels)')
    return _preconditioned_score_fn(model_fn, sde, preconditioning)
  if isinstance(sde, sde_lib.VariancePreservingSDE | sde_lib.SubVPSDE):
    if continuous or isinstance(sde, sde_lib.SubVPSDE):

      def score_fn(x: Array, t: Array) -> Array:
        out = model_fn(x, _continuous_labels(sde, x, t))
        std = sde.marginal_prob(jnp.zeros_like(x), t)[1]
        return -out / _per_sample(std, out)

    else:
      sqrt_1m_alphas_cumprod = jnp.asarray(sde.sqrt_1m_alphas_cumprod)

      def score_fn(x: Array, t: Array) -> Array:
        labels = t * (sde.N - 1)
        out = model_fn(x, labels)
        std = sqrt_1m_alphas_cumprod[labels.astype(jnp.int32)]
        return -out / _per_sample(std, out)

    return score_fn

  if isinstance(sde, sde_lib.VESDE):
    if continuous:

      def score_fn(x: Array, t: Array) -> Array:
        return model_fn(x, _continuous_labels(sde, x, t))

    else:

      def score_fn(x: Array, t: Array) -> Array:
        labels = jnp.round((sde.T - t) * (sde.N - 1)).astype(jnp.int32)
        return model_fn(x, labels)

    return score_fn

  raise _unknown_sde(sde)
