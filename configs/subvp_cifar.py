"""DDPM++ (continuous, sub-VP SDE) on CIFAR-10.

Reproduces score_sde's `configs/subvp/cifar10_ddpmpp_continuous.py`. Reported: FID 2.61,
IS 9.56 (PC sampler); NLL 3.02 bits/dim and FID 3.16 with the probability-flow ODE, as
reported by Song et al. 2021 (ICLR), Tables 2-3, and the score_sde README (1.3M steps,
batch 128, FID over 50k samples).

  python main.py --config=configs/subvp_cifar.py --workdir=runs/subvp_cifar
  python main.py --config=configs/subvp_cifar.py --workdir=runs/subvp_cifar \\
      --mode=eval --config.eval.enable_bpd=True --config.eval.enable_sampling=True \\
      --config.eval.inception_path=inception_fid.npz \\
      --config.eval.fid_stats_path=cifar10_train_stats.npz

Needs a prepared tfds `cifar10` (see `configs/cifar10_common.py`) and accelerators.
"""

from configs.cifar10_common import cifar10_experiment
from scorejax.models import presets


def get_config():
  return cifar10_experiment(
      sde='subvpsde', continuous=True, reduce_mean=True,
      predictor='euler_maruyama', corrector='none', centered=True,
      model=presets.ddpmpp_cifar10())
