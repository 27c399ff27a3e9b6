"""Forward SDEs of score-based generative models, and their reverse-time SDE / ODE.

Owns the VE, VP and sub-VP SDEs of Song et al. (2021) and the VP SDE of the cosine schedule
(Nichol & Dhariwal 2021; another VP schedule is a `VariancePreservingSDE` subclass), with the
vocabulary of `score_sde`: `sde(x, t) -> (drift, diffusion)`, `marginal_prob(x, t) ->
(mean, std)`, `prior_sampling(key, shape)`, `prior_logp(z)`, `discretize(x, t) -> (f, G)`
and `reverse(score_fn, probability_flow=False)`.

Conventions: `x` is `[B, ...]` (images are NHWC), `t` is `[B]`; per-sample scalars
(`diffusion`, `std`, `G`, `prior_logp`) are `[B]`. SDE objects are frozen dataclasses
registered as static pytrees, so they can be closed over or passed through `jax.jit`.

References:
  Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
  Equations", ICLR. Eq. (6) reverse SDE, Eq. (13) probability-flow ODE, Appendix B
  (VE / VP / sub-VP), Appendix E (discretizations).
  Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", ICML
  (the cosine schedule).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scorejax import checks

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def batch_mul(a: Array, x: Array) -> Array:
  """Multiplies a per-sample scalar `a [B]` with `x [B, ...]`."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (jnp.ndim(x) - a.ndim)) * x


def _sum_except_batch(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def _discrete_index(t: Array, N: int, T: float) -> Array:
  # Truncation, as the reference's `(t * (N - 1) / T).long()`.
  return (t * (N - 1) / T).astype(jnp.int32)


class SDE(abc.ABC):
  """A forward SDE `dx = f(x, t) dt + g(t) dw` on `t in [0, T]`, with N discrete steps."""

  N: int
  T: float = 1.0

  def _check_grid(self) -> None:
    name = type(self).__name__
    checks.check_count(f'{name}.N', self.N)
    checks.check_in_range(f'{name}.T', self.T, low=0.0, low_open=True)

  @abc.abstractmethod
  def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Returns `(drift [B, ...], diffusion [B])` of the forward SDE."""

  @abc.abstractmethod
  def marginal_prob(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Returns `(mean [B, ...], std [B])` of the perturbation kernel p_0t(x(t) | x(0)=x)."""

  @abc.abstractmethod
  def prior_sampling(self, key: Array, shape: tuple[int, ...]) -> Array:
    """Samples the prior p_T."""

  @abc.abstractmethod
  def prior_logp(self, z: Array) -> Array:
    """Log-density `[B]` of the prior p_T at `z [B, ...]`, in nats."""

  def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
    """One discrete step `x_{i+1} = x_i + f_i(x_i) + G_i z_i` (Euler-Maruyama by default).

    Returns `(f [B, ...], G [B])`.
    """
    dt = 1.0 / self.N
    drift, diffusion = self.sde(x, t)
    return drift * dt, diffusion * jnp.sqrt(dt)

  def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
    """The reverse-time SDE (Eq. 6) or, with `probability_flow`, the ODE (Eq. 13)."""
    return ReverseSDE(self, score_fn, probability_flow)

  @property
  def prior_std(self) -> float:
    """Standard deviation of the isotropic zero-mean Gaussian prior p_T (`prior_logp`)."""
    raise NotImplementedError(f'{type(self).__name__} does not define prior_std')

  def likelihood_weight_integral(self, t: Array) -> Array:
    """`F(t)`, increasing, with `dF/dt = g(t)^2 / std(t)^2` (up to a constant).

    The density `g^2 / std^2 / (F(T) - F(eps))` on `[eps, T]` is the importance sampler of
    the likelihood-weighted loss (`losses.sde_loss(..., importance_weighting=True)`).
    """
    raise NotImplementedError(
        f'{type(self).__name__} has no likelihood_weight_integral; importance weighting '
        'needs one')


def evaluate_score(score_fn: ScoreFn, x: Array, t: Array) -> Array:
  """`score_fn(x, t)`, checked (at trace time, for free) to have the shape of `x`.

  A score of another shape (e.g. `[B]`, or `[D]` from a reduction over the batch) would
  otherwise broadcast into the update, silently or with an error far from its cause.

  Raises:
    ValueError: naming both shapes.
  """
  score = score_fn(x, t)
  if jnp.shape(score) != jnp.shape(x):
    raise ValueError(f'score_fn(x, t) must return the shape of x {tuple(jnp.shape(x))}, got '
                     f'{tuple(jnp.shape(score))}')
  return score


@dataclasses.dataclass(frozen=True)
class ReverseSDE:
  """The reverse-time SDE / probability-flow ODE of `forward` under `score_fn`.

  `sde(x, t)` and `discretize(x, t)` return the reverse drift with the score term:
  `f - g^2 s` (SDE) or `f - g^2 s / 2` with zero diffusion (ODE).
  """

  forward: SDE
  score_fn: ScoreFn
  probability_flow: bool = False

  @property
  def N(self) -> int:
    return self.forward.N

  @property
  def T(self) -> float:
    return self.forward.T

  def _weight(self) -> float:
    return 0.5 if self.probability_flow else 1.0

  def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
    drift, diffusion = self.forward.sde(x, t)
    score = evaluate_score(self.score_fn, x, t)
    drift = drift - batch_mul(diffusion**2, score) * self._weight()
    if self.probability_flow:
      diffusion = jnp.zeros_like(diffusion)
    return drift, diffusion

  def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
    f, G = self.forward.discretize(x, t)
    f = f - batch_mul(G**2, evaluate_score(self.score_fn, x, t)) * self._weight()
    if self.probability_flow:
      G = jnp.zeros_like(G)
    return f, G


def _standard_normal_logp(z: Array, scale: float = 1.0) -> Array:
  dim = np.prod(z.shape[1:])
  return -dim / 2.0 * np.log(2 * np.pi * scale**2) - _sum_except_batch(z**2) / (2 * scale**2)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
  """Variance-exploding SDE: `dx = sigma(t) sqrt(2 log(sigma_max/sigma_min)) dw`,
  `sigma(t) = sigma_min (sigma_max / sigma_min)^t` (SMLD / NCSN in the limit N -> inf)."""

  sigma_min: float = 0.01
  sigma_max: float = 50.0
  N: int = 1000
  T: float = 1.0

  def __post_init__(self):
    self._check_grid()
    checks.check_in_range('VESDE.sigma_min', self.sigma_min, low=0.0, low_open=True)
    checks.check_in_range('VESDE.sigma_max', self.sigma_max, low=self.sigma_min, low_open=True)

  @property
  def discrete_sigmas(self) -> np.ndarray:
    """`[N]` geometric noise levels, ascending."""
    return np.exp(np.linspace(np.log(self.sigma_min), np.log(self.sigma_max), self.N)).astype(
        np.float32
    )

  def sigma(self, t: Array) -> Array:
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

  def sde(self, x, t):
    diffusion = self.sigma(t) * np.sqrt(2 * (np.log(self.sigma_max) - np.log(self.sigma_min)))
    return jnp.zeros_like(x), diffusion

  def marginal_prob(self, x, t):
    return x, self.sigma(t)

  @property
  def prior_std(self):
    return self.sigma_max

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape) * self.sigma_max

  def prior_logp(self, z):
    return _standard_normal_logp(z, self.sigma_max)

  def likelihood_weight_integral(self, t):
    # g^2 / sigma^2 = 2 log(sigma_max / sigma_min) for all t: F = log sigma(t)^2.
    return 2.0 * jnp.log(self.sigma(t))

  def discretize(self, x, t):
    """SMLD discretization: `G_i = sqrt(sigma_i^2 - sigma_{i-1}^2)`, `sigma_{-1} = 0`."""
    index = _discrete_index(t, self.N, self.T)
    sigmas = jnp.asarray(self.discrete_sigmas)
    sigma = sigmas[index]
    adjacent_sigma = jnp.where(index == 0, 0.0, sigmas[jnp.maximum(index - 1, 0)])
    return jnp.zeros_like(x), jnp.sqrt(sigma**2 - adjacent_sigma**2)


class VariancePreservingSDE(SDE):
  """`dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw` for a noise schedule `beta(t)`.

  A subclass gives the schedule as `log_mean_coeff(t) = log alpha(t) = -int_0^t beta / 2`
  and its derivative `beta(t)`, and the `[N]` betas of its discrete DDPM chain; the SDE, the
  perturbation kernel `N(alpha(t) x, 1 - alpha(t)^2)`, the standard normal prior, the DDPM
  discretization and the tables below follow. Samplers, losses and the score convention of
  `scorejax.models.make_score_fn` treat every subclass as they treat `VPSDE`.
  """

  @abc.abstractmethod
  def beta(self, t: Array) -> Array:
    """`beta(t) = -2 d log alpha(t) / dt`."""

  @abc.abstractmethod
  def log_mean_coeff(self, t: Array) -> Array:
    """`log alpha(t)`: the kernel's mean is `alpha(t) x`."""

  @property
  @abc.abstractmethod
  def discrete_betas(self) -> np.ndarray:
    """`[N]` betas of the discrete DDPM chain, each `< 1`."""

  @property
  def alphas(self) -> np.ndarray:
    return (1.0 - self.discrete_betas).astype(np.float32)

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(self.alphas, dtype=np.float32)

  @property
  def sqrt_alphas_cumprod(self) -> np.ndarray:
    return np.sqrt(self.alphas_cumprod)

  @property
  def sqrt_1m_alphas_cumprod(self) -> np.ndarray:
    return np.sqrt(1.0 - self.alphas_cumprod)

  def sde(self, x, t):
    beta_t = self.beta(t)
    return -0.5 * batch_mul(beta_t, x), jnp.sqrt(beta_t)

  def marginal_prob(self, x, t):
    log_mean_coeff = self.log_mean_coeff(t)
    # -expm1 keeps std accurate for small t, where 1 - exp(.) cancels in float32.
    std = jnp.sqrt(-jnp.expm1(2.0 * log_mean_coeff))
    return batch_mul(jnp.exp(log_mean_coeff), x), std

  @property
  def prior_std(self):
    return 1.0

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape)

  def prior_logp(self, z):
    return _standard_normal_logp(z)

  def likelihood_weight_integral(self, t):
    # g^2 / std^2 = beta / (1 - alpha^2) and d alpha^2 / dt = -beta alpha^2, so
    # F = log(1 - alpha^2) - log alpha^2: minus the log signal-to-noise ratio.
    log_alpha_sq = 2.0 * self.log_mean_coeff(t)
    return jnp.log(-jnp.expm1(log_alpha_sq)) - log_alpha_sq

  def discretize(self, x, t):
    """DDPM discretization: `x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z`."""
    index = _discrete_index(t, self.N, self.T)
    beta = jnp.asarray(self.discrete_betas)[index]
    alpha = jnp.asarray(self.alphas)[index]
    return batch_mul(jnp.sqrt(alpha), x) - x, jnp.sqrt(beta)


@dataclasses.dataclass(frozen=True)
class _LinearBetas:
  """The linear schedule `beta(t) = beta_min + t (beta_max - beta_min)` of VP and sub-VP."""

  beta_min: float = 0.1
  beta_max: float = 20.0
  N: int = 1000
  T: float = 1.0

  def __post_init__(self):
    _check_betas(self)

  def beta(self, t: Array) -> Array:
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def log_mean_coeff(self, t: Array) -> Array:
    """`log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2`."""
    return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class VPSDE(_LinearBetas, VariancePreservingSDE):
  """Variance-preserving SDE: `dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw`,
  `beta(t) = beta_min + t (beta_max - beta_min)` (DDPM in the limit N -> inf)."""

  @property
  def discrete_betas(self) -> np.ndarray:
    """`[N]` DDPM betas `linspace(beta_min, beta_max, N) / N` (`discrete_betas`)."""
    return discrete_betas(self)


# iDDPM clips its discrete betas here: a beta near 1 would make the ancestral step divide by
# sqrt(1 - beta) ~ 0.
MAX_DISCRETE_BETA = 0.999


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CosineVPSDE(VariancePreservingSDE):
  """The VP SDE of the cosine schedule of Nichol & Dhariwal (2021), truncated at `logsnr_min`.

  `alpha(t)^2 = cos^2(phi(t)) / cos^2(phi_0)` with `phi(t) = phi_0 + (phi_T - phi_0) t / T`
  and `phi_0 = pi/2 s / (1 + s)` (iDDPM's offset `s`). iDDPM runs `phi` up to `pi/2`, where
  `alpha = 0` and `beta(t) = 2 (phi_T - phi_0) tan(phi(t)) / T` is infinite; here `phi_T` is
  set so that the log signal-to-noise ratio `log(alpha^2 / (1 - alpha^2))` at `T` is
  `logsnr_min`, which keeps `beta` finite (the default -10 is the end point of the linear
  `VPSDE(0.1, 20)`: the same distance to the standard normal prior). So `alpha(0) = 1`, the
  kernel is exact at every `t`, and the schedule is iDDPM's up to a rescaling of time by
  `(phi_T - phi_0) / (pi/2 - phi_0)` (0.4% at -10).

  The discrete chain is iDDPM's construction on this schedule:
  `beta_i = min(1 - alpha(t_{i+1})^2 / alpha(t_i)^2, MAX_DISCRETE_BETA)`, `t_i = i T / N`.

  References:
    Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", Eq. (17).
  """

  s: float = 0.008
  logsnr_min: float = -10.0
  N: int = 1000
  T: float = 1.0

  def __post_init__(self):
    self._check_grid()
    checks.check_in_range('CosineVPSDE.s', self.s, low=0.0)
    # Below -20, pi/2 - phi_T nears float32's resolution at pi/2 and beta(T) loses its digits;
    # at or above 0 the prior N(0, I) is far from the marginal at T.
    checks.check_in_range('CosineVPSDE.logsnr_min', self.logsnr_min, low=-20.0, high=0.0,
                          high_open=True)

  @property
  def phi_0(self) -> float:
    return 0.5 * np.pi * self.s / (1.0 + self.s)

  @property
  def phi_T(self) -> float:
    alpha_sq_T = 1.0 / (1.0 + np.exp(-self.logsnr_min))  # sigmoid(logsnr_min)
    return float(np.arccos(np.sqrt(alpha_sq_T) * np.cos(self.phi_0)))

  def _phi(self, t):
    return self.phi_0 + (self.phi_T - self.phi_0) * t / self.T

  def beta(self, t: Array) -> Array:
    return 2.0 * (self.phi_T - self.phi_0) / self.T * jnp.tan(self._phi(t))

  def log_mean_coeff(self, t: Array) -> Array:
    # cos(phi_0 + d) / cos(phi_0) = 1 - 2 sin^2(d / 2) - tan(phi_0) sin(d), under log1p: the
    # plain log(cos(phi(t))) - log(cos(phi_0)) loses std(t) to rounding at small t.
    d = (self.phi_T - self.phi_0) * t / self.T
    return jnp.log1p(-2.0 * jnp.sin(0.5 * d) ** 2 - np.tan(self.phi_0) * jnp.sin(d))

  @property
  def discrete_betas(self) -> np.ndarray:
    phi = self.phi_0 + (self.phi_T - self.phi_0) * np.arange(self.N + 1) / self.N
    alpha_sq = np.cos(phi) ** 2
    betas = 1.0 - alpha_sq[1:] / alpha_sq[:-1]
    return np.minimum(betas, MAX_DISCRETE_BETA).astype(np.float32)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class SubVPSDE(_LinearBetas, SDE):
  """Sub-VP SDE: `dx = -beta(t) x / 2 dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw`.

  Its marginal variance is bounded by the VP one; `marginal_prob` returns the std
  `1 - exp(2 log alpha(t))`. Uses the Euler-Maruyama `discretize`.
  """

  def sde(self, x, t):
    beta_t = self.beta(t)
    discount = -jnp.expm1(-2 * self.beta_min * t - (self.beta_max - self.beta_min) * t**2)
    return -0.5 * batch_mul(beta_t, x), jnp.sqrt(beta_t * discount)

  def marginal_prob(self, x, t):
    log_mean_coeff = self.log_mean_coeff(t)
    return batch_mul(jnp.exp(log_mean_coeff), x), -jnp.expm1(2.0 * log_mean_coeff)

  @property
  def prior_std(self):
    return 1.0

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape)

  def prior_logp(self, z):
    return _standard_normal_logp(z)

  def likelihood_weight_integral(self, t):
    # std = 1 - alpha^2 and g^2 = beta (1 - alpha^4): g^2 / std^2 = beta (1 + alpha^2) /
    # (1 - alpha^2), whose integral is 2 log(1 - alpha^2) - log alpha^2.
    log_alpha_sq = 2.0 * self.log_mean_coeff(t)
    return 2.0 * jnp.log(-jnp.expm1(log_alpha_sq)) - log_alpha_sq


def _check_betas(sde: VPSDE | SubVPSDE) -> None:
  sde._check_grid()
  name = type(sde).__name__
  checks.check_in_range(f'{name}.beta_min', sde.beta_min, low=0.0)
  checks.check_in_range(f'{name}.beta_max', sde.beta_max, low=0.0, low_open=True)


def discrete_betas(sde: VariancePreservingSDE | SubVPSDE, *, strict: bool = False
                   ) -> np.ndarray:
  """`[N]` betas of the DDPM chain on the grid of `sde`.

  They are the reverse-diffusion, ancestral and Langevin-corrector tables of the VP family
  and of sub-VP. For the linear schedule (`VPSDE`, `SubVPSDE`) they are
  `linspace(beta_min, beta_max, N) / N`. A chain needs every `beta_i <= 1`
  (`alpha_i = 1 - beta_i` goes under a square root), and `< 1` with `strict` (ancestral
  sampling divides by `sqrt(alpha_i)`); with few steps (`N` near `beta_max`) the linear
  schedule fails that, and the sampler would return NaN. Other schedules build tables that
  stay below 1 (`sde.discrete_betas`).

  Raises:
    ValueError: when a linear-schedule beta is too large, naming N, beta_max and the
      smallest valid N.
  """
  if not isinstance(sde, VPSDE | SubVPSDE):
    return sde.discrete_betas
  betas = np.linspace(sde.beta_min / sde.N, sde.beta_max / sde.N, sde.N, dtype=np.float32)
  largest = max(sde.beta_min, sde.beta_max)
  if largest / sde.N > 1 or (strict and largest / sde.N >= 1):
    smallest = int(np.floor(largest)) + 1 if strict else int(np.ceil(largest))
    raise ValueError(
        f'{type(sde).__name__}(beta_min={sde.beta_min:g}, beta_max={sde.beta_max:g}) on '
        f'N={sde.N} steps: the discrete '
        f'betas beta/N reach {largest / sde.N:g} but must stay {"< 1" if strict else "<= 1"}; '
        f'use N >= {smallest} (n_steps of the sampler; sampling.num_steps or model.num_scales '
        f'in a config), or predictor=euler_maruyama with corrector=none')
  return betas


SDES: dict[str, type[SDE]] = {'vesde': VESDE, 'vpsde': VPSDE, 'subvpsde': SubVPSDE,
                              'cosinevpsde': CosineVPSDE}


def make_sde(
    name: str,
    *,
    sigma_min: float = 0.01,
    sigma_max: float = 50.0,
    beta_min: float = 0.1,
    beta_max: float = 20.0,
    num_scales: int = 1000,
    cosine_s: float = 0.008,
    logsnr_min: float = -10.0,
) -> SDE:
  """Builds an SDE by name (`'vesde' | 'vpsde' | 'subvpsde' | 'cosinevpsde'`,
  case-insensitive) with the fields that SDE reads.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  key = name.lower()
  if key not in SDES:
    raise ValueError(f'unknown sde {name!r}; valid choices: {sorted(SDES)}')
  if key == 'vesde':
    return VESDE(sigma_min=sigma_min, sigma_max=sigma_max, N=num_scales)
  if key == 'cosinevpsde':
    return CosineVPSDE(s=cosine_s, logsnr_min=logsnr_min, N=num_scales)
  return SDES[key](beta_min=beta_min, beta_max=beta_max, N=num_scales)
