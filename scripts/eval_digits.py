"""Prints digits-FID, the IS analogue, confidence and class entropy of digits samples.

The input is an `.npz` with `samples` `[N, 8k, 8k, 1]` in [0, 1] (NHWC; e.g. the eval
driver's `workdir/eval/ckpt_<step>/sampler_<tag>/samples_<k>.npz` shards) and optionally
`labels` `[N]` (then accuracy is printed too). For comparison the same metrics of the 297
real held-out digits are printed: digits-FID depends on N, so compare runs at equal N.

Completions of test digits (`--mode=sample` with `sampling.condition=inpaint`, which writes
`originals` and `observed` beside `samples`) get one more line: for the originals, the
inputs (hidden pixels mid-gray) and the completions, the classifier's accuracy on the true
labels and its agreement with its own class for the original.

Usage:
  python scripts/eval_digits.py --samples workdir/eval/ckpt_8000/sampler_<tag>/samples_0.npz
  python scripts/eval_digits.py --samples workdir/samples/inpaint_8000.npz
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
  data = dict(np.load(args.samples))
  samples = data['samples']
  labels = data.get('labels')
  if samples.ndim == 2 and samples.shape[1] % 64 == 0:  # flattened [N, 64 k^2]
    side = int(np.sqrt(samples.shape[1]))
    samples = samples.reshape(-1, side, side, 1)
  result = evaluator.metrics(samples, labels)
  test_images, test_labels = digits_classifier.digits_with_labels('test')
  real = evaluator.metrics(test_images, test_labels)
  print(json.dumps({'num_samples': len(samples), **result}))
  print(json.dumps({'real_test_digits': len(test_images), **real}))
  if 'originals' in data:
    print(json.dumps(completion_scores(evaluator, data, test_images, test_labels)))


def completion_scores(evaluator, data, test_images, test_labels) -> dict:
  """Accuracy and agreement with the original's class of originals, inputs, completions."""
  originals = digits_classifier.to_digits_8x8(data['originals'])
  count = len(originals)
  if not np.allclose(originals, test_images[:count], atol=1e-6):
    raise ValueError('originals are not the first test digits (another dataset or order?)')
  predicted = lambda images: evaluator.apply(np.clip(images, 0, 1))['logits'].argmax(1)
  reference = predicted(originals)
  scores = {'completions_of': count}
  for name in ('originals', 'observed', 'samples'):
    classes = predicted(data[name])
    scores[f'{name}_accuracy'] = float((classes == test_labels[:count]).mean())
    scores[f'{name}_agreement'] = float((classes == reference).mean())
  return scores


if __name__ == '__main__':
  main()
