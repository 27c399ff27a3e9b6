"""Inpainting and colorization (`scorejax.conditional`) with exact scores.

Replacement sampling is exact when the observed and unobserved coordinates of the data are
independent: then the unobserved ones must follow their marginal law (checked with the
tolerances of `test_sampling._assert_law`). When an observation decides between mixture
components, the samples must land in the component the exact conditional puts its weight on;
where replacement is known to be biased (an observation between two modes), RePaint-style
resampling must move the samples toward the exact conditional.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampling import SDES, _assert_law

from scorejax import analytic, conditional, sampling

N = 2000


def _cross_covariance_is_zero(a, b, k=4.0, bias=0.03):
  """Sample cross-covariance of independent `a [n, p]`, `b [n, q]` within k standard errors
  (`sqrt(var_a var_b / n)`) plus a bias budget relative to the scales."""
  a = np.asarray(a, np.float64).reshape(len(a), -1)
  b = np.asarray(b, np.float64).reshape(len(b), -1)
  cross = (a - a.mean(0)).T @ (b - b.mean(0)) / (len(a) - 1)
  scale = np.sqrt(np.outer(a.var(0), b.var(0)))
  np.testing.assert_array_less(np.abs(cross), k * scale / np.sqrt(len(a)) + bias * scale)


@pytest.mark.parametrize('name', sorted(SDES))
def test_inpainting_independent_pixels_follows_their_law(name):
  # 2x2 one-channel images with independent pixels; the left column is observed (each
  # sample its own draw of the data), the right column must follow its own marginal.
  sde = SDES[name]
  means = jnp.array([[[1.0], [-1.0]], [[0.5], [2.0]]])
  variances = jnp.array([[[0.5], [1.0]], [[2.0], [0.25]]])
  data = analytic.GaussianMixture.diagonal([1.0], means[None], variances[None])
  observed = data.sample(jax.random.key(3), N)
  mask = jnp.array([[[1.0], [0.0]], [[1.0], [0.0]]])  # [H, W, 1], broadcast over the batch
  samples, nfe = conditional.pc_inpaint(jax.random.key(1), data.score_fn(sde), sde, observed,
                                        mask)
  assert nfe == 2 * sde.N
  samples = np.asarray(samples)
  np.testing.assert_array_equal(samples[:, :, 0], observed[:, :, 0])
  right = analytic.GaussianMixture.diagonal([1.0], means[None, :, 1], variances[None, :, 1])
  _assert_law(samples[:, :, 1].reshape(N, 2), right)
  _cross_covariance_is_zero(samples[:, :, 0], samples[:, :, 1])


MODES = analytic.GaussianMixture.diagonal(
    [0.5, 0.5], jnp.array([[-2.0, -2.0], [2.0, 2.0]]), 0.25)


@pytest.mark.parametrize('name', sorted(SDES))
def test_inpainting_a_decisive_observation_picks_its_component(name):
  # x0 = 2 gives the right component a posterior weight of 1 - 1e-14: x1 | x0 ~ N(2, 0.25).
  sde = SDES[name]
  observed = jnp.zeros((N, 2)).at[:, 0].set(2.0)
  samples, _ = conditional.pc_inpaint(jax.random.key(2), MODES.score_fn(sde), sde, observed,
                                      jnp.array([1.0, 0.0]), n_steps=500)
  assert np.all(np.asarray(samples[:, 0]) == 2.0)
  _assert_law(samples[:, 1:], analytic.GaussianMixture.gaussian(jnp.array([2.0]), 0.25))


def test_resampling_moves_toward_the_exact_conditional():
  # x0 = 0.5 lies between the modes; the exact conditional still puts 99.97% of x1 in the
  # right mode. Plain replacement leaves ~16% in the wrong one (it only learns x0 through
  # the noised observation); 20 resampling rounds per step at the same NFE leave ~4%.
  sde = SDES['vpsde']
  log_w = -(0.5 - np.array([-2.0, 2.0])) ** 2 / (2 * 0.25)
  exact = np.exp(log_w[1]) / np.exp(log_w).sum()
  assert exact > 0.999
  observed = jnp.zeros((N, 2)).at[:, 0].set(0.5)
  fractions = {}
  for n_steps, n_resample in [(1000, 1), (50, 20)]:
    samples, nfe = conditional.pc_inpaint(
        jax.random.key(4), MODES.score_fn(sde), sde, observed, jnp.array([1.0, 0.0]),
        n_steps=n_steps, n_resample=n_resample)
    assert nfe == 2000
    fractions[n_resample] = float(np.mean(np.asarray(samples[:, 1]) > 0))
  # Binomial standard errors: <= 0.009 for either fraction, so the margins are >= 4 of them.
  assert fractions[1] < exact - 0.1, fractions  # replacement alone is biased here
  assert 1 - fractions[20] < (1 - fractions[1]) / 2, fractions  # the wrong mass halves
  assert fractions[20] > 0.93, fractions


def _rgb_law(gray_var=0.5, colour_vars=(0.1, 0.02)):
  """2x2 RGB images: per pixel, gray and colour coordinates independent (covariance
  diagonal in `colorization_basis`), different means per pixel."""
  basis = conditional.colorization_basis(3)
  pixel_cov = basis @ np.diag([gray_var, *colour_vars]) @ basis.T
  cov = np.kron(np.eye(4), pixel_cov)
  mean = np.linspace(-1.0, 1.0, 12).reshape(2, 2, 3)
  return analytic.GaussianMixture.gaussian(jnp.asarray(mean), jnp.asarray(cov)), basis


@pytest.mark.parametrize('name', ['vesde', 'vpsde'])
def test_colorization_keeps_the_gray_and_samples_the_colour_law(name):
  sde = SDES[name]
  data, basis = _rgb_law()
  images = np.asarray(data.sample(jax.random.key(5), N))
  gray = images.mean(-1, keepdims=True)
  samples, nfe = conditional.pc_colorize(jax.random.key(6), data.score_fn(sde), sde, gray)
  assert samples.shape == images.shape and nfe == 2 * sde.N
  samples = np.asarray(samples)
  np.testing.assert_allclose(samples.mean(-1, keepdims=True), gray, atol=1e-6)
  colour = (samples @ basis)[..., 1:].reshape(N, 8)
  mean_colour = (np.asarray(data.mean()) @ basis)[..., 1:].reshape(1, 8)
  law = analytic.GaussianMixture.diagonal([1.0], jnp.asarray(mean_colour),
                                          jnp.tile(jnp.array([0.1, 0.02]), 4)[None])
  _assert_law(colour, law)
  _cross_covariance_is_zero(gray.reshape(N, 4), colour)


# 1x2 RGB images, every pixel dark red or every pixel bright blue (std 0.1): the gray level
# tells them apart by 12 stds.
RED, BLUE = np.array([0.8, -0.6, -0.6]), np.array([0.2, 0.4, 1.2])
RED_OR_BLUE = analytic.GaussianMixture.diagonal(
    [0.5, 0.5], jnp.asarray(np.stack([np.tile(RED, (1, 2, 1)), np.tile(BLUE, (1, 2, 1))])), 0.01)


def test_colorization_a_decisive_gray_picks_the_colour():
  # Dark red or bright blue pixels: the gray level tells them apart (12 stds); with
  # resampling every sample must come out red.
  data = RED_OR_BLUE
  sde = SDES['vesde']
  gray = jnp.full((N, 1, 2, 1), RED.mean())
  samples, _ = conditional.pc_colorize(jax.random.key(7), data.score_fn(sde), sde, gray,
                                       n_steps=100, n_resample=10)
  distance = np.linalg.norm(np.asarray(samples) - RED, axis=-1).max(axis=(1, 2))
  assert np.mean(distance < 0.5) == 1.0
  # The colour coordinates of each pixel: N(colour of red, 0.01 I) (k = 4 standard errors).
  np.testing.assert_allclose(np.asarray(samples).mean(0), np.tile(RED, (1, 2, 1)),
                             atol=4 * 0.1 / np.sqrt(N) + 0.01)


@pytest.mark.parametrize('channels', [1, 3, 4])
def test_colorization_basis_is_orthonormal_with_the_gray_first(channels):
  basis = conditional.colorization_basis(channels)
  np.testing.assert_allclose(basis.T @ basis, np.eye(channels), atol=1e-6)
  np.testing.assert_allclose(basis[:, 0], np.full(channels, 1 / np.sqrt(channels)), rtol=1e-6)


def test_same_key_same_samples_and_new_data_does_not_recompile():
  sde = SDES['vesde']
  score_fn = MODES.score_fn(sde)
  run = lambda key, value: conditional.pc_inpaint(
      key, score_fn, sde, jnp.full((8, 2), value), jnp.array([1.0, 0.0]), n_steps=20,
      n_resample=2)
  first, nfe = run(jax.random.key(0), 1.0)
  assert nfe == 2 * sampling.pc_nfe('reverse_diffusion', 'langevin', 1, 20)
  np.testing.assert_array_equal(first, run(jax.random.key(0), 1.0)[0])
  assert not np.array_equal(first, run(jax.random.key(1), 1.0)[0])
  size = conditional._pc_sample_observed._cache_size()
  run(jax.random.key(0), -1.0)
  assert conditional._pc_sample_observed._cache_size() == size


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(mask=jnp.array([0.5, 1.0])), ValueError, r'mask must hold 0 \(sample\) and 1'),
    (dict(mask=jnp.ones(3)), ValueError, 'does not broadcast'),
    (dict(basis=np.ones((2, 2))), ValueError, 'orthonormal'),
    (dict(basis=np.eye(3)), ValueError, r'basis must be \[2, 2\]'),
    (dict(n_resample=0), ValueError, 'n_resample'),
    (dict(predictor='heun'), ValueError, 'reverse_diffusion'),
    (dict(snr=-1.0), ValueError, 'snr'),
    (dict(rtol=1e-3), TypeError, 'rtol'),
])
def test_bad_input_is_named(kwargs, error, match):
  arguments = dict(mask=jnp.array([1.0, 0.0])) | kwargs
  with pytest.raises(error, match=match):
    conditional.pc_sample_observed(jax.random.key(0), lambda x, t: -x, SDES['vesde'],
                                   jnp.zeros((4, 2)), **arguments)


def test_colorize_wants_a_one_channel_gray():
  with pytest.raises(ValueError, match=r'gray must be \[B, H, W, 1\]'):
    conditional.pc_colorize(jax.random.key(0), lambda x, t: -x, SDES['vesde'],
                            jnp.zeros((2, 4, 4, 3)))


# -- reconstruction guidance ----------------------------------------------------------------


def test_guidance_does_nothing_when_the_coordinates_are_independent():
  # The denoised observed coordinates do not depend on the unobserved ones: the gradient on
  # the unobserved coordinates is zero, so guided and plain replacement draw the same samples.
  sde = SDES['vpsde']
  data = analytic.GaussianMixture.diagonal([1.0], jnp.array([[1.0, -1.0]]),
                                           jnp.array([[0.5, 2.0]]))
  observed = data.sample(jax.random.key(3), 64)
  options = dict(corrector='none', n_steps=100)
  plain, _ = conditional.pc_inpaint(jax.random.key(1), data.score_fn(sde), sde, observed,
                                    jnp.array([1.0, 0.0]), **options)
  guided, nfe = conditional.pc_inpaint(jax.random.key(1), data.score_fn(sde), sde, observed,
                                       jnp.array([1.0, 0.0]), guidance=5.0, **options)
  assert nfe == 100
  np.testing.assert_allclose(guided, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['vpsde', 'vesde'])
def test_guidance_moves_toward_the_exact_conditional(name):
  # The observation between the modes of `test_resampling_moves_toward_the_exact_conditional`:
  # without a corrector, replacement leaves ~30% of x1 in the wrong mode; guidance weight 5
  # leaves ~1% (the exact conditional: 0.03%), at the same NFE.
  sde = SDES[name]
  observed = jnp.zeros((N, 2)).at[:, 0].set(0.5)
  wrong = {}
  for weight in (0.0, 5.0):
    samples, nfe = conditional.pc_inpaint(
        jax.random.key(4), MODES.score_fn(sde), sde, observed, jnp.array([1.0, 0.0]),
        predictor='reverse_diffusion', corrector='none', guidance=weight)
    assert nfe == sde.N
    assert np.all(np.asarray(samples[:, 0]) == 0.5)  # the observation is kept exactly
    wrong[weight] = float(np.mean(np.asarray(samples[:, 1]) < 0))
  # Binomial standard errors <= 0.011: the margins are >= 5 of them.
  assert wrong[0.0] > 0.2 and wrong[5.0] < 0.03, wrong


@pytest.mark.parametrize('options, message', [
    (dict(guidance=-1.0), r'guidance must be in \[0, inf\)'),
    (dict(guidance=1.0), "guidance needs corrector='none'"),
    (dict(guidance=1.0, corrector='none', predictor='none'), "guidance needs corrector='none'"),
])
def test_bad_guidance_settings(options, message):
  sde = SDES['vpsde']
  with pytest.raises(ValueError, match=message):
    conditional.pc_inpaint(jax.random.key(0), lambda x, t: -x, sde, jnp.zeros((2, 2)),
                           jnp.array([1.0, 0.0]), **options)
  with pytest.raises(ValueError, match=message):
    conditional.make_conditional_sampler(lambda p: (lambda x, t: -x), sde, **options)


def test_guided_colorization_picks_the_colour_without_resampling():
  # The decisive gray of `test_colorization_a_decisive_gray_picks_the_colour`, through the
  # colour basis: guidance alone (no resampling rounds, no corrector) must find red.
  data = RED_OR_BLUE
  sde = SDES['vpsde']
  gray = jnp.full((N, 1, 2, 1), RED.mean())
  share_red = {}
  for weight in (0.0, 5.0):
    samples, _ = conditional.pc_colorize(jax.random.key(7), data.score_fn(sde), sde, gray,
                                         n_steps=200, corrector='none', guidance=weight)
    np.testing.assert_allclose(np.asarray(samples).mean(-1, keepdims=True), gray, atol=1e-6)
    distance = np.linalg.norm(np.asarray(samples) - RED, axis=-1).max(axis=(1, 2))
    share_red[weight] = float(np.mean(distance < 0.5))
  # Replacement alone leaves ~13% blue here (binomial standard error 0.008).
  assert share_red[0.0] < 0.95 and share_red[5.0] > 0.99, share_red
