"""Converts pytorch-fid's Inception weights into the `.npz` that scorejax's FID network loads.

Input: `pt_inception-2015-12-05-6726825d.pth` (a torch state_dict of the TF 2015-12-05 FID
graph, read with `torch.load(weights_only=True)`: no code runs). Output: a flat `.npz`
keyed by the Flax variable paths of `scorejax.inception.InceptionV3`. Needs torch once.

EDM's `inception-2015-12-05.pkl` is a pickled TorchScript module; unpickling it executes
code, so it is not supported: use the pytorch-fid file (the same TF graph).

Usage:
  python scripts/convert_inception.py --pth pt_inception-2015-12-05-6726825d.pth \
      --out inception_fid.npz [--check_images 8]
"""

import argparse

import jax
import numpy as np

from scorejax import inception
from scorejax import inception_weights as weights


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--pth', required=True, help='pytorch-fid state_dict (.pth)')
  parser.add_argument('--out', required=True, help='output .npz')
  parser.add_argument('--check_images', type=int, default=0,
                      help='run the converted network on this many random images')
  args = parser.parse_args()

  if args.pth.endswith('.pkl'):
    raise SystemExit('EDM .pkl files are pickles (unsafe to load); use the pytorch-fid .pth: '
                     + weights.PYTORCH_FID_URL)
  variables = weights.torch_state_dict_to_variables(weights.load_torch_state_dict(args.pth))
  weights.save_variables(args.out, variables)
  num_params = sum(np.size(v) for v in jax.tree.leaves(variables['params']))
  print(f'wrote {args.out}: {num_params} parameters (FID Inception-v3 has 23850960)')
  if args.check_images:
    images = np.random.default_rng(0).integers(0, 256, (args.check_images, 32, 32, 3))
    out = inception.make_feature_fn(weights.load_variables(args.out))(images.astype(np.uint8))
    print('pool3 mean', out['pool3'].mean(), 'logits std', out['logits'].std())


if __name__ == '__main__':
  main()
