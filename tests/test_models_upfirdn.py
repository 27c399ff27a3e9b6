"""FIR resampling against direct float64 evaluation of StyleGAN2's upfirdn2d definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scorejax.models import upfirdn


def upfirdn_numpy(x, k, up, down, pad0, pad1):
  """Definition, NHWC, float64: zero-insert, pad (negative crops), convolve, decimate."""
  x = np.asarray(x, np.float64)
  k = np.asarray(k, np.float64)
  if k.ndim == 1:
    k = np.outer(k, k)
  B, H, W, C = x.shape
  z = np.zeros((B, H * up, W * up, C))
  z[:, ::up, ::up, :] = x
  z = np.pad(z, ((0, 0), (max(pad0, 0), max(pad1, 0)), (max(pad0, 0), max(pad1, 0)), (0, 0)))
  z = z[:, max(-pad0, 0):z.shape[1] - max(-pad1, 0), max(-pad0, 0):z.shape[2] - max(-pad1, 0)]
  kh, kw = k.shape
  out_h, out_w = z.shape[1] - kh + 1, z.shape[2] - kw + 1
  out = np.zeros((B, out_h, out_w, C))
  flipped = k[::-1, ::-1]  # true convolution
  for i in range(out_h):
    for j in range(out_w):
      out[:, i, j, :] = np.einsum('bhwc,hw->bc', z[:, i:i + kh, j:j + kw, :], flipped)
  return out[:, ::down, ::down, :]


X = np.asarray(jax.random.normal(jax.random.key(0), (2, 6, 5, 3)), np.float32)
ASYMMETRIC_2D = np.arange(1, 13, dtype=np.float32).reshape(3, 4)[:, :3] / 10.0


@pytest.mark.parametrize('up,down,pad0,pad1', [
    (1, 1, 0, 0), (2, 1, 2, 1), (1, 2, 1, 1), (2, 2, 1, 2), (1, 1, -1, 2), (3, 1, 1, 1)])
@pytest.mark.parametrize('kernel', ['separable', '2d'])
def test_upfirdn2d_matches_definition(up, down, pad0, pad1, kernel):
  k = np.array([1.0, 2.0, 5.0, 3.0], np.float32) if kernel == 'separable' else ASYMMETRIC_2D
  got = upfirdn.upfirdn2d(jnp.asarray(X), k, up=up, down=down, pad=(pad0, pad1))
  want = upfirdn_numpy(X, k, up, down, pad0, pad1)
  np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max())


def test_upsample_and_downsample_preserve_constants_and_match_definition():
  ones = jnp.ones((1, 8, 8, 2))
  up = upfirdn.upsample_2d(ones, (1, 3, 3, 1))
  down = upfirdn.downsample_2d(ones, (1, 3, 3, 1))
  assert up.shape == (1, 16, 16, 2) and down.shape == (1, 4, 4, 2)
  np.testing.assert_allclose(up[:, 2:-2, 2:-2], 1.0, rtol=1e-6)  # interior gain is 1
  np.testing.assert_allclose(down[:, 1:-1, 1:-1], 1.0, rtol=1e-6)
  k = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0
  np.testing.assert_allclose(upfirdn.upsample_2d(jnp.asarray(X[:, :4, :4]), (1, 3, 3, 1)),
                             upfirdn_numpy(X[:, :4, :4], 4 * k, 2, 1, 2, 1), atol=2e-6)
  np.testing.assert_allclose(upfirdn.downsample_2d(jnp.asarray(X[:, :4, :4]), (1, 3, 3, 1)),
                             upfirdn_numpy(X[:, :4, :4], k, 1, 2, 1, 1), atol=2e-6)


def _conv_same(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def test_fused_resampling_convolutions_equal_unfused_in_the_interior():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  w = jax.random.normal(jax.random.key(2), (3, 3, 3, 5))
  fused_up = upfirdn.upsample_conv_2d(x, w)
  unfused_up = _conv_same(upfirdn.upsample_2d(x), w)
  assert fused_up.shape == (2, 16, 16, 5)
  np.testing.assert_allclose(fused_up[:, 2:-2, 2:-2], unfused_up[:, 2:-2, 2:-2], atol=1e-5)
  fused_down = upfirdn.conv_downsample_2d(x, w)
  unfused_down = upfirdn.downsample_2d(_conv_same(x, w))
  assert fused_down.shape == (2, 4, 4, 5)
  np.testing.assert_allclose(fused_down[:, 1:-1, 1:-1], unfused_down[:, 1:-1, 1:-1], atol=1e-5)


def test_naive_resampling():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  np.testing.assert_array_equal(upfirdn.naive_upsample_2d(x)[0, :2, :2, 0], 0.0)
  np.testing.assert_array_equal(upfirdn.naive_downsample_2d(x)[0, :, :, 0],
                                [[2.5, 4.5], [10.5, 12.5]])


def test_setup_kernel_rejects_bad_filters():
  with pytest.raises(ValueError):
    upfirdn.setup_kernel([1, -1])
  with pytest.raises(ValueError):
    upfirdn.setup_kernel(np.ones((2, 3)))
