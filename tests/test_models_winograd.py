"""Winograd F(2x2, 3x3) convolutions (scorejax.models.winograd) and their use by conv2d on
CPU: values, kernel gradients and every autodiff mode equal the direct convolution."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scorejax.models import conv as conv_lib
from scorejax.models import winograd

SAME = ((1, 1), (1, 1))


def _lax_conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), SAME,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _close(got, want, rtol=1e-5):
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.shape == e.shape
    np.testing.assert_allclose(g, e, rtol=rtol, atol=rtol * np.abs(e).max())


def _operands(batch, size, c_in, c_out, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (batch, size, size, c_in))
  w = jax.random.normal(keys[1], (3, 3, c_in, c_out)) / np.sqrt(9 * c_in)
  dy = jax.random.normal(keys[2], (batch, size, size, c_out))
  return x, w, dy


# (batch, size, C_in, C_out, chunk elements): the last two split the batch into chunks
# (lax.map / lax.scan), as large layers are.
SHAPES = pytest.mark.parametrize('batch,size,c_in,c_out,chunk', [
    (2, 8, 5, 4, 1 << 17),
    (3, 6, 7, 3, 1 << 17),
    (1, 2, 2, 2, 1 << 17),
    (4, 8, 6, 5, 16 * 6),  # one image per chunk
    (6, 4, 8, 8, 2 * 4 * 8),  # two images per chunk
])


@SHAPES
def test_conv3x3_equals_the_direct_convolution(batch, size, c_in, c_out, chunk, monkeypatch):
  monkeypatch.setattr(winograd, '_CHUNK_ELEMENTS', chunk)
  x, w, _ = _operands(batch, size, c_in, c_out)
  _close(jax.jit(winograd.conv3x3)(x, w), _lax_conv(x, w))


@SHAPES
def test_kernel_grad3x3_equals_the_convolution_vjp(batch, size, c_in, c_out, chunk, monkeypatch):
  monkeypatch.setattr(winograd, '_CHUNK_ELEMENTS', chunk)
  x, w, dy = _operands(batch, size, c_in, c_out)
  _, vjp = jax.vjp(lambda w: _lax_conv(x, w), w)
  _close(jax.jit(winograd.kernel_grad3x3)(x, dy), vjp(dy)[0])


def test_chunks_divide_the_batch():
  assert winograd._images_per_chunk(8, 256, 256) == 2  # 2 x 256 tiles x 256 channels = 2^17
  assert winograd._images_per_chunk(6, 256, 256) == 2
  assert winograd._images_per_chunk(7, 256, 256) == 1  # a prime batch: one image at a time
  assert winograd._images_per_chunk(8, 4, 8) == 8  # small layers: one chunk


@pytest.mark.parametrize('kernel,strides,padding,dilation,groups,size,ok', [
    ((3, 3), (1, 1), SAME, (1, 1), 1, 8, True),
    ((3, 3), (2, 2), SAME, (1, 1), 1, 8, False),
    ((3, 3), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, 8, False),
    ((1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, 8, False),
    ((5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1), 1, 8, False),
    ((3, 3), (1, 1), SAME, (2, 2), 1, 8, False),
    ((3, 3), (1, 1), SAME, (1, 1), 2, 8, False),
    ((3, 3), (1, 1), SAME, (1, 1), 1, 7, False),  # odd image size
])
def test_supported_only_3x3_stride1_same(kernel, strides, padding, dilation, groups, size, ok):
  assert winograd.supported((2, size, size, 4), (*kernel, 4, 4), strides, padding, dilation,
                            groups) == ok


def _uses_convolution(fn, *args) -> bool:
  return bool(re.search(r'\bconvolution\(', jax.jit(fn).lower(*args).compile().as_text()))


def test_conv2d_runs_winograd_on_cpu_above_the_threshold():
  x, w, _ = _operands(2, 8, 5, 4)
  # A new function per setting: the setting applies to what is traced after it is made.
  conv = lambda: (lambda x, w: conv_lib.conv2d(x, w, (1, 1), SAME))
  with conv_lib.cpu_winograd(0, 0):
    assert not _uses_convolution(conv(), x, w)
    f = conv()
    assert not _uses_convolution(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1)), x, w)
    _close(jax.jit(conv())(x, w), _lax_conv(x, w))
  with conv_lib.cpu_winograd(None, None):
    assert _uses_convolution(conv(), x, w)
    np.testing.assert_array_equal(jax.jit(conv())(x, w), _lax_conv(x, w))
  flops = 18 * 2 * 8 * 8 * 5 * 4
  with conv_lib.cpu_winograd(flops + 1, flops + 1):  # just below the threshold: direct
    assert _uses_convolution(conv(), x, w)
  with conv_lib.cpu_winograd(flops, flops):
    assert not _uses_convolution(conv(), x, w)


def _fusions_reading_all(hlo: str, n_params: int) -> int:
  """How many fusions of compiled `hlo` take each of its first `n_params` parameters."""
  entry = hlo[hlo.index('\nENTRY'):]
  params = [re.search(rf'(%[\w.\-]+) = [^\n]*parameter\({i}\)', entry).group(1)
            for i in range(n_params)]
  count = 0
  for line in hlo.splitlines():
    if ' fusion(' in line and ' = ' in line:
      operands = line.split(' fusion(', 1)[1].split('), kind=')[0]
      count += all(re.search(re.escape(p) + r'\b', operands) for p in params)
  return count


@pytest.mark.parametrize('operand', ['x', 'dy'])
def test_an_elementwise_producer_is_evaluated_once_not_per_tile_element(operand):
  # A backward pass hands the kernel gradient a cotangent that is a sum of many terms; its
  # 16 tile-transform outputs must read it from one materialised array, not each re-evaluate
  # the sum (which cost ~10% of the CIFAR-10 DDPM++ train step).
  x, _, dy = _operands(8, 16, 32, 32)
  terms = [jnp.full(x.shape, float(i)) for i in range(5)]

  def kernel_grad(a, b, c, d, e, other):
    total = a + b + c + d + e
    return winograd.kernel_grad3x3(total, other) if operand == 'x' else (
        winograd.kernel_grad3x3(other, total))

  other = dy if operand == 'x' else x
  hlo = jax.jit(kernel_grad).lower(*terms, other).compile().as_text()
  assert _fusions_reading_all(hlo, 5) == 1


def test_cpu_winograd_restores_the_thresholds():
  before = dict(conv_lib.WINOGRAD_MIN_FLOPS)
  with pytest.raises(RuntimeError), conv_lib.cpu_winograd(0, None):
    assert conv_lib.WINOGRAD_MIN_FLOPS == {'forward': 0, 'kernel_grad': None}
    raise RuntimeError
  assert conv_lib.WINOGRAD_MIN_FLOPS == before


def test_every_autodiff_mode_through_winograd_equals_the_lax_convolution():
  """Gradients, forward mode, second order (grad of a jvp: sliced score matching; jvp of a
  grad), vmap and a scan, with Winograd forced on for every layer, against the plain lax
  convolution: a chain of two 'SAME' 3x3 convolutions."""
  x, w, _ = _operands(2, 8, 5, 5)
  keys = jax.random.split(jax.random.key(3), 2)
  dx, dw = jax.random.normal(keys[0], x.shape), jax.random.normal(keys[1], w.shape)

  def derivatives(conv):
    net = lambda x, w: conv(jnp.tanh(conv(x, w)), w)

    def fn(x, w):
      loss = lambda x, w: jnp.sum(jnp.sin(net(x, w)))
      jvp_loss = lambda w: jnp.sum(jax.jvp(lambda x: net(x, w), (x,), (dx,))[1] ** 2)
      return {
          'value': net(x, w),
          'grad': jax.grad(loss, (0, 1))(x, w),
          'jvp': jax.jvp(net, (x, w), (dx, dw)),
          'grad_of_jvp': jax.grad(jvp_loss)(w),
          'jvp_of_grad': jax.jvp(lambda w: jax.grad(loss, 1)(x, w), (w,), (dw,)),
          'vmap_grad': jax.vmap(jax.grad(lambda x: loss(x[None], w)))(x),
          'scan_grad': jax.lax.scan(lambda c, _: (c, jax.grad(loss, 1)(x, w)), 0.0, None,
                                    length=2)[1][1],
      }

    return fn

  ours = lambda x, w: conv_lib.conv2d(x, w, (1, 1), SAME)
  with conv_lib.cpu_winograd(0, 0):
    got = jax.jit(derivatives(ours))(x, w)
  _close(got, jax.jit(derivatives(_lax_conv))(x, w), rtol=1e-4)


@pytest.mark.slow  # ~50 s: compiles a U-Net's value and gradient twice
def test_a_unet_layer_stack_is_unchanged_by_winograd():
  """A DDPM++ network's output and parameter gradient with Winograd on every eligible layer
  equal the direct convolutions' (the golden networks are below the default threshold)."""
  from scorejax.models import make_model
  config = {'model': {'name': 'ncsnpp', 'nf': 8, 'ch_mult': (1, 2), 'num_res_blocks': 1,
                      'attn_resolutions': (4,), 'resblock_type': 'biggan', 'dropout': 0.0,
                      'conditional': True, 'embedding_type': 'positional', 'fir': False,
                      'progressive': 'none', 'progressive_input': 'none',
                      'scale_by_sigma': False, 'nonlinearity': 'swish'},
            'data': {'image_size': 8, 'num_channels': 3, 'centered': True}}
  model = make_model(config)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  labels = jnp.array([10.0, 500.0])
  params = model.init(jax.random.key(1), x, labels)

  def value_and_grad():
    fn = lambda p: jnp.sum(jnp.sin(model.apply(p, x, labels, train=False)))
    return jax.jit(lambda p: (model.apply(p, x, labels, train=False), jax.grad(fn)(p)))(params)

  with conv_lib.cpu_winograd(0, 0):
    got = value_and_grad()
  with conv_lib.cpu_winograd(None, None):
    want = value_and_grad()
  _close(got[0], want[0], rtol=1e-4)
  # Gradients to 1e-4 of the largest: some are zero up to rounding (a bias before a norm).
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want[1]))
  for g, e in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * scale)
