"""In-graph ODE solvers (`scorejax.ode`) against scipy and closed forms.

`'rk45'` reproduces `scipy.integrate.solve_ivp(method='RK45')` step for step: on a nonlinear
ODE it must report scipy's `nfev` exactly and land on scipy's solution (float32 state against
float64, well inside the tolerance).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from scorejax import ode


def _field(t, y):
  # Nonlinear, time-dependent, and mixing components: y_i' = -y_i^3 + sin(3 t) y_{i+1}.
  return -y**3 + jnp.sin(3.0 * t) * jnp.roll(y, -1, axis=-1)


Y0 = np.array([[1.5, -0.7, 0.3, 2.0], [0.1, 0.9, -1.2, 0.5]], np.float32)


@pytest.mark.parametrize('t0,t1', [(0.0, 2.0), (1.0, 1e-3)])
@pytest.mark.parametrize('tol', [1e-2, 1e-3])
def test_rk45_takes_scipys_steps(t0, t1, tol):
  # Backwards in time the field is negated, so that the solution stays bounded there too.
  sign = 1.0 if t1 > t0 else -1.0
  field = lambda t, y: sign * _field(t, y)
  reference = integrate.solve_ivp(
      lambda t, y: np.asarray(field(t, y.reshape(Y0.shape)), np.float64).reshape(-1),
      (t0, t1), Y0.astype(np.float64).reshape(-1), method='RK45', rtol=tol, atol=tol)
  y1, nfe = jax.jit(lambda y: ode.solve_ode(field, y, t0, t1, method='rk45', rtol=tol,
                                            atol=tol))(jnp.asarray(Y0))
  assert int(nfe) == reference.nfev
  # Same steps, so the only difference is float32 rounding of the state.
  np.testing.assert_allclose(np.asarray(y1).reshape(-1), reference.y[:, -1], atol=1e-5)


def test_rk45_pytree_state_and_accuracy():
  # dy/dt = -y, dl/dt = sum(y) with y(0) = y0: y(1) = y0 / e, l(1) = sum(y0) (1 - 1/e).
  field = lambda t, state: (-state[0], jnp.sum(state[0], axis=-1))
  y0 = jnp.asarray(Y0)
  (y1, l1), nfe = ode.solve_ode(field, (y0, jnp.zeros(2)), 0.0, 1.0, method='rk45', rtol=1e-6,
                                atol=1e-6)
  np.testing.assert_allclose(y1, Y0 / np.e, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l1, Y0.sum(-1) * (1 - 1 / np.e), rtol=1e-5, atol=1e-6)
  assert int(nfe) == 2 + 6 * ((int(nfe) - 2) // 6) and int(nfe) > 8


def test_rk45_nfe_counts_every_evaluation_and_nan_past_max_steps():
  calls = []

  def field(t, y):
    jax.debug.callback(lambda: calls.append(1))
    return _field(t, y)

  y1, nfe = ode.solve_ode(field, jnp.asarray(Y0), 0.0, 2.0, method='rk45', rtol=1e-4, atol=1e-4)
  jax.effects_barrier()
  assert int(nfe) == len(calls) > 20
  assert np.all(np.isfinite(y1))
  y1, nfe = ode.solve_ode(_field, jnp.asarray(Y0), 0.0, 2.0, method='rk45', rtol=1e-4,
                          atol=1e-4, max_steps=3)
  assert int(nfe) == 2 + 6 * 3
  assert np.all(np.isnan(y1))


@pytest.mark.parametrize('method', ['tsit5', 'dopri5'])
def test_diffrax_methods_return_nan_past_max_steps_like_rk45(method):
  y1, nfe = ode.solve_ode(_field, jnp.asarray(Y0), 0.0, 2.0, method=method, rtol=1e-4,
                          atol=1e-4)
  assert np.all(np.isfinite(y1))
  y1, nfe = jax.jit(lambda y: ode.solve_ode(_field, y, 0.0, 2.0, method=method, rtol=1e-4,
                                            atol=1e-4, max_steps=3))(jnp.asarray(Y0))
  assert int(nfe) == 1 + 6 * 3
  assert np.all(np.isnan(y1))


@pytest.mark.parametrize('kwargs, message', [
    (dict(method='rk45', rtol=0.0, atol=0.0), 'must not both be 0'),
    (dict(method='tsit5', rtol=-1e-3), r'^rtol must be in \[0, inf\)'),
    (dict(method='dopri5', atol=float('nan')), r'^atol must be in'),
    (dict(method='rk45', max_steps=0), r'^max_steps must be an integer >= 1'),
    (dict(method='heun', n_steps=0), r'^n_steps must be an integer >= 1'),
])
def test_bad_solver_arguments_raise_one_line_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ode.solve_ode(_field, jnp.asarray(Y0), 0.0, 1.0, **kwargs)
