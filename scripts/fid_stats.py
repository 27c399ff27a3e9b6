"""Reference FID statistics: compute them for a dataset split, convert or compare stats files.

Writes / reads `.npz` files with `mu [D]`, `sigma [D, D]` (float64) and `count`, the layout
of pytorch-fid and EDM (`cifar10-32x32.npz`); score_sde's `assets/stats/<name>_stats.npz`
(raw `pool_3` features) are read too. Published FIDs use the *training* set statistics.

Usage:
  # Inception pool3 statistics of a prepared tfds dataset / image folder (all of the split):
  python scripts/fid_stats.py compute --dataset cifar10 --split train --image_size 32 \
      --inception_path inception_fid.npz --out cifar10_train_stats.npz [--data_dir ...]
  # digits-FID statistics (packaged classifier, no Inception needed):
  python scripts/fid_stats.py compute --dataset digits --split train --out digits_stats.npz
  # score_sde pool_3 file -> mu/sigma file:
  python scripts/fid_stats.py convert --input cifar10_stats.npz --out cifar10_mu_sigma.npz
  # Fréchet distance between two statistics files (either layout):
  python scripts/fid_stats.py compare a.npz b.npz
"""

import argparse
import time

import numpy as np

from scorejax import datasets, digits_classifier, inception, metrics, quality
from scorejax import inception_weights as weights


def compute(args) -> None:
  # datasets' source factory: the same images (and resize) that training sees.
  source = datasets._image_source(args.dataset, args.split, args.image_size, args.data_dir)
  if args.dataset == 'digits':
    feature_fn, key = digits_classifier.load_evaluator().apply, 'features'
  else:
    variables = weights.load_variables(args.inception_path)
    feature_fn, key = inception.make_feature_fn(variables), 'pool3'
  num = len(source.records) if args.max_examples is None else args.max_examples
  stats, start = None, time.perf_counter()
  for first in range(0, num, args.batch_size):
    batch = np.stack([source.resize_fn(np.asarray(source.records[i]), args.image_size)
                      for i in range(first, min(first + args.batch_size, num))])
    images = batch.astype(np.float64) / source.max_value
    if args.dataset != 'digits':
      images = quality.to_uint8(images)
    feats = feature_fn(images)[key]
    stats = stats or metrics.FeatureStats(feats.shape[1])
    stats.update(feats)
    print(f'\r{stats.count}/{num} images, {time.perf_counter() - start:.0f}s', end='')
  print()
  quality.save_reference_stats(args.out, stats)
  print(f'wrote {args.out} ({stats.count} images)')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True)
  p = commands.add_parser('compute')
  p.add_argument('--dataset', required=True, help='digits, a tfds name known to datasets.py, '
                 'or an image-folder dataset with --data_dir')
  p.add_argument('--split', default='train')
  p.add_argument('--image_size', type=int, default=32)
  p.add_argument('--data_dir', default=None)
  p.add_argument('--inception_path', default=None, help=f'or env var {weights.WEIGHTS_ENV_VAR}')
  p.add_argument('--batch_size', type=int, default=250)
  p.add_argument('--max_examples', type=int, default=None)
  p.add_argument('--out', required=True)
  p = commands.add_parser('convert')
  p.add_argument('--input', required=True)
  p.add_argument('--out', required=True)
  p = commands.add_parser('compare')
  p.add_argument('files', nargs=2)
  args = parser.parse_args()

  if args.command == 'compute':
    compute(args)
  elif args.command == 'convert':
    mu, sigma = quality.load_reference_stats(args.input)
    np.savez(args.out, mu=mu, sigma=sigma)
    print(f'wrote {args.out}: mu {mu.shape}, sigma {sigma.shape}')
  else:
    (mu1, sigma1), (mu2, sigma2) = map(quality.load_reference_stats, args.files)
    print(f'FID {metrics.frechet_distance(mu1, sigma1, mu2, sigma2):.4f}')


if __name__ == '__main__':
  main()
