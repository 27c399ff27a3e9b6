"""`make_model(config)`: the one place a model config is read.

The config uses score_sde's key names (`config.model.name`, `config.model.nf`, ...,
`config.data.image_size`, `config.data.num_channels`, `config.data.centered`), as
a `ml_collections.ConfigDict` or a plain nested dict (e.g. the JSON dump of a
reference config). The modules themselves take typed fields only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from scorejax.models import layers
from scorejax.models.mlp import MLPScoreNet


class _Section:
  """Read-only view of one config section (ConfigDict or dict) with defaults."""

  def __init__(self, config: Any, name: str):
    section = config[name] if isinstance(config, Mapping) else getattr(config, name, None)
    if section is None:
      raise ValueError(f'config has no {name!r} section')
    self._name = name
    self._section = section

  def get(self, key: str, default: Any = None) -> Any:
    section = self._section
    if isinstance(section, Mapping) or hasattr(section, 'get'):
      value = section.get(key, default)
    else:
      value = getattr(section, key, default)
    return default if value is None and default is not None else value

  def require(self, key: str) -> Any:
    value = self.get(key)
    if value is None:
      raise ValueError(f'config.{self._name}.{key} is required')
    return value


def _make_mlp(model: _Section, data: _Section | None) -> nn.Module:
  del data
  return MLPScoreNet(
      hidden=int(model.get('hidden', 128)),
      num_layers=int(model.get('num_layers', 3)),
      embedding_type=str(model.get('embedding_type', 'positional')).lower(),
      embedding_dim=int(model.get('embedding_dim', 64)),
      fourier_scale=float(model.get('fourier_scale', 16.0)),
      scale_by_sigma=bool(model.get('scale_by_sigma', False)),
      act=layers.get_activation(model.get('nonlinearity', 'swish')),
  )


MODELS: dict[str, Callable[[_Section, _Section | None], nn.Module]] = {
    'mlp': _make_mlp,
}


def make_model(config: Any) -> nn.Module:
  """Builds the score network named by `config.model.name`.

  Args:
    config: a score_sde-style config (ConfigDict or nested dict) with a `model`
      section and, for image networks, a `data` section.

  Returns:
    A Flax Linen module, `apply(variables, x, labels, train=False)`.

  Raises:
    ValueError: for an unknown model name (listing the valid ones) or settings the
      network cannot realize.
  """
  model = _Section(config, 'model')
  name = str(model.require('name')).lower()
  if name not in MODELS:
    raise ValueError(f'unknown model name {name!r}; valid choices: {sorted(MODELS)}')
  has_data = (isinstance(config, Mapping) and 'data' in config) or hasattr(config, 'data')
  data = _Section(config, 'data') if has_data else None
  return MODELS[name](model, data)
