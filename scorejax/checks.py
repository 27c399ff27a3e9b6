"""One-line `ValueError`s for bad arguments of the public math API.

The SDEs, samplers, ODE solvers and likelihood take plain numbers (tolerances, times, step
counts). A bad one would otherwise surface far from its cause: a NaN sample, an endless
adaptive solve, a reversed time grid. These checks name the argument, its valid range and
the value received.

A value that is traced (an argument of an enclosing `jax.jit`) has no Python value, so it
is not checked; every entry point checks its arguments before it traces anything.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ['concrete', 'concrete_array', 'check_in_range', 'check_count', 'check_time',
           'check_tolerances', 'keyword_arguments']


def concrete(value) -> float | None:
  """`value` as a Python float, or `None` if it has no concrete scalar value (traced)."""
  try:
    return float(value)
  except TypeError:  # includes jax.errors.ConcretizationTypeError (a traced value)
    return None


def concrete_array(value) -> np.ndarray | None:
  """`value` as a NumPy array, or `None` if it is traced."""
  try:
    return np.asarray(value)
  except TypeError:  # includes jax.errors.TracerArrayConversionError
    return None


def check_in_range(name: str, value, *, low: float | None = None, high: float | None = None,
                   low_open: bool = False, high_open: bool = False) -> None:
  """Raises if the concrete scalar `value` is NaN or lies outside `[low, high]`.

  `low_open` / `high_open` exclude that end.
  """
  number = concrete(value)
  if number is None:
    return
  below = low is not None and (number <= low if low_open else number < low)
  above = high is not None and (number >= high if high_open else number > high)
  if np.isnan(number) or below or above:
    left = '-inf' if low is None else f'{low:g}'
    right = 'inf' if high is None else f'{high:g}'
    opening = '(' if low_open or low is None else '['
    closing = ')' if high_open or high is None else ']'
    raise ValueError(f'{name} must be in {opening}{left}, {right}{closing}, got {value!r}')


def check_count(name: str, value, *, minimum: int = 1) -> None:
  """Raises unless `value` is an integer (Python or NumPy) `>= minimum`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')


def check_time(name: str, value, T: float) -> None:
  """Raises unless `0 < value < T` (the end of an integration that stops short of 0)."""
  check_in_range(name, value, low=0.0, high=T, low_open=True, high_open=True)


def check_tolerances(rtol, atol, names: tuple[str, str] = ('rtol', 'atol')) -> None:
  """Raises unless `rtol, atol >= 0` and not both are 0 (an adaptive solver never ends); the
  messages call them `names`."""
  check_in_range(names[0], rtol, low=0.0)
  check_in_range(names[1], atol, low=0.0)
  r, a = concrete(rtol), concrete(atol)
  if r == 0.0 and a == 0.0:
    raise ValueError(f'{names[0]} and {names[1]} must not both be 0 (the adaptive step would '
                     f'shrink without end), got {names[0]}=0, {names[1]}=0')


def keyword_arguments(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
  """`kwargs` with the defaults of `fn`'s keyword-only arguments filled in.

  Raises:
    TypeError: for a keyword `fn` does not take, listing the ones it takes.
  """
  options = {name: parameter.default
             for name, parameter in inspect.signature(fn).parameters.items()
             if parameter.kind == inspect.Parameter.KEYWORD_ONLY}
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise TypeError(f'{fn.__name__} got unknown keyword arguments {unknown}; valid '
                    f'choices: {sorted(options)}')
  return {**options, **kwargs}
