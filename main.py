"""scorejax entry point: `python main.py --workdir=DIR [--config=FILE] [--mode=MODE]`, MODE
being train (the default), eval, sample or train_classifier.

With no `--config` it trains the offline default (`configs/default.py`: embedded 8x8
digits, CPU-friendly). Config fields are overridden with `--config.training.n_iters=100`
style flags; the config is locked, so a misspelt field is an error.

Multi-host: pass `--coordinator_address=host:port --num_processes=N --process_id=i`
(e.g. several CPU processes on one machine); on TPU pods and SLURM JAX finds its peers.
"""

import json
import logging as std_logging
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from scorejax import host_memory

if __name__ == '__main__':
  # First of all: this may run the same command again with glibc's malloc tuned for XLA:CPU
  # (huge pages, memory kept between steps; scorejax/host_memory.py, SCOREJAX_TUNE_MALLOC=0).
  host_memory.reexec_with_tuned_malloc()

_DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parent / 'configs' / 'default.py')


def _config_error(error: BaseException) -> None:
  """Reports a bad `--config` / `--config.*` flag on one line and exits with status 2."""
  text = str(error.args[0] if error.args else error)
  text = ' '.join(text.replace('\\n', ' ').replace("\\'", '').replace("'", '').split())
  overrides = [a for a in sys.argv[1:] if a.startswith('--config')]
  sys.stderr.write(f'main.py: error: invalid config flag {overrides}: {text}\n')
  sys.exit(2)


try:  # ml_collections applies --config.* overrides as soon as the flag is defined.
  _CONFIG = config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG, 'Config file (ml_collections).', lock_config=True
  )
except (AttributeError, KeyError, TypeError, ValueError) as _error:
  _config_error(_error)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'train_classifier'],
                          'What to run.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 for jax.distributed (multi-host).'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process (multi-host).')
flags.mark_flags_as_required(['workdir'])


def _fail(error: BaseException) -> None:
  """Reports an error that stops the run on one line and exits with status 1."""
  logging.error('%s: %s', type(error).__name__, error)
  sys.stderr.write(f'main.py: error: {error}\n')
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    config = _CONFIG.value
    config.training  # noqa: B018 - raises if the config file failed to load
  except OSError as error:
    _config_error(error)
  workdir = pathlib.Path(_WORKDIR.value)

  # Before JAX starts its backends: CPU device split and multi-process setup.
  from scorejax import distributed

  num_processes = _NUM_PROCESSES.value or 1
  batch_size = {'train': config.training.batch_size,
                'train_classifier': config.classifier.batch_size}.get(_MODE.value,
                                                                     config.eval.batch_size)
  message = distributed.configure_cpu_devices(max(1, batch_size // num_processes))
  distributed.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

  import jax

  if message and jax.default_backend() == 'cpu':
    logging.info(message)
  logging.info('JAX %s: %s', jax.__version__, distributed.describe_devices())
  logging.info('%s', host_memory.describe())
  logging.info('mode=%s workdir=%s config:\n%s', _MODE.value, workdir, config)
  from scorejax import run_classifier, run_eval, run_sample, run_train
  from scorejax.datasets import DatasetNotPreparedError

  modules = {'train': run_train, 'eval': run_eval, 'sample': run_sample,
             'train_classifier': run_classifier}
  runner = modules[_MODE.value]
  errors = (run_train.TrainingError, DatasetNotPreparedError, FileNotFoundError)
  try:
    # Inputs first (data prepared, checkpoint found, metric files present, consistent
    # settings), so a run that cannot start leaves no trace in the workdir.
    runner.validate(config, str(workdir))
  except (*errors, ValueError) as error:
    _fail(error)
  try:
    if jax.process_index() == 0:
      workdir.mkdir(parents=True, exist_ok=True)
      name = 'config.json' if _MODE.value == 'train' else f'config_{_MODE.value}.json'
      (workdir / name).write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2))
    result = runner.run(config, str(workdir))
  except errors as error:
    _fail(error)
  logging.info('%s finished: %s', _MODE.value, result)


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of checkpointing internals (orbax logs every write)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with bad `--config.*` overrides reported on one line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as error:
    _config_error(error)


def _entry():
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  std_logging.getLogger('absl').addFilter(_QuietLibraries())
  try:
    app.run(main, flags_parser=_parse_flags)
  except KeyboardInterrupt:
    sys.exit(130)


if __name__ == '__main__':
  _entry()
