"""A seconds-long smoke test of the whole workflow (tests, first install check).

  python main.py --config=configs/smoke.py --workdir=/tmp/smoke
  python main.py --config=configs/smoke.py --workdir=/tmp/smoke --mode=sample
  python main.py --config=configs/smoke.py --workdir=/tmp/smoke --mode=eval

A tiny MLP on the 2-D two-moons toy: 20 steps, checkpoints every 5 / 10 steps, 20-step
sampler. Add `--config.data.dataset=digits --config.model.name=ddpm` style overrides to
smoke-test other paths. It reproduces nothing.
"""

from configs.default import get_default_configs


def get_config():
  config = get_default_configs()
  training = config.training
  training.batch_size = 16
  training.n_iters = 20
  training.log_freq = 5
  training.eval_freq = 10
  training.snapshot_freq = 10
  training.snapshot_freq_for_preemption = 5

  config.data.dataset = 'two_moons'
  config.data.num_channels = 2

  sampling = config.sampling
  sampling.num_steps = 20
  sampling.num_samples = 32
  sampling.batch_size = 16

  evaluate = config.eval
  evaluate.batch_size = 16
  evaluate.num_samples = 32
  evaluate.bpd_num_batches = 1
  evaluate.loss_num_batches = 2
  evaluate.rtol = 1e-3
  evaluate.atol = 1e-3

  model = config.model
  model.name = 'mlp'
  model.hidden = 16
  model.num_layers = 1
  model.embedding_dim = 16
  model.ema_rate = 0.9
  config.optim.warmup = 5

  classifier = config.classifier  # --mode=train_classifier (labelled images, e.g. digits)
  classifier.channels = (8, 16)
  classifier.embedding_dim = 16
  classifier.n_iters = 20
  classifier.batch_size = 16
  classifier.log_freq = 5
  classifier.snapshot_freq = 10
  classifier.eval_num_batches = 1
  return config
