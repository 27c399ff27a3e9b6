"""Trains the digits-FID classifier once and writes `scorejax/assets/digits_classifier.npz`.

Deterministic: fixed seed, AdamW on mini-batches in a fixed order, the fixed train / test split of
`image_sources.digits_images` (first 1500 train, last 297 test). Also stores the reference
feature statistics (`ref_mu`, `ref_sigma`) of the 1500 training digits and the test accuracy.

Usage:
  python scripts/train_digits_classifier.py [--out scorejax/assets/digits_classifier.npz]
"""

import argparse
import time

import jax
import numpy as np

from scorejax import digits_classifier


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='scorejax/assets/digits_classifier.npz')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--num_epochs', type=int, default=40)
  parser.add_argument('--weight_decay', type=float, default=0.05)
  args = parser.parse_args()

  train_images, train_labels = digits_classifier.digits_with_labels('train')
  test_images, test_labels = digits_classifier.digits_with_labels('test')
  start = time.perf_counter()
  params = digits_classifier.train_classifier(
    jax.random.key(args.seed), train_images, train_labels, num_epochs=args.num_epochs,
    weight_decay=args.weight_decay,
  )
  params = jax.tree.map(lambda v: np.asarray(v, np.float32), params)
  ref_mu, ref_sigma = digits_classifier.reference_stats(params, train_images)
  evaluator = digits_classifier.DigitsEvaluator(params, ref_mu, ref_sigma)
  train_metrics = evaluator.metrics(train_images, train_labels)
  test_metrics = evaluator.metrics(test_images, test_labels)
  num_params = sum(v.size for v in jax.tree.leaves(params))
  print(f'trained {num_params} parameters in {time.perf_counter() - start:.1f}s')
  print(f'train: {train_metrics}')
  print(f'test:  {test_metrics}')
  np.savez(
    args.out,
    **digits_classifier.to_arrays(
      evaluator,
      test_accuracy=np.float64(test_metrics['accuracy']),
      seed=np.int64(args.seed),
      num_epochs=np.int64(args.num_epochs),
    ),
  )
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
