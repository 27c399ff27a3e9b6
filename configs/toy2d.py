"""A 2-D toy: a small MLP score model of two moons (or any toy), in about two minutes on CPU.

  python main.py --config=configs/toy2d.py --workdir=runs/toy
  python main.py --config=configs/toy2d.py --workdir=runs/toy --config.data.dataset=checkerboard

Writes `samples/step_<N>.png` (samples over the true density) and
`samples/score_step_<N>.png` (the learned score field at t = 0.01 as arrows).
"""

from configs.default import get_default_configs


def get_config():
  config = get_default_configs()
  training = config.training
  training.sde = 'vpsde'
  training.batch_size = 256
  training.n_iters = 4000
  training.log_freq = 100
  training.eval_freq = 500
  training.snapshot_freq = 1000
  training.snapshot_freq_for_preemption = 500
  training.reduce_mean = True

  config.data.dataset = 'two_moons'
  config.data.num_channels = 2

  config.sampling.method = 'pc'
  config.sampling.predictor = 'euler_maruyama'
  config.sampling.corrector = 'none'
  config.sampling.num_samples = 1000
  config.sampling.batch_size = 1000

  config.eval.batch_size = 500
  config.eval.bpd_num_batches = 2

  model = config.model
  model.name = 'mlp'
  model.hidden = 128
  model.num_layers = 3
  model.embedding_dim = 64
  model.ema_rate = 0.999
  model.embedding_type = 'positional'

  config.optim.lr = 2e-3
  config.optim.warmup = 100
  return config
