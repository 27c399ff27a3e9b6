"""NCSN++ trained with the discrete SMLD objective (VE) on CIFAR-10.

Reproduces score_sde's `configs/ve/cifar10_ncsnpp.py`. Reported: FID 2.45, IS 9.73 (PC
sampler), as reported by Song et al. 2021 (ICLR), Tables 2-3, and the score_sde README
(1.3M steps, batch 128, FID over 50k samples).

  python main.py --config=configs/smld_cifar.py --workdir=runs/smld_cifar
  python main.py --config=configs/smld_cifar.py --workdir=runs/smld_cifar \\
      --mode=eval --config.eval.enable_bpd=True --config.eval.enable_sampling=True \\
      --config.eval.inception_path=inception_fid.npz \\
      --config.eval.fid_stats_path=cifar10_train_stats.npz

Needs a prepared tfds `cifar10` (see `configs/cifar10_common.py`) and accelerators.
"""

from configs.cifar10_common import cifar10_experiment
from scorejax.models import presets


def get_config():
  return cifar10_experiment(
      sde='vesde', continuous=False, reduce_mean=False,
      predictor='reverse_diffusion', corrector='langevin', centered=False,
      model=presets.ncsnpp_cifar10())
