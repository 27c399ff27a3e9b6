"""conv2d: XLA's forward convolution with a custom, loop-friendly gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scorejax.models.conv import Conv, conv2d, loop_friendly_grads, native_grads


def _native(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('size,kernel,stride,padding', [
    (8, 3, 1, ((1, 1), (1, 1))),  # 3x3 'SAME'
    (8, 1, 1, ((0, 0), (0, 0))),  # 1x1
    (8, 3, 2, ((0, 1), (0, 1))),  # DDPM's strided down-sampling conv
    (9, 3, 2, ((0, 0), (0, 0))),  # FIR conv_downsample (VALID, stride 2)
    (7, 3, 1, ((2, 0), (1, 1))),  # asymmetric padding
])
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


def test_gradient_inside_scan_equals_outside():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 3))
  grad = jax.grad(lambda w: jnp.sum(conv2d(x, w, (1, 1), ((1, 1), (1, 1))) ** 2))
  in_scan = jax.lax.scan(lambda c, _: (c, grad(w)), 0.0, None, length=2)[1]
  np.testing.assert_allclose(in_scan[1], jax.jit(grad)(w), rtol=1e-5)


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
