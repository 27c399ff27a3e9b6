"""Tests of TrainState, the optimizer chain, EMA and the jitted, sharded train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scorejax import distributed
from scorejax.train import make_eval_step, make_train_step
from scorejax.train_state import (
    create_train_state,
    ema_update,
    make_lr_schedule,
    make_optimizer,
)


def _quadratic_loss(key, params, batch):
  """A loss with a key-dependent term, so per-step keys matter: mean ||x w - y + 0.1 z||^2."""
  x = batch['x']
  noise = 0.1 * jax.random.normal(key, (x.shape[0],))
  residual = x @ params['w'] + params['b'] - batch['y'] + noise
  return jnp.mean(residual**2), {'residual_max': jnp.max(jnp.abs(residual))}


def _data(step, batch_size=8, dim=3):
  rng = np.random.default_rng([7, step])
  x = rng.normal(size=(batch_size, dim)).astype(np.float32)
  y = (x @ np.arange(1, dim + 1, dtype=np.float32) + 0.5).astype(np.float32)
  return {'x': x, 'y': y}


def _params(dim=3):
  return {'w': jnp.zeros((dim,), jnp.float32), 'b': jnp.zeros((), jnp.float32)}


def test_lr_schedule_is_linear_warmup_then_constant():
  schedule = make_lr_schedule(2e-4, 100)
  np.testing.assert_allclose([schedule(0), schedule(50), schedule(100), schedule(10_000)],
                             [0.0, 1e-4, 2e-4, 2e-4], rtol=1e-6)
  assert float(make_lr_schedule(1e-3, 0)(0)) == pytest.approx(1e-3)


def test_make_optimizer_rejects_unknown_name():
  with pytest.raises(ValueError, match=r"optim.optimizer 'sgd'.*\['adam', 'adamw'\]"):
    make_optimizer('sgd', lr=1e-3)


def test_make_optimizer_clips_by_global_norm():
  # With warm-up off, Adam's first step moves every coordinate by lr * sign(g) (up to eps),
  # whatever the clipping; so check the clipped gradient through the chain's first link.
  optimizer = make_optimizer('Adam', lr=1.0, grad_clip=1.0)
  grads = {'a': jnp.array([3.0, 4.0])}
  clipped, _ = optimizer.update(grads, optimizer.init(grads))
  np.testing.assert_allclose(clipped['a'], [-1.0, -1.0], rtol=1e-4)
  clip_only = optax.clip_by_global_norm(1.0)
  np.testing.assert_allclose(clip_only.update(grads, clip_only.init(grads))[0]['a'], [0.6, 0.8],
                             rtol=1e-6)


def test_ema_update_closed_form():
  ema = {'p': jnp.array([1.0, 2.0])}
  params = {'p': jnp.array([3.0, 6.0])}
  out = ema_update(ema, params, 0.9)
  np.testing.assert_allclose(out['p'], [1.2, 2.4], rtol=1e-6)
  # k updates towards a fixed target: ema_k = target + rate^k (ema_0 - target).
  for _ in range(9):
    out = ema_update(out, params, 0.9)
  target, start = np.array([3.0, 6.0]), np.array([1.0, 2.0])
  np.testing.assert_allclose(out['p'], target + 0.9**10 * (start - target), rtol=1e-5)


def test_train_step_matches_manual_adam_and_ema():
  optimizer = make_optimizer('Adam', lr=1e-2, warmup=0)
  state = create_train_state(_params(), optimizer)
  step_fn = jax.jit(make_train_step(_quadratic_loss, optimizer, ema_rate=0.5))
  key = jax.random.key(0)
  batch = _data(0)
  new_state, metrics = step_fn(state, jax.tree.map(lambda x: x[None], batch), key)

  step_key = jax.random.fold_in(key, 0)
  grads = jax.grad(lambda p: _quadratic_loss(step_key, p, batch)[0])(state.params)
  updates, _ = optimizer.update(grads, optimizer.init(state.params), state.params)
  expected = optax.apply_updates(state.params, updates)
  assert int(new_state.step) == 1
  for name in ('w', 'b'):
    np.testing.assert_allclose(new_state.params[name], expected[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new_state.ema_params[name], 0.5 * expected[name], rtol=1e-6,
                               atol=1e-7)
  assert metrics['loss'].shape == (1,) and bool(metrics['finite'][0])
  np.testing.assert_allclose(metrics['grad_norm'][0], optax.global_norm(grads), rtol=1e-6)
  assert 'residual_max' in metrics


def test_fused_steps_equal_single_steps():
  """n_jitted_steps=3 in one call == three calls (per-step keys are fold_in(key, step))."""
  optimizer = make_optimizer('Adam', lr=1e-2, warmup=2, grad_clip=1.0)
  step_fn = jax.jit(make_train_step(_quadratic_loss, optimizer, ema_rate=0.9))
  key = jax.random.key(3)
  batches = [_data(s) for s in range(3)]
  single = create_train_state(_params(), optimizer)
  for batch in batches:
    single, _ = step_fn(single, jax.tree.map(lambda x: x[None], batch), key)
  fused, metrics = step_fn(create_train_state(_params(), optimizer),
                           jax.tree.map(lambda *x: np.stack(x), *batches), key)
  assert metrics['loss'].shape == (3,)
  assert int(fused.step) == int(single.step) == 3
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(single), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_non_finite_loss_leaves_state_unchanged():
  def nan_loss(key, params, batch):
    loss, aux = _quadratic_loss(key, params, batch)
    return loss * jnp.nan, aux

  optimizer = make_optimizer('Adam', lr=1e-2)
  state = create_train_state(_params(), optimizer)
  step_fn = jax.jit(make_train_step(nan_loss, optimizer, ema_rate=0.9))
  new_state, metrics = step_fn(state, jax.tree.map(lambda x: x[None], _data(0)),
                               jax.random.key(0))
  assert not bool(metrics['finite'][0])
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(a, b)


def _sharded_call(step_fn, state, batches, key):
  """`step_fn` jitted as the train driver does (state replicated and donated, the batch split
  over the ('data',) mesh of every device), called once."""
  mesh = distributed.make_mesh()
  replicated = distributed.replicated_sharding(mesh)
  stacked = distributed.batch_sharding(mesh, leading_axes=1)
  sharded_fn = jax.jit(step_fn, in_shardings=(replicated, stacked, replicated),
                       out_shardings=(replicated, replicated), donate_argnums=0)
  global_batch = distributed.global_batch(batches, stacked, batch_axis=1)
  assert len(jax.tree.leaves(global_batch)[0].sharding.device_set) == jax.device_count()
  return sharded_fn(jax.device_put(state, replicated), global_batch, key)


def test_sharded_step_equals_single_device():
  """The ('data',) mesh over 2 CPU devices gives the single-device result (<= 1e-6)."""
  if jax.device_count() < 2:
    pytest.skip('needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=2)')
  optimizer = make_optimizer('Adam', lr=1e-2, warmup=0)
  step_fn = make_train_step(_quadratic_loss, optimizer, ema_rate=0.9)
  key = jax.random.key(1)
  batches = jax.tree.map(lambda *x: np.stack(x), *[_data(s) for s in range(2)])

  single_state, _ = jax.jit(step_fn)(create_train_state(_params(), optimizer), batches, key)
  sharded_state, _ = _sharded_call(step_fn, create_train_state(_params(), optimizer), batches,
                                   key)
  for a, b in zip(jax.tree.leaves(sharded_state), jax.tree.leaves(single_state), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_eval_step_is_the_loss():
  eval_step = make_eval_step(_quadratic_loss)
  key = jax.random.key(2)
  batch = _data(5)
  assert float(eval_step(_params(), batch, key)) == pytest.approx(
      float(_quadratic_loss(key, _params(), batch)[0]))


def test_default_cpu_device_count_divides_batch():
  assert distributed.default_cpu_device_count(128, cores=2) == 2
  assert distributed.default_cpu_device_count(6, cores=4) == 3
  assert distributed.default_cpu_device_count(7, cores=4) == 1
  assert distributed.default_cpu_device_count(2, cores=16) == 2


def _per_row_loss(key, params, batch):
  """A loss that draws no randomness, with the spread metrics of `losses`' losses: the
  accumulated update must equal the whole-batch one."""
  del key
  x = batch['x']
  residual = x @ params['w'] + params['b'] - batch['y'] + 0.1 * jnp.sum(batch['extra'],
                                                                          axis=(1, 2))
  rows = residual**2
  loss = jnp.mean(rows)
  return loss, {'loss': loss, 'loss_std': jnp.std(rows), 'loss_max': jnp.max(rows),
                'loss_min': jnp.min(rows), 'mean_x': jnp.mean(x)}


def _data_with_extra(step, batch_size=8):
  data = _data(step, batch_size)
  data['extra'] = np.random.default_rng([9, step]).normal(size=(batch_size, 2, 3)).astype(
      np.float32)
  return data


@pytest.mark.parametrize('accum_steps', [2, 4, 8])
def test_accumulated_step_equals_whole_batch_step(accum_steps):
  """Gradient accumulation changes memory, not the update: the state and every metric
  (mean, pooled std, max, min) equal the one-pass step's, over two fused updates."""
  optimizer = make_optimizer('Adam', lr=1e-2, warmup=1, grad_clip=1.0)
  batches = jax.tree.map(lambda *x: np.stack(x), *[_data_with_extra(s) for s in range(2)])
  key = jax.random.key(4)
  outputs = []
  for k in (1, accum_steps):
    step_fn = jax.jit(make_train_step(_per_row_loss, optimizer, ema_rate=0.9, accum_steps=k))
    outputs.append(step_fn(create_train_state(_params(), optimizer), batches, key))
  (whole, whole_metrics), (accumulated, metrics) = outputs
  for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(whole), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
  assert set(metrics) == set(whole_metrics)
  for name in whole_metrics:
    np.testing.assert_allclose(metrics[name], whole_metrics[name], rtol=2e-6, atol=1e-7,
                               err_msg=name)


def test_accumulated_step_keys_and_rows():
  """Micro-batch m holds rows m, m + k, ... and draws with fold_in(step key, m); the update
  applies the mean of their gradients."""
  optimizer = make_optimizer('Adam', lr=1e-2, warmup=0)
  state = create_train_state(_params(), optimizer)
  key = jax.random.key(5)
  batch = _data(3)
  step_fn = jax.jit(make_train_step(_quadratic_loss, optimizer, ema_rate=0.5, accum_steps=2))
  new_state, metrics = step_fn(state, jax.tree.map(lambda x: x[None], batch), key)

  step_key = jax.random.fold_in(key, 0)
  grad = jax.grad(lambda p, k, b: _quadratic_loss(k, p, b)[0])
  parts = [jax.tree.map(lambda x, m=m: x[m::2], batch) for m in range(2)]
  grads = [grad(state.params, jax.random.fold_in(step_key, m), part)
           for m, part in enumerate(parts)]
  mean_grads = jax.tree.map(lambda a, b: 0.5 * (a + b), *grads)
  updates, _ = optimizer.update(mean_grads, optimizer.init(state.params), state.params)
  expected = optax.apply_updates(state.params, updates)
  for name in ('w', 'b'):
    np.testing.assert_allclose(new_state.params[name], expected[name], rtol=1e-6, atol=1e-7)
  losses = [_quadratic_loss(jax.random.fold_in(step_key, m), state.params, part)[0]
            for m, part in enumerate(parts)]
  np.testing.assert_allclose(metrics['loss'][0], np.mean(losses), rtol=1e-6)
  np.testing.assert_allclose(metrics['grad_norm'][0], optax.global_norm(mean_grads), rtol=1e-6)


def test_accumulated_sharded_step_equals_single_device():
  """Micro-batches over the 2-device mesh give the single-device result."""
  if jax.device_count() < 2:
    pytest.skip('needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=2)')
  optimizer = make_optimizer('Adam', lr=1e-2, warmup=0)
  step_fn = make_train_step(_quadratic_loss, optimizer, ema_rate=0.9, accum_steps=2)
  key = jax.random.key(6)
  batches = jax.tree.map(lambda *x: np.stack(x), *[_data(s) for s in range(2)])
  single_state, single_metrics = jax.jit(step_fn)(
      create_train_state(_params(), optimizer), batches, key)
  sharded_state, metrics = _sharded_call(
      step_fn, create_train_state(_params(), optimizer), batches, key)
  for a, b in zip(jax.tree.leaves(sharded_state), jax.tree.leaves(single_state), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(metrics['loss'], single_metrics['loss'], rtol=1e-6)


def test_accumulated_eval_step():
  """The eval loss over micro-batches: the whole batch's for a loss without randomness, the
  mean of the micro-batch losses (keys fold_in(key, m)) otherwise."""
  batch = _data_with_extra(2)
  key = jax.random.key(7)
  np.testing.assert_allclose(make_eval_step(_per_row_loss, 4)(_params(), batch, key),
                             _per_row_loss(key, _params(), batch)[0], rtol=1e-6)
  expected = np.mean([_quadratic_loss(jax.random.fold_in(key, m), _params(),
                                      jax.tree.map(lambda x, m=m: x[m::2], batch))[0]
                      for m in range(2)])
  np.testing.assert_allclose(make_eval_step(_quadratic_loss, 2)(_params(), batch, key),
                             expected, rtol=1e-6)


def test_accumulation_errors():
  optimizer = make_optimizer('Adam', lr=1e-2)
  with pytest.raises(ValueError, match=r'accum_steps must be an integer >= 1, got 0'):
    make_train_step(_quadratic_loss, optimizer, ema_rate=0.9, accum_steps=0)
  step_fn = make_train_step(_quadratic_loss, optimizer, ema_rate=0.9, accum_steps=3)
  with pytest.raises(ValueError, match='batch of 8 rows does not split into 3 micro-batches'):
    step_fn(create_train_state(_params(), optimizer), jax.tree.map(lambda x: x[None], _data(0)),
            jax.random.key(0))
