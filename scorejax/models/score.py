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

References:
  Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
  Equations", ICLR, Appendix C (noise-conditional score networks for each SDE).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from scorejax import sde as sde_lib

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]
ScoreFn = Callable[[Array, Array], Array]

# The reference scales continuous VP time by 999, not N - 1, whatever N is.
VP_CONTINUOUS_LABEL_SCALE = 999.0


def _per_sample(a: Array, x: Array) -> Array:
  return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def make_score_fn(model_fn: ModelFn, sde: sde_lib.SDE, continuous: bool = True) -> ScoreFn:
  """Wraps a network so that its output is the score `grad_x log p_t(x)`.

  Args:
    model_fn: `model_fn(x [B, ...], labels [B]) -> out [B, ...]`.
    sde: a `VESDE`, a VP SDE (`VPSDE`, `CosineVPSDE`, any `VariancePreservingSDE`) or a
      `SubVPSDE`.
    continuous: whether the network was trained with continuous time labels.

  Returns:
    `score_fn(x [B, ...], t [B]) -> score [B, ...]`.

  Raises:
    TypeError: for an SDE class without a known label convention.
  """
  if isinstance(sde, sde_lib.VariancePreservingSDE | sde_lib.SubVPSDE):
    if continuous or isinstance(sde, sde_lib.SubVPSDE):

      def score_fn(x: Array, t: Array) -> Array:
        out = model_fn(x, t * VP_CONTINUOUS_LABEL_SCALE)
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
        return model_fn(x, sde.marginal_prob(jnp.zeros_like(x), t)[1])

    else:

      def score_fn(x: Array, t: Array) -> Array:
        labels = jnp.round((sde.T - t) * (sde.N - 1)).astype(jnp.int32)
        return model_fn(x, labels)

    return score_fn

  raise TypeError(f'no score convention for SDE {type(sde).__name__}; '
                  'valid: VESDE, VariancePreservingSDE (VPSDE, CosineVPSDE), SubVPSDE')
