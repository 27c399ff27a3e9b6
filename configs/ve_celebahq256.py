"""NCSN++ (continuous, VE SDE) on 256x256 CelebA-HQ images.

Follows score_sde's `configs/ve/celebahq_256_ncsnpp_continuous.py` (settings from its
`default_celeba_configs.py`/`default_lsun_configs.py`). Song et al. 2021 show samples of
this model (Fig. 1, Appendix) but report no FID for it; this config reproduces no number.

  python main.py --config=configs/ve_celebahq256.py --workdir=runs/celebahq256 \\
      --config.data.data_dir=/path/to/celebahq256_images

The images are read from an image folder (`data.data_dir`, see `scorejax.datasets`).
"""

from configs.cifar10_common import set_model
from configs.default import get_default_configs
from scorejax.models import presets


def get_config():
  config = get_default_configs()
  training = config.training
  training.sde = 'vesde'
  training.continuous = True
  training.reduce_mean = False
  training.batch_size = 8
  training.n_iters = 2400001
  training.snapshot_freq = 50000
  training.snapshot_freq_for_preemption = 5000
  training.log_freq = 50
  training.eval_freq = 100
  training.n_jitted_steps = 1

  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'langevin'
  sampling.snr = 0.075
  sampling.batch_size = 8
  sampling.num_samples = 16

  evaluate = config.eval
  evaluate.batch_size = 8
  evaluate.enable_bpd = False
  evaluate.enable_sampling = False  # FID needs inception_path and fid_stats_path

  data = config.data
  data.dataset = 'celebahq'
  data.image_size = 256
  data.num_channels = 3
  data.centered = False
  data.random_flip = True
  data.uniform_dequantization = False

  set_model(config, presets.ncsnpp_celebahq256())
  config.optim.lr = 2e-4
  config.optim.warmup = 5000
  config.optim.grad_clip = 1.0
  return config
