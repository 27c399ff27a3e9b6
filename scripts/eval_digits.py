"""Prints digits-FID, the IS analogue, confidence and class entropy of digits samples.

The input is an `.npz` with `samples` `[N, 8k, 8k, 1]` in [0, 1] (NHWC; e.g. the eval
driver's `workdir/eval/ckpt_<step>/samples_<k>.npz` shards) and optionally `labels` `[N]`
(then accuracy is printed too). For comparison the same metrics of the 297 real held-out digits are
printed: digits-FID depends on N, so compare runs at equal N.

Usage:
  python scripts/eval_digits.py --samples workdir/eval/ckpt_10000/samples_0.npz
"""

import argparse
import json

import numpy as np

from scorejax import digits_classifier


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--samples', required=True)
  parser.add_argument('--classifier', default=None, help='default: the packaged asset')
  args = parser.parse_args()

  evaluator = digits_classifier.load_evaluator(args.classifier)
  with np.load(args.samples) as data:
    samples = data['samples']
    labels = data['labels'] if 'labels' in data.files else None
  if samples.ndim == 2 and samples.shape[1] % 64 == 0:  # flattened [N, 64 k^2]
    side = int(np.sqrt(samples.shape[1]))
    samples = samples.reshape(-1, side, side, 1)
  result = evaluator.metrics(samples, labels)
  test_images, test_labels = digits_classifier.digits_with_labels('test')
  real = evaluator.metrics(test_images, test_labels)
  print(json.dumps({'num_samples': len(samples), **result}))
  print(json.dumps({'real_test_digits': len(test_images), **real}))


if __name__ == '__main__':
  main()
