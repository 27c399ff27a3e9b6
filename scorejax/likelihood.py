"""Exact log-likelihood of score-based models through the probability-flow ODE, and bits/dim.

Owns `log_likelihood(key, score_fn, sde, x, ...) -> (logp, z, nfe)` and
`bits_per_dim(key, score_fn, sde, x, ...) -> (bpd, nfe)`. The probability-flow ODE
`dx/dt = f_ode(x, t)` (Eq. 13) is integrated from `eps` to `T` together with the
instantaneous change of variables `d log p(x(t)) / dt = -div f_ode(x(t), t)`, so
`log p_eps(x) = log p_T(z) + int_eps^T div f_ode dt` with `z = x(T)` (Eq. 39-40). Solving
happens inside `jit` (`scorejax.ode`), with the error norm over the joint state
`(x, delta_logp)` as the reference's scipy RK45 does.

Divergence estimators (`ESTIMATORS`):
- `'rademacher'` / `'gaussian'`: Hutchinson-Skilling, `div f ~ eps^T (df/dx) eps` with one
  noise `eps` drawn per sample and kept fixed along the trajectory. One Jacobian product per
  evaluation yields the drift (its primal) and `(df/dx) eps` or `eps^T (df/dx)` together, so
  one NFE costs one linearized pass, where the reference ran the forward twice (the drift,
  then again inside a gradient). `jacobian_product='jvp'` (forward mode, also what `'auto'`,
  the default, takes) and `'vjp'` (reverse mode) give the same estimate up to float rounding.
  Forward mode is the cheaper one: a JVP costs the forward plus one tangent convolution per
  layer and keeps no residuals (1.83 forwards per NFE in the solver loop, `docs/benchmarks.md`),
  a VJP a forward that stores its activations plus a backward pass (1.95). The networks'
  `scorejax.models.conv.conv2d` is a JAX primitive with forward- and reverse-mode rules, so
  both modes work through them; its transposes are
  canonical-layout convolutions, which keeps the VJP as fast inside the solver's while loop
  as outside (with XLA's own convolution gradient the in-loop input-gradient convolutions
  keep a transposed kernel, `dim_labels=b01f_01oi`, which XLA:CPU runs as a generic loop
  nest, ~3x slower).
- `'exact'`: the full trace, `D` Jacobian-vector products of one linearization; for
  low-dimensional data (`D` up to a few dozen).

References:
  Song et al. 2021, ICLR, Eq. (13), Appendix D.2 (Eq. 39-40, exact likelihood computation).
  Chen et al. 2018 (Neural ODEs), Grathwohl et al. 2019 (FFJORD): instantaneous change of
  variables and Hutchinson's trace estimator. Skilling 1989; Hutchinson 1990.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scorejax import checks
from scorejax import ode as ode_lib
from scorejax import sde as sde_lib

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

ESTIMATORS = ('rademacher', 'gaussian', 'exact')
JACOBIAN_PRODUCTS = ('auto', 'jvp', 'vjp')


def _sum_except_batch(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def _hutchinson_noise(key: Array, shape: tuple[int, ...], estimator: str) -> Array | None:
  if estimator == 'gaussian':
    return jax.random.normal(key, shape)
  if estimator == 'rademacher':
    return jax.random.rademacher(key, shape, jnp.float32)
  return None


def _is_forward_mode(jacobian_product: str) -> bool:
  """`'auto'` is forward mode: the cheaper one (module docstring), for every network."""
  return jacobian_product in ('auto', 'jvp')


def _exact_divergence(fn: Callable[[Array], Array], x: Array,
                      jacobian_product: str) -> tuple[Array, Array]:
  """`(fn(x), div fn(x) [B])` for a batch-separable `fn`, by `D` products of one linearization.

  Forward mode (`D` JVPs of `jax.linearize`) unless `jacobian_product == 'vjp'`: then `D`
  VJPs of one `jax.vjp`.
  """
  batch, dim = x.shape[0], int(np.prod(x.shape[1:]))
  basis = jnp.broadcast_to(jnp.eye(dim, dtype=x.dtype)[:, None, :], (dim, batch, dim))
  basis = basis.reshape((dim,) + x.shape)
  if _is_forward_mode(jacobian_product):
    out, product_fn = jax.linearize(fn, x)
  else:
    out, vjp_fn = jax.vjp(fn, x)
    product_fn = lambda v: vjp_fn(v)[0]
  columns = jax.vmap(product_fn)(basis).reshape(dim, batch, dim)
  return out, jnp.einsum('ibi->b', columns)


def _hutchinson_product(fn: Callable[[Array], Array], x: Array, noise: Array,
                        jacobian_product: str) -> tuple[Array, Array]:
  """`(fn(x), noise^T (dfn/dx) noise [B])` from one JVP or one VJP (see `JACOBIAN_PRODUCTS`)."""
  if _is_forward_mode(jacobian_product):
    out, jacobian_noise = jax.jvp(fn, (x,), (noise,))
    return out, _sum_except_batch(jacobian_noise * noise)
  out, vjp_fn = jax.vjp(fn, x)
  return out, _sum_except_batch(vjp_fn(noise)[0] * noise)


def _augmented_vector_field(score_fn: ScoreFn, sde: sde_lib.SDE, estimator: str,
                            noise: Array | None, batch: int, jacobian_product: str = 'auto'):
  reverse = sde.reverse(score_fn, probability_flow=True)

  def vector_field(t, state):
    x, _ = state
    drift_fn = lambda y: reverse.sde(y, jnp.full((batch,), t, y.dtype))[0]
    if estimator == 'exact':
      return _exact_divergence(drift_fn, x, jacobian_product)
    return _hutchinson_product(drift_fn, x, noise, jacobian_product)

  return vector_field


@functools.partial(jax.jit, static_argnames=('score_fn', 'estimator', 'method', 'n_steps',
                                             'jacobian_product'))
def _log_likelihood(key, score_fn, sde, x, estimator, rtol, atol, eps, method, n_steps,
                    jacobian_product):
  batch = x.shape[0]
  noise = _hutchinson_noise(key, x.shape, estimator)
  vector_field = _augmented_vector_field(score_fn, sde, estimator, noise, batch,
                                         jacobian_product)
  state0 = (x, jnp.zeros((batch,), x.dtype))
  (z, delta_logp), nfe = ode_lib.solve_ode(vector_field, state0, eps, sde.T, method=method,
                                           rtol=rtol, atol=atol, n_steps=n_steps)
  return sde.prior_logp(z) + delta_logp, z, nfe


def log_likelihood(
    key: Array,
    score_fn: ScoreFn,
    sde: sde_lib.SDE,
    x: Array,
    *,
    estimator: str = 'rademacher',
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    method: str = 'tsit5',
    n_steps: int | None = None,
    jacobian_product: str = 'auto',
) -> tuple[Array, Array, Array]:
  """Log-density of `x` under the model's probability-flow ODE, in nats.

  Args:
    key: PRNG key for the Hutchinson noise (unused by `'exact'`).
    score_fn: `score_fn(x [B, ...], t [B]) -> [B, ...]` (a static argument of the program).
    sde: the forward SDE.
    x: `[B, ...]` data in model space (already scaled, e.g. to [-1, 1]).
    estimator: one of `ESTIMATORS`.
    rtol: relative tolerance of the adaptive solver.
    atol: absolute tolerance of the adaptive solver.
    eps: the starting time; the result is `log p_eps(x)`, which tends to `log p_0(x)`.
    method: a key of `scorejax.ode.ODE_METHODS`.
    n_steps: steps of the fixed-step methods; `None` means `sde.N`.
    jacobian_product: how the Jacobian products are taken: `'jvp'` (forward mode), `'vjp'`
      (reverse mode), or `'auto'`: the faster one, forward mode (module docstring). The score
      function must support the chosen mode (a `jax.custom_vjp` inside it has no forward
      mode: pass `'vjp'` for such a function).

  Returns:
    `(logp [B], z [B, ...], nfe)`: log-density in nats, the latent `x(T)`, and the number of
    ODE right-hand-side evaluations (int32 scalar; each is one JVP or VJP of the score
    network, primal included, for the Hutchinson estimators).

  Raises:
    ValueError: for an unknown estimator, Jacobian product or method (listing the valid ones),
      `eps` outside `(0, T)`, or bad solver arguments (`scorejax.ode.check_solver_arguments`).
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f'unknown estimator {estimator!r}; valid choices: {list(ESTIMATORS)}')
  if jacobian_product not in JACOBIAN_PRODUCTS:
    raise ValueError(f'unknown jacobian_product {jacobian_product!r}; valid choices: '
                     f'{list(JACOBIAN_PRODUCTS)}')
  n_steps = sde.N if n_steps is None else n_steps
  ode_lib.check_solver_arguments(method, rtol=rtol, atol=atol, n_steps=n_steps)
  checks.check_time('eps', eps, sde.T)
  return _log_likelihood(key, score_fn, sde, jnp.asarray(x), estimator, rtol, atol, eps,
                         method, n_steps, jacobian_product)


def bits_per_dim(
    key: Array,
    score_fn: ScoreFn,
    sde: sde_lib.SDE,
    x: Array,
    *,
    centered: bool = False,
    dequantize: bool = True,
    num_repeats: int = 1,
    estimator: str = 'rademacher',
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    method: str = 'tsit5',
) -> tuple[Array, Array]:
  """Bits per dimension of 8-bit images, following score_sde's evaluation protocol.

  The protocol of score_sde (`run_lib.evaluate` with `datasets.get_dataset(...,
  uniform_dequantization=True)` and `likelihood.get_likelihood_fn`):
  1. `x` holds pixel values `k / 255` in [0, 1]. With `dequantize`, each repeat draws
     `u ~ U[0, 1)` and uses `x = (255 x + u) / 256` in [0, 1).
  2. The data scaler maps it to model space: `y = 2 x - 1` if `centered`, else `y = x`.
  3. `logp = log p(y)` by `log_likelihood`, and
     `bpd = -logp / (D ln 2) + 8 + log2(d inverse_scaler / dy)`, i.e. the offset is 7 when
     centered and 8 otherwise (score_sde: `offset = log2(grad(inverse_scaler)(0.)) + 8`).
     This is the change of variables to the [0, 256) pixel scale: a density over bins of
     width 1 there, `p_256 = p(y) (dy/dx) / 256` per dimension.
  Each repeat uses fresh dequantization and Hutchinson noise (`fold_in(key, repeat)`).

  Args:
    key: PRNG key.
    score_fn: `score_fn(y [B, ...], t [B])` in model space.
    sde: the forward SDE.
    x: `[B, H, W, C]` (or any `[B, ...]`) data in [0, 1].
    centered: whether the model space is [-1, 1] (`y = 2x - 1`) rather than [0, 1].
    dequantize: add uniform dequantization noise as above.
    num_repeats: passes over `x` to average (score_sde's `bpd_num_repeats`).
    estimator: divergence estimator of `log_likelihood`.
    rtol: relative tolerance.
    atol: absolute tolerance.
    eps: starting time of the ODE.
    method: ODE method.

  Returns:
    `(bpd [B], nfe)`: bits/dim per sample averaged over the repeats, and the total number
    of ODE evaluations over the repeats.

  Raises:
    ValueError: for `num_repeats < 1` and the arguments `log_likelihood` rejects.
  """
  def nll(repeat_key, y):
    logp, _, nfe = log_likelihood(repeat_key, score_fn, sde, y, estimator=estimator, rtol=rtol,
                                  atol=atol, eps=eps, method=method)
    return -logp, nfe
  return dequantized_bits_per_dim(key, nll, x, centered=centered, dequantize=dequantize,
                                  num_repeats=num_repeats)


def dequantized_bits_per_dim(
    key: Array,
    nll_fn: Callable[[Array, Array], tuple[Array, Array | int]],
    x: Array,
    *,
    centered: bool,
    dequantize: bool,
    num_repeats: int,
) -> tuple[Array, Array | int]:
  """Steps 1-3 of `bits_per_dim`'s protocol around any `nll_fn(key, y) -> (nll [B], count)`
  in nats (an exact NLL or a bound): `(bpd [B] averaged over the repeats, total count)`.

  Raises:
    ValueError: for `num_repeats < 1`.
  """
  checks.check_count('num_repeats', num_repeats)
  x = jnp.asarray(x, jnp.float32)
  dim = int(np.prod(x.shape[1:]))
  offset = 7.0 if centered else 8.0
  bpds, count = [], 0
  for repeat in range(num_repeats):
    dequantize_key, nll_key = jax.random.split(jax.random.fold_in(key, repeat))
    data = x
    if dequantize:
      data = (255.0 * x + jax.random.uniform(dequantize_key, x.shape)) / 256.0
    y = 2.0 * data - 1.0 if centered else data
    nll, repeat_count = nll_fn(nll_key, y)
    bpds.append(nll / (dim * np.log(2.0)) + offset)
    count = count + repeat_count
  return jnp.mean(jnp.stack(bpds), axis=0), count
