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

from scorejax.models import layers, ncsnpp
from scorejax.models.ddpm import DDPM
from scorejax.models.mlp import MLPScoreNet
from scorejax.models.ncsnpp import NCSNpp


class ConfigSection:
  """Read-only view of one config section (ConfigDict or dict) with defaults."""

  def __init__(self, config: Any, name: str):
    section = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
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


def _make_mlp(model: ConfigSection, data: ConfigSection | None) -> nn.Module:
  del data
  return MLPScoreNet(
      hidden=int(model.get('hidden', 128)),
      num_layers=int(model.get('num_layers', 3)),
      embedding_type=_choice(model, 'embedding_type', ncsnpp.EMBEDDING_TYPES, 'positional'),
      embedding_dim=int(model.get('embedding_dim', 64)),
      fourier_scale=float(model.get('fourier_scale', 16.0)),
      scale_by_sigma=bool(model.get('scale_by_sigma', False)),
      act=layers.get_activation(model.get('nonlinearity', 'swish')),
      num_classes=_num_classes(model),
  )


def _num_classes(model: ConfigSection) -> int:
  num_classes = int(model.get('num_classes', 0))
  if num_classes < 0:
    raise ValueError(f'config.model.num_classes must be >= 0 (0: unconditional), got '
                     f'{num_classes}')
  return num_classes


def _choice(model: ConfigSection, key: str, valid: tuple[str, ...],
            default: str | None = None) -> str:
  value = str(model.get(key, default)).lower()
  if value not in valid:
    raise ValueError(f'unknown config.model.{key} {value!r}; valid choices: {list(valid)}')
  return value


def _ints(value: Any) -> tuple[int, ...]:
  return tuple(int(v) for v in value)


def _unet_fields(model: ConfigSection, data: ConfigSection | None) -> dict[str, Any]:
  """The fields NCSN++ and DDPM share, after checking what a U-Net cannot realize."""
  if data is None:
    raise ValueError('image networks need a config.data section (image_size, num_channels)')
  image_size = int(data.require('image_size'))
  nf = int(model.require('nf'))
  num_res_blocks = int(model.require('num_res_blocks'))
  ch_mult = _ints(model.require('ch_mult'))
  attn_resolutions = _ints(model.get('attn_resolutions', ()))
  if not ch_mult:
    raise ValueError('config.model.ch_mult must not be empty')
  num_downsamplings = len(ch_mult) - 1
  if image_size % (2**num_downsamplings):
    raise ValueError(f'config.data.image_size={image_size} is not divisible by '
                     f'2^{num_downsamplings}, the number of down-samplings of ch_mult={ch_mult}')
  resolutions = [image_size // 2**i for i in range(len(ch_mult))]
  missing = sorted(set(attn_resolutions) - set(resolutions))
  if missing:
    raise ValueError(f'config.model.attn_resolutions {missing} never occur; the resolutions of '
                     f'image_size={image_size}, ch_mult={ch_mult} are {resolutions}')
  if nf < 1 or num_res_blocks < 0:
    raise ValueError('config.model.nf must be positive and num_res_blocks non-negative')
  for channels in {nf, *(nf * m for m in ch_mult)}:
    layers.group_norm(channels)  # raises for channel counts GroupNorm cannot split
  return dict(
      nf=nf,
      ch_mult=ch_mult,
      num_res_blocks=num_res_blocks,
      attn_resolutions=attn_resolutions,
      dropout=float(model.get('dropout', 0.1)),
      resamp_with_conv=bool(model.get('resamp_with_conv', True)),
      scale_by_sigma=bool(model.get('scale_by_sigma', False)),
      centered=bool(data.get('centered', False)),
      act=layers.get_activation(model.get('nonlinearity', 'swish')),
      sigma_min=float(model.get('sigma_min', 0.01)),
      sigma_max=float(model.get('sigma_max', 50.0)),
      num_scales=int(model.get('num_scales', 1000)),
      num_classes=_num_classes(model),
  )


def _make_ncsnpp(model: ConfigSection, data: ConfigSection | None) -> nn.Module:
  if _num_classes(model) and not bool(model.get('conditional', True)):
    raise ValueError('config.model.num_classes > 0 adds the class to the time embedding: it '
                     'needs config.model.conditional=True')
  return NCSNpp(
      **_unet_fields(model, data),
      conditional=bool(model.get('conditional', True)),
      fir=bool(model.get('fir', False)),
      fir_kernel=_ints(model.get('fir_kernel', (1, 3, 3, 1))),
      skip_rescale=bool(model.get('skip_rescale', True)),
      resblock_type=_choice(model, 'resblock_type', ncsnpp.RESBLOCK_TYPES, 'biggan'),
      progressive=_choice(model, 'progressive', ncsnpp.PROGRESSIVE, 'none'),
      progressive_input=_choice(model, 'progressive_input', ncsnpp.PROGRESSIVE_INPUT, 'none'),
      progressive_combine=_choice(model, 'progressive_combine', ncsnpp.PROGRESSIVE_COMBINE,
                                  'sum'),
      embedding_type=_choice(model, 'embedding_type', ncsnpp.EMBEDDING_TYPES, 'fourier'),
      fourier_scale=float(model.get('fourier_scale', 16.0)),
      init_scale=float(model.get('init_scale', 0.0)),
  )


def _make_ddpm(model: ConfigSection, data: ConfigSection | None) -> nn.Module:
  fields = _unet_fields(model, data)
  if fields['nf'] % 32:
    raise ValueError(f"ddpm uses 32-group GroupNorm: config.model.nf={fields['nf']} must be a "
                     'multiple of 32')
  return DDPM(**fields)


MODELS: dict[str, Callable[[ConfigSection, ConfigSection | None], nn.Module]] = {
    'mlp': _make_mlp,
    'ncsnpp': _make_ncsnpp,
    'ddpm': _make_ddpm,
}


def make_model(config: Any) -> nn.Module:
  """Builds the score network named by `config.model.name`.

  Args:
    config: a score_sde-style config (ConfigDict or nested dict) with a `model`
      section and, for image networks, a `data` section.

  Returns:
    A Flax Linen module, `apply(variables, x, labels, train=False)` (class-conditional
    networks, `model.num_classes > 0`, also take `class_labels=[B]`).

  Raises:
    ValueError: for an unknown model name (listing the valid ones) or settings the
      network cannot realize.
  """
  model = ConfigSection(config, 'model')
  name = str(model.require('name')).lower()
  if name not in MODELS:
    raise ValueError(f'unknown model name {name!r}; valid choices: {sorted(MODELS)}')
  has_data = (isinstance(config, Mapping) and 'data' in config) or hasattr(config, 'data')
  data = ConfigSection(config, 'data') if has_data else None
  return MODELS[name](model, data)
