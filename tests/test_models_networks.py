"""NCSN++ / DDPM++ / DDPM: golden outputs of the reference, knobs, sizes, config errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scorejax import convert
from scorejax import sde as sde_lib
from scorejax.models import make_model, make_score_fn, presets
from tests.conftest import DATA_DIR, nchw_to_nhwc

GOLDEN = ['ncsnpp_small', 'ddpmpp_small']


def _assert_close_per_sample(actual_nhwc, golden_nchw, rel=1e-4):
  actual = np.asarray(actual_nhwc).transpose(0, 3, 1, 2)
  for i, (a, g) in enumerate(zip(actual, golden_nchw, strict=True)):
    scale = np.abs(g).max()
    assert np.abs(a - g).max() <= rel * scale, (i, np.abs(a - g).max() / scale)


@pytest.fixture(scope='module', params=GOLDEN)
def golden(request):
  name = request.param
  config = json.loads((DATA_DIR / f'{name}_config.json').read_text())
  state_dict = dict(np.load(DATA_DIR / f'{name}_state_dict.npz'))
  io = dict(np.load(DATA_DIR / f'{name}_io.npz'))
  variables = convert.torch_state_dict_to_variables(state_dict, config)
  model = make_model(config)
  traces = []

  @jax.jit
  def forward(variables, x, labels):
    traces.append(1)
    return model.apply(variables, x, labels, train=False)

  return name, variables, io, forward, traces


def test_golden_outputs_compile_once(golden):
  _, variables, io, forward, traces = golden
  x = nchw_to_nhwc(io['x'])
  _assert_close_per_sample(forward(variables, x, io['labels']), io['out'])
  forward(variables, x + 1.0, io['labels'] * 0.5)
  assert len(traces) == 1  # one compilation per shape, none per call


def test_golden_scores_through_make_score_fn(golden):
  name, variables, io, forward, _ = golden
  model_fn = lambda x, labels: forward(variables, x, labels)
  x, t = jnp.asarray(nchw_to_nhwc(io['x'])), jnp.asarray(io['t'])
  if name == 'ncsnpp_small':
    sdes = {'vesde': sde_lib.VESDE(0.01, 50.0, 1000)}
  else:
    sdes = {'vpsde': sde_lib.VPSDE(0.1, 20.0, 1000),
            'subvpsde': sde_lib.SubVPSDE(0.1, 20.0, 1000)}
  for key, sde in sdes.items():
    score = make_score_fn(model_fn, sde, continuous=True)(x, t)
    expected = io[f'score_{key}']
    if f'std_{key}' in io:
      # The reference's float32 std = sqrt(1 - exp(.)) cancels at t = 1e-3 (2.7e-4
      # relative); scorejax's SDE uses expm1. Compare with the golden rescaled to it.
      std = np.asarray(sde.marginal_prob(x, t)[1])
      expected = expected * (io[f'std_{key}'] / std)[:, None, None, None]
    _assert_close_per_sample(score, expected)


def test_fourier16_variant(golden):
  name, variables, io, forward, _ = golden
  if name != 'ncsnpp_small':
    pytest.skip('Fourier embedding only')
  params = dict(variables['params'])
  params['GaussianFourierProjection_0'] = {'W': io['variant_fourier16.W']}
  out = forward({'params': params}, nchw_to_nhwc(io['x']), io['labels'])
  _assert_close_per_sample(out, io['variant_fourier16.out'])


FULL_SIZE = {
    'ncsnpp_cifar10': (32, 62_758_915),
    'ncsnpp_deep_cifar10': (32, 107_587_075),
    'ddpmpp_cifar10': (32, 61_804_419),
    'ddpmpp_deep_cifar10': (32, 106_632_579),
    'ncsnpp_celebahq256': (256, 65_574_549),
}


@pytest.mark.parametrize('name', sorted(FULL_SIZE))
def test_full_size_parameter_counts(name):
  image_size, count = FULL_SIZE[name]
  config = {'model': presets.PRESETS[name](), 'data': {'image_size': image_size,
                                                       'num_channels': 3}}
  params, _ = convert.abstract_params(config)  # jax.eval_shape: nothing is allocated
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == count


def random_variables(model, x, labels, seed=0):
  """Random weights of the reference goldens' kind, from shapes only (no compiled init)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, labels)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if jax.tree_util.keystr(path).endswith("['scale']") else 0.05 * noise

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _small_config(**model):
  base = dict(name='ncsnpp', nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
              dropout=0.0, conditional=True, fir=True, fir_kernel=(1, 3, 3, 1),
              skip_rescale=True, resblock_type='biggan', progressive='none',
              progressive_input='none', progressive_combine='sum', embedding_type='fourier',
              fourier_scale=16.0, init_scale=0.0, scale_by_sigma=True, nonlinearity='swish')
  base.update(model)
  return {'model': base, 'data': {'image_size': 8, 'num_channels': 3, 'centered': False}}


KNOBS = [
    dict(resblock_type='ddpm', fir=True),  # fused FIR up/down-sampling convolutions
    dict(resblock_type='ddpm', fir=False, resamp_with_conv=False),
    dict(progressive='residual', progressive_input='residual', fir=True),
    dict(progressive='residual', progressive_input='residual', fir=False),
    dict(progressive='output_skip', progressive_input='input_skip', progressive_combine='cat'),
    dict(embedding_type='positional', scale_by_sigma=True),
    dict(conditional=False, skip_rescale=False, nonlinearity='elu'),
]


@pytest.mark.parametrize('knobs', KNOBS, ids=lambda k: '-'.join(f'{v}' for v in k.values()))
def test_knob_combinations_run_and_depend_on_labels(knobs):
  model = make_model(_small_config(**knobs))
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
  labels = jnp.array([3.0, 7.0]) if knobs.get('embedding_type') == 'positional' else jnp.array(
      [0.5, 20.0])
  variables = random_variables(model, x, labels)  # non-zero everywhere: every path counts
  forward = jax.jit(model.apply)
  out = forward(variables, x, labels)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  swapped = forward(variables, x, labels[::-1])
  assert not np.allclose(out, swapped)


def test_positional_scale_by_sigma_divides_by_the_descending_sigma_table():
  config = _small_config(embedding_type='positional', scale_by_sigma=True)
  plain = make_model(_small_config(embedding_type='positional', scale_by_sigma=False))
  x, labels = jnp.ones((2, 8, 8, 3)), jnp.array([0.0, 999.0])
  variables = random_variables(plain, x, labels)
  ratio = jax.jit(plain.apply)(variables, x, labels) / jax.jit(make_model(config).apply)(
      variables, x, labels)
  np.testing.assert_allclose(ratio[0], 50.0, rtol=1e-5)  # labels index sigma_max first
  np.testing.assert_allclose(ratio[1], 0.01, rtol=1e-5)


def test_ddpm_size_and_scale_by_sigma():
  config = {'model': presets.ddpm_cifar10(), 'data': {'image_size': 32, 'num_channels': 3}}
  params, _ = convert.abstract_params(config)
  # score_sde's DDPM port: one attention block per up-sampling level.
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == 35_218_947
  small = {'name': 'ddpm', 'nf': 32, 'ch_mult': (1, 2), 'num_res_blocks': 1,
           'attn_resolutions': (4,), 'dropout': 0.0}
  data = {'image_size': 8, 'num_channels': 1, 'centered': True}
  plain = make_model({'model': small, 'data': data})
  scaled = make_model({'model': {**small, 'scale_by_sigma': True}, 'data': data})
  x, labels = jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), jnp.array([0, 500])
  variables = random_variables(plain, x, labels)
  sigmas = np.exp(np.linspace(np.log(50.0), np.log(0.01), 1000))[[0, 500]]
  np.testing.assert_allclose(
      jax.jit(scaled.apply)(variables, x, labels),
      jax.jit(plain.apply)(variables, x, labels) / sigmas[:, None, None, None], rtol=1e-5)


def test_dropout_only_in_train_mode():
  model = make_model(_small_config(dropout=0.5))
  x, labels = jnp.ones((2, 8, 8, 3)), jnp.array([0.5, 2.0])
  variables = random_variables(model, x, labels)
  run = jax.jit(lambda key: model.apply(variables, x, labels, train=True,
                                        rngs={'dropout': key}))
  a, b, c = run(jax.random.key(3)), run(jax.random.key(3)), run(jax.random.key(4))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  eval_out = jax.jit(model.apply)(variables, x, labels)  # train=False by default
  assert not np.allclose(eval_out, a)


@pytest.mark.parametrize('change,message', [
    ({'name': 'ncsnpp_v9'}, 'unknown model name'),
    ({'progressive': 'sideways'}, 'valid choices'),
    ({'resblock_type': 'vgg'}, 'valid choices'),
    ({'embedding_type': 'wavelet'}, 'valid choices'),
    ({'nonlinearity': 'gelu2'}, 'unknown nonlinearity'),
    ({'ch_mult': (1, 2, 2, 2, 2)}, 'not divisible'),
    ({'attn_resolutions': (3,)}, 'never occur'),
    ({'nf': 18}, 'GroupNorm'),
])
def test_make_model_rejects_impossible_settings(change, message):
  with pytest.raises(ValueError, match=message):
    make_model(_small_config(**change))
