"""One metric writer for the drivers: TensorBoard event files plus a JSON-lines log.

Only process 0 writes; on other processes `MetricWriter` does nothing, so drivers call
it unconditionally. `read_jsonl` reads a metrics log back (tests, plots).
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def _scalar(value: Any) -> float | int | bool | str:
  if isinstance(value, str | bool):
    return value
  array = np.asarray(value)
  if array.dtype == np.bool_:
    return bool(array)
  if np.issubdtype(array.dtype, np.integer):
    return int(array)
  return float(array)


class MetricWriter:
  """Writes scalars to `<logdir>/<name>.jsonl` and TensorBoard events in `<logdir>/tb`.

  Args:
    logdir: directory of the logs (created).
    name: file name stem of the JSON-lines file.
    tensorboard: also write TensorBoard event files (tensorboardX).
  """

  def __init__(self, logdir: str | pathlib.Path, name: str = 'metrics', tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.logdir = pathlib.Path(logdir)
    self._summary = None
    self._jsonl = None
    if not self.enabled:
      return
    self.logdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(self.logdir / f'{name}.jsonl', 'a')  # noqa: SIM115 - closed in close()
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._summary = SummaryWriter(str(self.logdir / 'tb'))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends `{'step': step, **scalars}` to the JSON log and the event file."""
    if not self.enabled:
      return
    record = {'step': int(step)}
    record.update({name: _scalar(value) for name, value in scalars.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._summary is not None:
      for name, value in record.items():
        if name != 'step' and isinstance(value, int | float) and math.isfinite(value):
          self._summary.add_scalar(name, value, int(step))

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """Adds a `uint8 [H, W, C]` image to TensorBoard."""
    if self.enabled and self._summary is not None:
      self._summary.add_image(name, np.asarray(image), int(step), dataformats='HWC')

  def flush(self) -> None:
    if self._summary is not None:
      self._summary.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._summary is not None:
      self._summary.close()
      self._summary = None


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
  """Reads a JSON-lines metrics file (skipping a torn last line)."""
  records = []
  for line in pathlib.Path(path).read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records
