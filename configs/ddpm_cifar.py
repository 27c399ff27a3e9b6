"""The original DDPM network (discrete DDPM objective, VP) on CIFAR-10.

Reproduces score_sde's `configs/vp/cifar10_ddpm.py`. Reported: FID 3.24 (ancestral
sampling); NLL 3.28 bits/dim and FID 3.37 with the probability-flow ODE, as reported by
Song et al. 2021 (ICLR), Tables 2-3, and the score_sde README (1.3M steps, batch 128,
FID over 50k samples).

  python main.py --config=configs/ddpm_cifar.py --workdir=runs/ddpm_cifar
  python main.py --config=configs/ddpm_cifar.py --workdir=runs/ddpm_cifar \\
      --mode=eval --config.eval.enable_bpd=True --config.eval.enable_sampling=True \\
      --config.eval.inception_path=inception_fid.npz \\
      --config.eval.fid_stats_path=cifar10_train_stats.npz

Needs a prepared tfds `cifar10` (see `configs/cifar10_common.py`) and accelerators.
"""

from configs.cifar10_common import cifar10_experiment
from scorejax.models import presets


def get_config():
  return cifar10_experiment(
      sde='vpsde', continuous=False, reduce_mean=True,
      predictor='ancestral_sampling', corrector='none', centered=True,
      model=presets.ddpm_cifar10())
