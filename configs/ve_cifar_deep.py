"""NCSN++ deep (continuous, VE SDE) on CIFAR-10.

Reproduces score_sde's `configs/ve/cifar10_ncsnpp_deep_continuous.py`. Reported: FID
2.20, IS 9.89 (PC sampler, reverse diffusion + Langevin), as reported by Song et al.
2021 (ICLR), Tables 2-3, and the score_sde README (1.3M steps, batch 128, FID over 50k
samples).

  python main.py --config=configs/ve_cifar_deep.py --workdir=runs/ve_cifar_deep
  python main.py --config=configs/ve_cifar_deep.py --workdir=runs/ve_cifar_deep \\
      --mode=eval --config.eval.enable_bpd=True --config.eval.enable_sampling=True \\
      --config.eval.inception_path=inception_fid.npz \\
      --config.eval.fid_stats_path=cifar10_train_stats.npz

Needs a prepared tfds `cifar10` (see `configs/cifar10_common.py`) and accelerators.
"""

from configs import ve_cifar
from configs.cifar10_common import set_model
from scorejax.models import presets


def get_config():
  """`configs/ve_cifar.py` with the deep network."""
  config = ve_cifar.get_config()
  set_model(config, presets.ncsnpp_deep_cifar10())
  return config
