"""Tests for scorejax.inception / inception_weights: FID-network structure, converter round trip
against an independent torch re-implementation, resize, and 1-device = 2-device extraction."""

import jax
import numpy as np
import pytest

from scorejax import inception
from scorejax import inception_weights as weights

torch = pytest.importorskip('torch')
F = torch.nn.functional

# ---------------------------------------------------------------------------------------
# The FID network written down independently from torchvision's Inception-v3 description
# and pytorch-fid's patches: (name, in, out, kh, kw) per conv layer (each followed by BN).


def _block_a(name, cin, pool):
  return [
    (f'{name}.branch1x1', cin, 64, 1, 1), (f'{name}.branch5x5_1', cin, 48, 1, 1),
    (f'{name}.branch5x5_2', 48, 64, 5, 5), (f'{name}.branch3x3dbl_1', cin, 64, 1, 1),
    (f'{name}.branch3x3dbl_2', 64, 96, 3, 3), (f'{name}.branch3x3dbl_3', 96, 96, 3, 3),
    (f'{name}.branch_pool', cin, pool, 1, 1),
  ]  # fmt: skip


def _block_c(name, c7):
  return [
    (f'{name}.branch1x1', 768, 192, 1, 1), (f'{name}.branch7x7_1', 768, c7, 1, 1),
    (f'{name}.branch7x7_2', c7, c7, 1, 7), (f'{name}.branch7x7_3', c7, 192, 7, 1),
    (f'{name}.branch7x7dbl_1', 768, c7, 1, 1), (f'{name}.branch7x7dbl_2', c7, c7, 7, 1),
    (f'{name}.branch7x7dbl_3', c7, c7, 1, 7), (f'{name}.branch7x7dbl_4', c7, c7, 7, 1),
    (f'{name}.branch7x7dbl_5', c7, 192, 1, 7), (f'{name}.branch_pool', 768, 192, 1, 1),
  ]  # fmt: skip


def _block_e(name, cin):
  return [
    (f'{name}.branch1x1', cin, 320, 1, 1), (f'{name}.branch3x3_1', cin, 384, 1, 1),
    (f'{name}.branch3x3_2a', 384, 384, 1, 3), (f'{name}.branch3x3_2b', 384, 384, 3, 1),
    (f'{name}.branch3x3dbl_1', cin, 448, 1, 1), (f'{name}.branch3x3dbl_2', 448, 384, 3, 3),
    (f'{name}.branch3x3dbl_3a', 384, 384, 1, 3), (f'{name}.branch3x3dbl_3b', 384, 384, 3, 1),
    (f'{name}.branch_pool', cin, 192, 1, 1),
  ]  # fmt: skip


CONV_SPEC = (
  [
    ('Conv2d_1a_3x3', 3, 32, 3, 3), ('Conv2d_2a_3x3', 32, 32, 3, 3),
    ('Conv2d_2b_3x3', 32, 64, 3, 3), ('Conv2d_3b_1x1', 64, 80, 1, 1),
    ('Conv2d_4a_3x3', 80, 192, 3, 3),
  ]
  + _block_a('Mixed_5b', 192, 32) + _block_a('Mixed_5c', 256, 64) + _block_a('Mixed_5d', 288, 64)
  + [
    ('Mixed_6a.branch3x3', 288, 384, 3, 3), ('Mixed_6a.branch3x3dbl_1', 288, 64, 1, 1),
    ('Mixed_6a.branch3x3dbl_2', 64, 96, 3, 3), ('Mixed_6a.branch3x3dbl_3', 96, 96, 3, 3),
  ]
  + _block_c('Mixed_6b', 128) + _block_c('Mixed_6c', 160) + _block_c('Mixed_6d', 160)
  + _block_c('Mixed_6e', 192)
  + [
    ('Mixed_7a.branch3x3_1', 768, 192, 1, 1), ('Mixed_7a.branch3x3_2', 192, 320, 3, 3),
    ('Mixed_7a.branch7x7x3_1', 768, 192, 1, 1), ('Mixed_7a.branch7x7x3_2', 192, 192, 1, 7),
    ('Mixed_7a.branch7x7x3_3', 192, 192, 7, 1), ('Mixed_7a.branch7x7x3_4', 192, 192, 3, 3),
  ]
  + _block_e('Mixed_7b', 1280) + _block_e('Mixed_7c', 2048)
)  # fmt: skip

# torchvision's inception_v3(aux_logits=False) has 23,834,568 parameters with 1000 classes;
# the FID graph's 1008-way fc adds 2048 * 8 weights and 8 biases.
FID_INCEPTION_NUM_PARAMS = 23_834_568 + 2048 * 8 + 8


def test_spec_parameter_count_matches_published_count():
  conv_and_bn = sum(cin * cout * kh * kw + 2 * cout for _, cin, cout, kh, kw in CONV_SPEC)
  assert conv_and_bn + 2048 * 1008 + 1008 == FID_INCEPTION_NUM_PARAMS


def test_flax_network_has_fid_structure():
  variables = jax.eval_shape(inception.init_variables, jax.random.key(0))
  flat = weights.flatten_variables(variables)
  num_params = sum(int(np.prod(v.shape)) for k, v in flat.items() if k.startswith('params/'))
  assert num_params == FID_INCEPTION_NUM_PARAMS == 23_850_960
  for name, cin, cout, kh, kw in CONV_SPEC:
    path = name.replace('.', '/')
    assert flat[f'params/{path}/conv/kernel'].shape == (kh, kw, cin, cout), name
    assert flat[f'batch_stats/{path}/bn/var'].shape == (cout,), name
  assert flat['params/fc/kernel'].shape == (2048, 1008)
  assert len(flat) == 5 * len(CONV_SPEC) + 2  # nothing else (no aux classifier, no biases)

  def intermediates(v, x):
    _, state = inception.InceptionV3().apply(v, x, capture_intermediates=True)
    return state['intermediates']

  shapes = jax.eval_shape(intermediates, variables, jax.ShapeDtypeStruct((2, 299, 299, 3), 'f4'))
  expected = {
    'Conv2d_4a_3x3': (71, 71, 192), 'Mixed_5d': (35, 35, 288), 'Mixed_6a': (17, 17, 768),
    'Mixed_6e': (17, 17, 768), 'Mixed_7a': (8, 8, 1280), 'Mixed_7c': (8, 8, 2048),
  }  # fmt: skip
  for name, shape in expected.items():
    assert shapes[name]['__call__'][0].shape == (2, *shape), name
  assert shapes['__call__'][0]['pool3'].shape == (2, 2048)
  assert shapes['__call__'][0]['logits'].shape == (2, 1008)


# ---------------------------------------------------------------------------------------
# Independent torch forward (pytorch-fid semantics, NCHW) on a state_dict.


def _torch_forward(sd, x):
  def conv(name, x, stride=1, padding=0):
    x = F.conv2d(x, sd[f'{name}.conv.weight'], stride=stride, padding=padding)
    x = F.batch_norm(
      x, sd[f'{name}.bn.running_mean'], sd[f'{name}.bn.running_var'],
      sd[f'{name}.bn.weight'], sd[f'{name}.bn.bias'], training=False, eps=1e-3,
    )  # fmt: skip
    return F.relu(x)

  def avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  def block_a(n, x):
    b5 = conv(f'{n}.branch5x5_2', conv(f'{n}.branch5x5_1', x), padding=2)
    b3 = conv(f'{n}.branch3x3dbl_1', x)
    b3 = conv(f'{n}.branch3x3dbl_3', conv(f'{n}.branch3x3dbl_2', b3, padding=1), padding=1)
    return torch.cat([conv(f'{n}.branch1x1', x), b5, b3, conv(f'{n}.branch_pool', avg(x))], 1)

  def block_c(n, x):
    b7 = conv(f'{n}.branch7x7_1', x)
    b7 = conv(f'{n}.branch7x7_3', conv(f'{n}.branch7x7_2', b7, padding=(0, 3)), padding=(3, 0))
    bd = conv(f'{n}.branch7x7dbl_1', x)
    for i, pad in zip(range(2, 6), [(3, 0), (0, 3), (3, 0), (0, 3)], strict=True):
      bd = conv(f'{n}.branch7x7dbl_{i}', bd, padding=pad)
    return torch.cat([conv(f'{n}.branch1x1', x), b7, bd, conv(f'{n}.branch_pool', avg(x))], 1)

  def block_e(n, x, pool):
    b3 = conv(f'{n}.branch3x3_1', x)
    b3 = torch.cat(
      [
        conv(f'{n}.branch3x3_2a', b3, padding=(0, 1)),
        conv(f'{n}.branch3x3_2b', b3, padding=(1, 0)),
      ],
      1,
    )
    bd = conv(f'{n}.branch3x3dbl_2', conv(f'{n}.branch3x3dbl_1', x), padding=1)
    bd = torch.cat(
      [
        conv(f'{n}.branch3x3dbl_3a', bd, padding=(0, 1)),
        conv(f'{n}.branch3x3dbl_3b', bd, padding=(1, 0)),
      ],
      1,
    )
    return torch.cat([conv(f'{n}.branch1x1', x), b3, bd, conv(f'{n}.branch_pool', pool(x))], 1)

  x = conv('Conv2d_1a_3x3', x, stride=2)
  x = conv('Conv2d_2b_3x3', conv('Conv2d_2a_3x3', x), padding=1)
  x = F.max_pool2d(x, 3, stride=2)
  x = F.max_pool2d(conv('Conv2d_4a_3x3', conv('Conv2d_3b_1x1', x)), 3, stride=2)
  x = block_a('Mixed_5b', x)
  x = block_a('Mixed_5c', x)
  x = block_a('Mixed_5d', x)
  bd = conv('Mixed_6a.branch3x3dbl_2', conv('Mixed_6a.branch3x3dbl_1', x), padding=1)
  x = torch.cat(
    [
      conv('Mixed_6a.branch3x3', x, stride=2),
      conv('Mixed_6a.branch3x3dbl_3', bd, stride=2),
      F.max_pool2d(x, 3, stride=2),
    ],
    1,
  )
  for name, c7 in [('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)]:
    del c7
    x = block_c(name, x)
  b3 = conv('Mixed_7a.branch3x3_2', conv('Mixed_7a.branch3x3_1', x), stride=2)
  b7 = conv('Mixed_7a.branch7x7x3_1', x)
  b7 = conv('Mixed_7a.branch7x7x3_2', b7, padding=(0, 3))
  b7 = conv('Mixed_7a.branch7x7x3_3', b7, padding=(3, 0))
  b7 = conv('Mixed_7a.branch7x7x3_4', b7, stride=2)
  x = torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)
  x = block_e('Mixed_7b', x, avg)
  x = block_e('Mixed_7c', x, lambda y: F.max_pool2d(y, 3, stride=1, padding=1))
  pool3 = x.mean(dim=(2, 3))
  return pool3, F.linear(pool3, sd['fc.weight'], sd['fc.bias'])


def _random_state_dict(seed):
  rng = np.random.default_rng(seed)
  sd = {}
  for name, cin, cout, kh, kw in CONV_SPEC:
    fan_in = cin * kh * kw
    sd[f'{name}.conv.weight'] = rng.normal(0, np.sqrt(2 / fan_in), (cout, cin, kh, kw))
    sd[f'{name}.bn.weight'] = rng.uniform(0.5, 1.5, cout)
    sd[f'{name}.bn.bias'] = rng.normal(0, 0.2, cout)
    sd[f'{name}.bn.running_mean'] = rng.normal(0, 0.2, cout)
    sd[f'{name}.bn.running_var'] = rng.uniform(0.5, 1.5, cout)
  sd['fc.weight'] = rng.normal(0, 0.02, (1008, 2048))
  sd['fc.bias'] = rng.normal(0, 0.1, 1008)
  sd = {k: torch.tensor(v, dtype=torch.float32) for k, v in sd.items()}
  sd['Conv2d_1a_3x3.bn.num_batches_tracked'] = torch.tensor(0)  # ignored by the converter
  return sd


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """Random pytorch-fid-layout weights -> torch.save -> convert -> npz -> Flax variables."""
  tmp = tmp_path_factory.mktemp('inception')
  state_dict = _random_state_dict(0)
  torch.save(state_dict, tmp / 'pt_inception.pth')
  variables = weights.torch_state_dict_to_variables(
    weights.load_torch_state_dict(str(tmp / 'pt_inception.pth'))
  )
  weights.save_variables(str(tmp / 'inception.npz'), variables)
  return state_dict, weights.load_variables(str(tmp / 'inception.npz'))


def test_converter_round_trip_matches_torch_forward(converted):
  state_dict, variables = converted
  x = np.random.default_rng(1).uniform(-1, 1, (2, 75, 75, 3)).astype(np.float32)
  with torch.no_grad():
    ref_pool3, ref_logits = _torch_forward(state_dict, torch.tensor(x.transpose(0, 3, 1, 2)))
  out = jax.jit(inception.InceptionV3().apply)(variables, x)
  scale = float(ref_pool3.abs().max())
  np.testing.assert_allclose(out['pool3'], ref_pool3.numpy(), atol=1e-4 * scale, rtol=1e-4)
  np.testing.assert_allclose(
    out['logits'], ref_logits.numpy(), atol=1e-4 * float(ref_logits.abs().max()), rtol=1e-4
  )


def test_converter_rejects_incomplete_or_foreign_weights(converted, tmp_path):
  state_dict, _ = converted
  partial = {k: v.numpy() for k, v in state_dict.items() if not k.startswith('Mixed_7c')}
  with pytest.raises(ValueError, match=r'45 problems\): missing batch_stats/Mixed_7c'):
    weights.torch_state_dict_to_variables(partial)
  with pytest.raises(ValueError, match='Unexpected entry'):
    weights.torch_state_dict_to_variables({'conv1.weight': np.zeros((1, 1, 1, 1))})
  with pytest.raises(FileNotFoundError, match='eval.inception_path'):
    weights.load_variables(str(tmp_path / 'absent.npz'))


def test_feature_fn_two_devices_equals_one(converted):
  _, variables = converted
  assert jax.device_count() >= 2
  images = np.random.default_rng(2).integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
  one = inception.make_feature_fn(variables, jax.devices()[:1], image_size=75)(images)
  two = inception.make_feature_fn(variables, jax.devices()[:2], image_size=75)(images)
  assert one['pool3'].shape == (3, 2048) and two['logits'].shape == (3, 1008)
  for name in ('pool3', 'logits'):
    np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Pre-processing.


@pytest.mark.parametrize('in_size,out_size', [(8, 75), (32, 299), (300, 299), (5, 3)])
def test_half_pixel_resize_matches_torch_interpolate(in_size, out_size):
  x = np.random.default_rng(3).uniform(0, 255, (2, in_size, in_size + 1, 3)).astype(np.float32)
  ref = F.interpolate(
    torch.tensor(x.transpose(0, 3, 1, 2)), size=(out_size, out_size), mode='bilinear',
    align_corners=False,
  )  # fmt: skip
  ref = (ref.numpy().transpose(0, 2, 3, 1) - 128) / 128
  got = inception.preprocess(x, out_size, 'half_pixel')
  # PyTorch computes source coordinates in float32: ~1e-5 px round-off at 300 -> 299.
  np.testing.assert_allclose(got, ref, atol=1e-4)


def test_tf1_resize_is_legacy_asymmetric_bilinear():
  # TF1 resize_bilinear (align_corners=False, no half-pixel centers): src = i * in / out.
  matrix = inception.resize_matrix(2, 4, half_pixel=False)
  np.testing.assert_allclose(matrix, [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
  images = np.full((1, 4, 4, 1), 128.0, np.float32)
  got = inception.preprocess(images, 6)  # constant 128 stays 128 -> 0 after scaling
  assert got.shape == (1, 6, 6, 3)
  np.testing.assert_allclose(got, 0.0, atol=1e-7)
  np.testing.assert_allclose(inception.preprocess(np.full((1, 2, 2, 3), 255.0), 2), 127 / 128)
  with pytest.raises(ValueError, match='valid choices'):
    inception.preprocess(images, 6, 'bicubic')
