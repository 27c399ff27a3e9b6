"""conv2d: XLA's forward convolution as a primitive with loop-friendly transposes, in every
autodiff mode (jvp, vjp, their compositions), under vmap and inside loops."""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scorejax.models.conv import Conv, conv2d, loop_friendly_grads, native_grads
from tests.conftest import DATA_DIR


def _native(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


CASES = pytest.mark.parametrize('size,kernel,stride,padding', [
    (8, 3, 1, ((1, 1), (1, 1))),  # 3x3 'SAME'
    (8, 1, 1, ((0, 0), (0, 0))),  # 1x1
    (8, 3, 2, ((0, 1), (0, 1))),  # DDPM's strided down-sampling conv
    (9, 3, 2, ((0, 0), (0, 0))),  # FIR conv_downsample (VALID, stride 2)
    (7, 3, 1, ((2, 0), (1, 1))),  # asymmetric padding
])


def _operands(size, kernel, stride, padding):
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (2, size, size, 5))
  w = jax.random.normal(keys[1], (kernel, kernel, 5, 4))
  dx, dw = jax.random.normal(keys[2], x.shape), jax.random.normal(keys[3], w.shape)
  return x, w, dx, dw, (stride, stride), padding


def _assert_trees_close(got, want, rtol=1e-5):
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.shape == e.shape
    np.testing.assert_allclose(g, e, rtol=rtol, atol=rtol * np.abs(e).max())


def _compare_with_xla(transforms, strides, padding, *args, rtol=1e-5):
  """`transforms(f)` (a pytree-valued function of `args`) for `f = conv2d` and for the plain
  lax convolution, jitted, must agree."""
  ours = lambda x, w: conv2d(x, w, strides, padding)
  lax_conv = lambda x, w: _native(x, w, strides, padding)
  _assert_trees_close(jax.jit(transforms(ours))(*args), jax.jit(transforms(lax_conv))(*args),
                      rtol)


@CASES
def test_value_and_gradients_equal_xla(size, kernel, stride, padding):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 5))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 5, 4))
  strides = (stride, stride)
  out = conv2d(x, w, strides, padding)
  np.testing.assert_array_equal(out, _native(x, w, strides, padding))
  cotangent = jax.random.normal(jax.random.key(2), out.shape)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w, strides, padding) * cotangent)
  got = jax.jit(jax.grad(loss(conv2d), (0, 1)))(x, w)
  want = jax.jit(jax.grad(loss(_native), (0, 1)))(x, w)
  for g, e in zip(got, want, strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * np.abs(e).max())
  # Both branches of the platform switch (only the CPU one runs on this machine).
  both = [jax.jit(f, static_argnums=(3, 4))(x, w, cotangent, strides, padding)
          for f in (loop_friendly_grads, native_grads)]
  for g, e in zip(*both, strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * np.abs(e).max())


@CASES
def test_forward_mode_and_second_order_equal_xla(size, kernel, stride, padding):
  x, w, dx, dw, strides, padding = _operands(size, kernel, stride, padding)

  def transforms(f):
    loss = lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    jvp_loss = lambda x, w: jnp.sum(jnp.tanh(jax.jvp(f, (x, w), (dx * x, dw))[1]) ** 2)
    grad_loss = lambda x, w: jnp.sum(jax.grad(loss, (0, 1))(x, w)[1] ** 2)
    return lambda x, w: {
        'jvp': jax.jvp(f, (x, w), (dx, dw)),
        'linearize': jax.linearize(lambda x: f(x, w), x)[1](dx),
        'forward_over_reverse': jax.jvp(jax.grad(loss, (0, 1)), (x, w), (dx, dw)),
        'reverse_over_forward': jax.grad(jvp_loss, (0, 1))(x, w),  # what SSM training does
        'reverse_over_reverse': jax.grad(grad_loss, (0, 1))(x, w),
    }

  _compare_with_xla(transforms, strides, padding, x, w, rtol=1e-4)


@CASES
def test_vmap_equals_xla(size, kernel, stride, padding):
  x, w, dx, dw, strides, padding = _operands(size, kernel, stride, padding)
  xs = jnp.stack([x, dx, x * dx])
  ws = jnp.stack([w, dw, w * dw])

  def transforms(f):
    loss = lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    return lambda xs, ws: {
        'images': jax.vmap(f, (0, None))(xs, w),
        'images_axis_1': jax.vmap(f, (1, None), 2)(xs.swapaxes(0, 1), w),
        'kernels': jax.vmap(f, (None, 0))(x, ws),
        'both': jax.vmap(f, (0, 3))(xs, jnp.moveaxis(ws, 0, 3)),
        # Transposes with both operands batched (per-example gradients) and one batched.
        'grad_per_example': jax.vmap(jax.grad(loss, (0, 1)))(xs, ws),
        'grad_shared_kernel': jax.vmap(jax.grad(loss, (0, 1)), (0, None))(xs, w),
        'jvp_batched_tangents': jax.vmap(lambda t: jax.jvp(f, (x, w), (t, dw))[1])(xs),
    }

  _compare_with_xla(transforms, strides, padding, xs, ws, rtol=1e-4)


@CASES
def test_differentiation_inside_scan_equals_outside(size, kernel, stride, padding):
  x, w, dx, dw, strides, padding = _operands(size, kernel, stride, padding)
  f = lambda x, w: conv2d(x, w, strides, padding)

  def derivatives(x, w):
    loss = lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    jvp_loss = lambda w: jnp.sum(jax.jvp(lambda x: jnp.tanh(f(x, w)), (x,), (dx,))[1] ** 2)
    return jax.grad(loss, (0, 1))(x, w), jax.jvp(f, (x, w), (dx, dw)), jax.grad(jvp_loss)(w)

  in_scan = jax.jit(lambda x, w: jax.lax.scan(
      lambda c, _: (c, derivatives(x, w)), 0.0, None, length=2)[1])(x, w)
  _assert_trees_close(jax.tree.map(lambda a: a[1], in_scan), jax.jit(derivatives)(x, w))


def _convolution_dim_labels(compiled_text):
  lines = [line for line in compiled_text.splitlines() if ' convolution(' in line]
  return [re.search(r'dim_labels=([^,\s]+)', line).group(1) for line in lines]


@CASES
def test_reverse_mode_inside_a_loop_emits_only_canonical_convolutions(size, kernel, stride,
                                                                       padding):
  # XLA:CPU runs only `b01f_01io->b01f` convolutions fast inside `while` bodies; what keeps
  # the scanned training steps (plain and sliced score matching) fast.
  x, w, dx, _, strides, padding = _operands(size, kernel, stride, padding)
  w = jnp.concatenate([w, w[..., :1]], axis=-1)  # 5 -> 5, to chain two convolutions
  same = ((kernel // 2, kernel // 2),) * 2

  def net(x, w):
    return conv2d(jnp.tanh(conv2d(x, w, (1, 1), same)), w, strides, padding)

  losses = {
      'grad': lambda w: jnp.sum(jnp.sin(net(x, w))),
      'grad_of_jvp': lambda w: jnp.sum(jax.jvp(lambda x: net(x, w), (x,), (dx,))[1] ** 2),
  }
  for name, loss in losses.items():
    step = lambda w, _, loss=loss: (w - 1e-3 * jax.grad(loss)(w), None)
    compiled = jax.jit(lambda w, step=step: jax.lax.scan(step, w, None, length=3)[0]).lower(
        w).compile().as_text()
    assert re.search(r'\bwhile\(', compiled), name
    labels = _convolution_dim_labels(compiled)
    if kernel == 1:  # pointwise: every convolution is a matrix product on CPU
      assert not labels and ' dot(' in compiled, (name, labels)
    else:
      assert labels and set(labels) == {'b01f_01io->b01f'}, (name, labels)


def test_other_platforms_keep_xla_native_gradient():
  # `lax.platform_dependent` picks the transposes when lowering: for CUDA the input gradient
  # of a strided convolution is XLA's (an lhs-dilated convolution), for CPU ours.
  x = jnp.ones((2, 8, 8, 3))
  w = jnp.ones((3, 3, 3, 4))
  loss = lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, (2, 2), ((0, 1), (0, 1)))))
  grad = jax.grad(loss)
  # The native branches also trace under higher-order transformations.
  derivatives = jax.jit(lambda x, w: (
      grad(x, w), jax.jvp(grad, (x, w), (x, w)), jax.vmap(grad, (0, None))(x[:, None], w),
      jax.grad(lambda w: jnp.sum(jax.jvp(lambda x: loss(x, w), (x,), (x,))[1]))(w)))
  texts = {platform: derivatives.trace(x, w).lower(lowering_platforms=(platform,)).as_text()
           for platform in ('cpu', 'cuda')}
  assert 'lhs_dilate = [2, 2]' in texts['cuda']
  assert 'lhs_dilate = [2, 2]' not in texts['cpu']


@pytest.mark.parametrize('rhs_dilation,groups', [((2, 1), 1), ((1, 1), 3), ((2, 3), 3)])
def test_loop_friendly_transposes_with_dilation_and_groups(rhs_dilation, groups):
  # Dilated kernels appear at second order (the kernel gradient of a strided conv is dilated
  # by the stride), feature groups under vmap over kernels.
  x = jax.random.normal(jax.random.key(0), (2, 11, 10, 6))
  w = jax.random.normal(jax.random.key(1), (3, 2, 6 // groups, 9))
  strides, padding = (2, 1), ((1, 0), (0, 2))
  y = jax.lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=rhs_dilation,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   feature_group_count=groups)
  dy = jax.random.normal(jax.random.key(2), y.shape)
  grads = [jax.jit(f, static_argnums=(3, 4, 5, 6))(x, w, dy, strides, padding, rhs_dilation,
                                                   groups)
           for f in (loop_friendly_grads, native_grads)]
  _assert_trees_close(*grads)


def test_sliced_score_matching_through_a_unet_equals_lax_conv(monkeypatch):
  """SSM (a JVP of the score inside the loss) and its parameter gradient through a small
  DDPM++ U-Net (strided and FIR resampling convs, skip connections) equal those of the same
  network on the plain lax convolution."""
  from scorejax import losses
  from scorejax.models import conv as conv_lib
  from scorejax.models import make_model

  config = json.loads((DATA_DIR / 'ddpmpp_small_config.json').read_text())
  config['data']['image_size'] = 8
  config['model'].update(nf=8, ch_mult=[1, 2], num_res_blocks=0, attn_resolutions=[],
                         resblock_type='ddpm', fir=True, conditional=False)
  model = make_model(config)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  labels = jnp.array([0.3, 0.7])
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(1), x, labels, train=False))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape, np.float32),
                        shapes['params'])

  def loss(params):
    score_fn = lambda y: model.apply({'params': params}, y, labels, train=False)
    return losses.sliced_score_matching(jax.random.key(2), score_fn, x, n_projections=2)[0]

  def value_and_grad():
    traced = jax.jit(jax.value_and_grad(loss)).trace(params)
    assert ('scorejax_conv2d' in str(traced.jaxpr)) == (conv_lib.conv2d is conv2d)
    # Values only are compared: XLA:CPU's unoptimised backend compiles twice as fast.
    compiled = traced.lower().compile(compiler_options={'xla_backend_optimization_level': 0})
    return compiled(params)

  ours = value_and_grad()
  lax_conv = lambda x, w, strides=(1, 1), padding=((0, 0), (0, 0)): _native(x, w, strides,
                                                                             padding)
  for module in list(sys.modules.values()):
    name = getattr(module, '__name__', '')
    if name.startswith('scorejax.') and getattr(module, 'conv2d', None) is conv2d:
      monkeypatch.setattr(module, 'conv2d', lax_conv)
  reference = value_and_grad()
  _assert_trees_close(ours, reference, rtol=1e-4)


def test_conv_module_matches_flax_conv_names_and_values():
  import flax.linen as nn

  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 2))
  ours = Conv(4, (3, 3), strides=(2, 2), padding='SAME')
  variables = ours.init(jax.random.key(1), x)
  assert set(variables['params']) == {'kernel', 'bias'}
  flax_conv = nn.Conv(4, (3, 3), strides=(2, 2), padding='SAME')
  np.testing.assert_allclose(ours.apply(variables, x), flax_conv.apply(variables, x), rtol=1e-6)


@pytest.mark.parametrize('channels,groups', [(32, 8), (64, 32), (12, 3)])
def test_group_norm_equals_flax_group_norm(channels, groups):
  """The per-channel-sum GroupNorm (faster on XLA:CPU) equals `nn.GroupNorm` in value,
  parameter names and gradient."""
  import flax.linen as nn

  from scorejax.models.layers import GroupNorm

  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 5, 4, channels))
  ours, theirs = GroupNorm(num_groups=groups), nn.GroupNorm(num_groups=groups, epsilon=1e-6)
  variables = theirs.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape),
                           variables)
  assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(variables)
  np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda v, x, m=m: jnp.sum(jnp.sin(m.apply(v, x))), (0, 1))(variables, x)
           for m in (ours, theirs)]
  for g, e in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * np.abs(e).max())
