"""Classifier guidance: exact identities on Gaussian mixtures, class laws drawn by every
sampler, the classifier loss's minimiser, and a trained classifier approaching Bayes.

The components of a Gaussian mixture are classes with a closed-form noise-conditional
posterior `log p_t(k | x)` (`GaussianMixture.component_log_posterior`), so guided scores
and samples are checked against component `k`'s exact score and law.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_sampling import MIXTURE, N_SAMPLES, SDES, _assert_law

from scorejax import analytic, classifier_guidance, edm_sampler, fast_solvers, sampling
from scorejax import sde as sde_lib
from scorejax.models.classifier import NoiseConditionalClassifier

ALL_SDES = {**SDES, 'cosinevpsde': sde_lib.CosineVPSDE(N=1000)}
# Overlapping full-covariance components: the posterior is far from one-hot at every t.
FULL = analytic.GaussianMixture.full(
    [0.5, 0.3, 0.2], jnp.array([[-1.0, 0.0, 0.5], [1.0, 0.5, 0.0], [0.0, -1.0, 1.0]]),
    jnp.array([np.eye(3) * 0.6 + 0.3 * np.ones((3, 3)), np.eye(3) * 0.4, np.diag([1.0, 0.2, 0.5])]))
DIAGONAL = analytic.GaussianMixture.diagonal(
    [0.2, 0.8], jnp.array([[0.5, -0.5, 0.0, 1.0], [-0.5, 0.5, 1.0, 0.0]]), 0.5)


def _exact_logits_fn(data, sde):
  return lambda x, t: data.component_log_posterior(x, t, sde)


def test_noise_level_closed_forms():
  t = jnp.linspace(1e-3, 1.0, 7)
  ve = sde_lib.VESDE(0.01, 50.0)
  np.testing.assert_allclose(classifier_guidance.noise_level(ve, t),
                             np.log(0.01 * 5000.0 ** np.asarray(t)), rtol=1e-5)
  for sde in (sde_lib.VPSDE(), sde_lib.CosineVPSDE(), sde_lib.SubVPSDE()):
    mean, std = sde.marginal_prob(jnp.ones((7, 1)), t)
    log_snr = np.log(np.asarray(mean[:, 0]) ** 2 / np.asarray(std) ** 2)
    np.testing.assert_allclose(classifier_guidance.noise_level(sde, t), -0.5 * log_snr,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', sorted(ALL_SDES))
@pytest.mark.parametrize('data', [FULL, DIAGONAL], ids=['full', 'diagonal'])
def test_guided_exact_score_is_the_class_score(name, data):
  """grad log p_t(x) + grad log p_t(k | x) = grad log p_t(x | k), component k's score."""
  sde = ALL_SDES[name]
  key_x, key_t, key_k = jax.random.split(jax.random.key(0), 3)
  x = 1.5 * jax.random.normal(key_x, (64, data.dim))
  t = jax.random.uniform(key_t, (64,), minval=1e-3, maxval=1.0)
  labels = jax.random.randint(key_k, (64,), 0, data.num_components)
  guided = classifier_guidance.guided_score_fn(
      data.score_fn(sde), _exact_logits_fn(data, sde), labels)
  actual = jax.jit(guided)(x, t)
  per_class = jnp.stack([data.component(k).score(x, t, sde)
                         for k in range(data.num_components)])
  expected = per_class[labels, jnp.arange(64)]
  np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=2e-4)
  # scale 0 is the unconditional score, exactly.
  unguided = classifier_guidance.guided_score_fn(
      data.score_fn(sde), _exact_logits_fn(data, sde), labels, scale=0.0)
  np.testing.assert_array_equal(unguided(x, t), data.score_fn(sde)(x, t))


SAMPLER_CASES = [
    ('pc', 'vpsde'), ('pc', 'vesde'), ('pc', 'subvpsde'), ('ode', 'vpsde'), ('fast', 'vpsde'),
    ('fast', 'cosinevpsde'), ('edm', 'vesde'),
]


@pytest.mark.parametrize('method,name', SAMPLER_CASES)
@pytest.mark.parametrize('label', [1, 2])
def test_guided_samplers_draw_the_class_law(method, name, label):
  """With the exact score and posterior, each sampler draws component `label` alone."""
  sde = ALL_SDES[name]
  labels = jnp.full((N_SAMPLES,), label, jnp.int32)
  score_fn = classifier_guidance.guided_score_fn(
      MIXTURE.score_fn(sde), _exact_logits_fn(MIXTURE, sde), labels)
  key, shape = jax.random.key(3), (N_SAMPLES, 2)
  if method == 'pc':
    samples, _ = sampling.pc_sample(key, score_fn, sde, shape, corrector='langevin', n_steps=500)
  elif method == 'ode':
    samples, _ = sampling.ode_sample(key, score_fn, sde, shape, rtol=1e-4, atol=1e-4)
  elif method == 'fast':
    samples, _ = fast_solvers.fast_sample(key, score_fn, sde, shape, method='dpmpp_2m',
                                          n_steps=30)
  else:  # EDM with full churn keeps the class law too, given steps: the component variance
    # (0.25) comes out 0.28 at 30 steps (Heun's error over the raised levels), 0.25-0.26 at 60.
    samples, _ = edm_sampler.edm_sample(key, score_fn, sde, shape, n_steps=60, s_churn=40.0)
  _assert_law(samples, MIXTURE.component(label))


def test_exact_posterior_minimises_the_classifier_loss():
  """The Bayes posterior has the lowest expected cross-entropy: tempered or shifted
  logits lose, measured on the same 20000 draws (paired, so the Monte-Carlo error of the
  differences is ~10x below the gaps)."""
  sde = SDES['vpsde']
  x0, labels = FULL.sample_labeled(jax.random.key(4), 20000)
  key_t, key_z = jax.random.split(jax.random.key(5))
  t = jax.random.uniform(key_t, (20000,), minval=1e-5, maxval=1.0)
  z = jax.random.normal(key_z, x0.shape)
  exact = _exact_logits_fn(FULL, sde)
  loss = lambda fn: classifier_guidance.classifier_losses(fn, sde, x0, labels, t, z)[0]
  best = loss(exact)
  for other in (lambda x, t: 0.6 * exact(x, t), lambda x, t: 1.6 * exact(x, t),
                lambda x, t: exact(x, t) + jnp.array([0.3, 0.0, -0.3])):
    gap = loss(other) - best
    assert float(jnp.mean(gap)) > 4 * float(jnp.std(gap)) / np.sqrt(len(gap))
  # The keyed wrapper: the same numbers from the same key's times and noise.
  value, metrics = classifier_guidance.classifier_loss(jax.random.key(6), exact, sde, x0, labels)
  assert 0.0 < float(value) < np.log(3.0)
  assert 0.5 < float(metrics['accuracy']) <= 1.0


def _posterior_kl(data, sde, logits_fn, key, n=4096):
  """E KL(p_t(. | x_t) || q_t(. | x_t)) over t ~ U[1e-3, 1] and x_t ~ p_t."""
  key_x, key_t, key_z = jax.random.split(key, 3)
  x0 = data.sample(key_x, n)
  t = jax.random.uniform(key_t, (n,), minval=1e-3, maxval=1.0)
  mean, std = sde.marginal_prob(x0, t)
  x = mean + std[:, None] * jax.random.normal(key_z, x0.shape)
  p = data.component_log_posterior(x, t, sde)
  q = jax.nn.log_softmax(logits_fn(x, t), axis=-1)
  return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1)))


def test_trained_classifier_approaches_bayes_and_guides():
  """A NoiseConditionalClassifier trained on noisy labelled mixture data: its posterior's KL
  to the exact one falls >= 10x, and guiding the exact score with it draws the class."""
  sde, data = SDES['vpsde'], FULL
  model = NoiseConditionalClassifier(num_classes=3, hidden=64, num_res_blocks=2)
  params = model.init(jax.random.key(0), jnp.zeros((1, 3)), jnp.zeros((1,)))['params']
  logits_fn = lambda params: classifier_guidance.make_logits_fn(
      lambda x, level: model.apply({'params': params}, x, level), sde)
  optimizer = optax.adam(3e-3)

  @jax.jit
  def train(params, key):
    def step(carry, key):
      params, opt_state = carry
      x0, labels = data.sample_labeled(jax.random.fold_in(key, 0), 512)
      grads = jax.grad(lambda p: classifier_guidance.classifier_loss(
          key, logits_fn(p), sde, x0, labels, eps=1e-3)[0])(params)
      updates, opt_state = optimizer.update(grads, opt_state)
      return (optax.apply_updates(params, updates), opt_state), None
    keys = jax.random.split(key, 1500)
    return jax.lax.scan(step, (params, optimizer.init(params)), keys)[0][0]

  before = _posterior_kl(data, sde, logits_fn(params), jax.random.key(9))
  params = train(params, jax.random.key(1))
  after = _posterior_kl(data, sde, logits_fn(params), jax.random.key(9))
  assert after < 0.02 and after < before / 10, (before, after)

  labels = jnp.full((2000,), 2, jnp.int32)
  score_fn = classifier_guidance.guided_score_fn(data.score_fn(sde), logits_fn(params), labels)
  samples, _ = sampling.ode_sample(jax.random.key(2), score_fn, sde, (2000, 3),
                                   rtol=1e-4, atol=1e-4)
  # The exact law of class 2 gives it posterior mass 0.83 on average; the learned classifier
  # must come close (the unguided model: 0.2, the class weight).
  posterior = jnp.exp(data.component_log_posterior(samples))[:, 2]
  exact = jnp.exp(data.component_log_posterior(data.component(2).sample(jax.random.key(3),
                                                                        2000)))[:, 2]
  assert abs(float(posterior.mean()) - float(exact.mean())) < 0.04, (posterior.mean(),
                                                                      exact.mean())


def test_image_classifier_is_per_example_and_time_dependent():
  model = NoiseConditionalClassifier(num_classes=10, channels=(8, 16), num_res_blocks=1)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  level = jnp.array([-3.0, 0.0, 1.0, 2.0])
  params = jax.jit(model.init)(jax.random.key(1), x, level)['params']
  apply = jax.jit(lambda x, level: model.apply({'params': params}, x, level))
  logits = apply(x, level)
  assert logits.shape == (4, 10)
  # Changing other rows leaves a row's logits alone (no batch statistics) ...
  other = apply(x.at[1:].set(0.0), level)
  np.testing.assert_allclose(other[0], logits[0], rtol=1e-5, atol=1e-6)
  # ... so the guidance gradient of the batch is every example's own gradient.
  sde = SDES['vpsde']
  logits_fn = classifier_guidance.make_logits_fn(apply, sde)
  labels = jnp.array([0, 3, 5, 9])
  t = jnp.array([0.1, 0.3, 0.6, 0.9])
  guided = classifier_guidance.guided_score_fn(lambda x, t: jnp.zeros_like(x), logits_fn, labels)

  def own(x, t, label):
    return jax.grad(lambda x: jax.nn.log_softmax(logits_fn(x[None], t[None]))[0, label])(x)

  np.testing.assert_allclose(jax.jit(guided)(x, t), jax.jit(jax.vmap(own))(x, t, labels),
                             rtol=1e-4, atol=1e-6)
  # The noise level changes the logits.
  shifted = apply(x, level + 1.0)
  assert float(jnp.max(jnp.abs(shifted - logits))) > 1e-4


def test_bad_inputs_raise_clear_errors():
  sde = SDES['vpsde']
  logits_fn = _exact_logits_fn(MIXTURE, sde)
  x, t = jnp.zeros((4, 2)), jnp.full((4,), 0.5)
  with pytest.raises(ValueError, match='guidance scale'):
    classifier_guidance.guided_score_fn(MIXTURE.score_fn(sde), logits_fn, jnp.zeros(4, int), -1.0)
  with pytest.raises(ValueError, match='integers'):
    classifier_guidance.guided_score_fn(MIXTURE.score_fn(sde), logits_fn, jnp.zeros(4))(x, t)
  with pytest.raises(ValueError, match=r'shape \(4,\)'):
    classifier_guidance.guided_score_fn(MIXTURE.score_fn(sde), logits_fn,
                                        jnp.zeros(3, jnp.int32))(x, t)
  with pytest.raises(ValueError, match='eps'):
    classifier_guidance.classifier_loss(jax.random.key(0), logits_fn, sde, x,
                                        jnp.zeros(4, jnp.int32), eps=0.0)


def test_labeled_samples_and_components():
  x, labels = MIXTURE.sample_labeled(jax.random.key(0), 3000)
  np.testing.assert_array_equal(x, MIXTURE.sample(jax.random.key(0), 3000))
  # Labels are the component each point came from: the nearest mean (components 12 stds apart).
  nearest = jnp.argmin(jnp.sum((x[:, None] - MIXTURE.means[None]) ** 2, -1), axis=1)
  np.testing.assert_array_equal(labels, nearest)
  np.testing.assert_allclose(jnp.bincount(labels, length=3) / 3000, MIXTURE.weights, atol=0.03)
  # log p(k | x) at t: a normalised posterior, and Bayes' rule on the component densities.
  sde, t = SDES['vesde'], jnp.full((3000,), 0.4)
  log_posterior = FULL.component_log_posterior(x[:, :1].repeat(3, 1), t, sde)
  np.testing.assert_allclose(jnp.exp(log_posterior).sum(-1), 1.0, rtol=1e-5)
  x3 = x[:, :1].repeat(3, 1)
  joint = jnp.stack([jnp.log(FULL.weights[k]) + FULL.component(k).log_prob(x3, t, sde)
                     for k in range(3)], -1)
  np.testing.assert_allclose(log_posterior, joint - FULL.log_prob(x3, t, sde)[:, None],
                             rtol=1e-4, atol=1e-4)


# -- classifier-free guidance ------------------------------------------------------------------


def _exact_class_score_fn(data, sde):
  """`s(x, t, y)`: component y's exact score, the mixture's for y = K ("no class")."""
  def class_score_fn(x, t, labels):
    scores = jnp.stack([data.component(k).score(x, t, sde) for k in range(data.num_components)]
                       + [data.score(x, t, sde)])
    return scores[labels, jnp.arange(x.shape[0])]
  return class_score_fn


@pytest.mark.parametrize('name', ['vpsde', 'vesde', 'cosinevpsde'])
@pytest.mark.parametrize('weight', [0.0, 0.5, 3.0])
def test_classifier_free_guidance_is_classifier_guidance_at_scale_one_plus_w(name, weight):
  """(1 + w) s(x, t, y) - w s(x, t) = s(x, t) + (1 + w) grad log p_t(y | x), exactly."""
  sde, data = ALL_SDES[name], FULL
  key_x, key_t, key_k = jax.random.split(jax.random.key(1), 3)
  x = 1.5 * jax.random.normal(key_x, (32, 3))
  t = jax.random.uniform(key_t, (32,), minval=1e-3, maxval=1.0)
  labels = jax.random.randint(key_k, (32,), 0, 3)
  free = classifier_guidance.classifier_free_score_fn(
      _exact_class_score_fn(data, sde), labels, null_label=3, weight=weight)
  guided = classifier_guidance.guided_score_fn(
      data.score_fn(sde), _exact_logits_fn(data, sde), labels, scale=1.0 + weight)
  np.testing.assert_allclose(jax.jit(free)(x, t), guided(x, t), rtol=3e-4, atol=3e-4)


def test_classifier_free_guidance_samples_the_class_at_weight_zero():
  sde = SDES['vpsde']
  labels = jnp.full((N_SAMPLES,), 2, jnp.int32)
  score_fn = classifier_guidance.classifier_free_score_fn(
      _exact_class_score_fn(MIXTURE, sde), labels, null_label=3)
  samples, _ = fast_solvers.fast_sample(jax.random.key(4), score_fn, sde, (N_SAMPLES, 2),
                                        n_steps=30)
  _assert_law(samples, MIXTURE.component(2))
  with pytest.raises(ValueError, match='weight must be finite and >= 0'):
    classifier_guidance.classifier_free_score_fn(score_fn, labels, 3, weight=-0.1)
