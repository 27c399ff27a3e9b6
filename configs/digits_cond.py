"""The offline default as a class-conditional model, for classifier-free guidance.

  python main.py --config=configs/digits_cond.py --workdir=runs/digits_cond          # ~5 min
  python main.py --config=configs/digits_cond.py --workdir=runs/digits_cond --mode=sample
  python main.py --config=configs/digits_cond.py --workdir=runs/digits_cond --mode=eval

The default (embedded 8x8 digits, residual MLP, VP SDE) with `model.num_classes=10`: a class
embedding added to the time embedding, labels dropped to "no class" with probability
`training.class_dropout` = 0.1. `--mode=sample` and `--mode=eval` draw class-conditional
samples (`sampling.condition=class`, the digits 0-9 in turn) with classifier-free guidance
weight `sampling.cfg_weight` = 1, the best digits-FID of docs/benchmarks.md's sweep; eval
scores them (accuracy, digits-FID) and reports the loss and the bits/dim of the
unconditional ("no class") part (`bpd`) and given each test digit's label
(`bpd_conditional`).
"""

from configs.default import get_default_configs


def get_config():
  config = get_default_configs()
  config.model.num_classes = 10
  config.sampling.condition = 'class'
  config.sampling.cfg_weight = 1.0
  config.sampling.num_samples = 500
  config.sampling.batch_size = 500
  return config
