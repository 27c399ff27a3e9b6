"""Shared settings of the CIFAR-10 experiments (score_sde's `default_cifar10_configs.py`).

Not a config by itself: `vp_cifar.py`, `ve_cifar.py`, ... start from
`get_cifar10_configs()` and set the SDE, the sampler and the network. CIFAR-10 is read
through tfds; prepare it once on a machine with network access
(`tfds build cifar10 --file_format=array_record`), nothing is downloaded at run time.
"""

import ml_collections

from configs.default import get_default_configs


def get_cifar10_configs() -> ml_collections.ConfigDict:
  """The default config with score_sde's CIFAR-10 training, data and eval settings."""
  config = get_default_configs()
  training = config.training
  training.batch_size = 128
  training.n_iters = 1300001
  training.snapshot_freq = 50000
  training.log_freq = 50
  training.eval_freq = 100
  training.snapshot_freq_for_preemption = 10000
  training.snapshot_sampling = True
  training.likelihood_weighting = False
  training.continuous = True
  training.reduce_mean = False
  training.n_jitted_steps = 5
  training.max_to_keep = 0

  sampling = config.sampling
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.probability_flow = False
  sampling.snr = 0.16
  sampling.num_steps = 0
  sampling.batch_size = 64
  sampling.num_samples = 64

  evaluate = config.eval
  evaluate.batch_size = 512
  evaluate.enable_sampling = False
  evaluate.num_samples = 50000
  evaluate.enable_loss = True
  evaluate.enable_bpd = False
  evaluate.enable_elbo = False
  evaluate.elbo_num_times = 16
  evaluate.bpd_dataset = 'test'
  evaluate.bpd_num_batches = 0
  evaluate.bpd_num_repeats = 5
  evaluate.loss_num_batches = 0

  data = config.data
  data.dataset = 'cifar10'
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True
  data.centered = False
  data.uniform_dequantization = False

  model = config.model
  model.sigma_min = 0.01
  model.sigma_max = 50.0
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.0
  model.dropout = 0.1
  model.embedding_type = 'fourier'

  optim = config.optim
  optim.weight_decay = 0.0
  optim.optimizer = 'Adam'
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.warmup = 5000
  optim.grad_clip = 1.0

  # The noise-conditional classifier of --mode=train_classifier (class-conditional sampling).
  # A 4-stage ResNet at 32, 16, 8, 4 pixels; the paper's is a Wide-ResNet-28-10, and these
  # settings are a starting point, not a reproduction of it.
  classifier = config.classifier
  classifier.channels = (128, 256, 256, 256)
  classifier.num_res_blocks = 2
  classifier.n_iters = 200000
  classifier.batch_size = 128
  classifier.lr = 3e-4
  classifier.weight_decay = 0.05  # AdamW
  classifier.snapshot_freq = 10000
  classifier.eval_num_batches = 20
  return config


def set_model(config: ml_collections.ConfigDict, preset: ml_collections.ConfigDict) -> None:
  """Copies a `scorejax.models.presets` model section into `config.model`.

  Raises:
    KeyError: if the preset has a field `configs/default.py` does not define.
  """
  for name, value in preset.items():
    if name not in config.model:
      raise KeyError(f'preset field model.{name} is not defined in configs/default.py')
    setattr(config.model, name, value)


def cifar10_experiment(*, sde: str, continuous: bool, reduce_mean: bool, predictor: str,
                       corrector: str, centered: bool,
                       model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """One row of the score_sde CIFAR-10 table: the settings in which the configs differ."""
  config = get_cifar10_configs()
  config.training.sde = sde
  config.training.continuous = continuous
  config.training.reduce_mean = reduce_mean
  config.sampling.method = 'pc'
  config.sampling.predictor = predictor
  config.sampling.corrector = corrector
  config.data.centered = centered
  set_model(config, model)
  return config
