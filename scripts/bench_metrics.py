"""Benchmarks the evaluation stack: Inception feature throughput, FID on 2048-d statistics,
KID with the standard subsets, and digits-FID; writes a section of docs/benchmarks.md.

Random Inception weights (same cost as the real ones). Usage:
  python scripts/bench_metrics.py [--batch_size 16] [--write]
"""

import argparse
import platform
import re
import time

import jax
import numpy as np

from scorejax import digits_classifier, inception, metrics

BEGIN, END = '<!-- bench_metrics:begin -->', '<!-- bench_metrics:end -->'


def timed(fn, repeats=3):
  fn()  # compile / warm up
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--write', action='store_true', help='update docs/benchmarks.md')
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  rows = []

  variables = inception.init_variables(jax.random.key(0))
  feature_fn = inception.make_feature_fn(variables)
  images = rng.integers(0, 256, (args.batch_size, 32, 32, 3)).astype(np.uint8)
  seconds = timed(lambda: feature_fn(images), repeats=2)
  rows.append((f'Inception pool3+logits, 32x32 -> 299, batch {args.batch_size}, '
               f'{jax.device_count()} {jax.default_backend()} device(s)',
               f'{seconds * 1e3:.0f} ms/batch', f'{args.batch_size / seconds:.1f} images/s'))

  feats = rng.normal(size=(5000, 2048))
  stats = metrics.FeatureStats(2048).update(feats)
  mu, sigma = stats.mean_cov()
  seconds = timed(lambda: metrics.frechet_distance(mu, sigma, mu + 0.1, sigma * 1.1))
  rows.append(('frechet_distance, D = 2048 (float64)', f'{seconds:.2f} s', ''))
  seconds = timed(lambda: metrics.FeatureStats(2048).update(feats), repeats=2)
  rows.append(('FeatureStats.update, 5000 x 2048', f'{seconds:.2f} s',
               f'{5000 / seconds:,.0f} features/s'))
  seconds = timed(lambda: metrics.kernel_inception_distance(feats, feats[::-1]), repeats=1)
  rows.append(('kernel_inception_distance, 100 subsets of 1000, D = 2048', f'{seconds:.2f} s', ''))

  evaluator = digits_classifier.load_evaluator()
  test_images, test_labels = digits_classifier.digits_with_labels('test')
  seconds = timed(lambda: evaluator.metrics(test_images))
  rows.append(('digits metrics, 297 images', f'{seconds * 1e3:.0f} ms', ''))
  real = evaluator.metrics(test_images, test_labels)

  table = '\n'.join(f'| {a} | {b} | {c} |' for a, b, c in rows)
  section = f"""{BEGIN}
## Evaluation metrics (`scripts/bench_metrics.py`)

Machine: {platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s) (2 shared
CPU cores when measured on the dev box). Command: `python scripts/bench_metrics.py --batch_size
{args.batch_size} --write`.

| case | time | throughput |
|---|---|---|
{table}

digits-FID floor (packaged classifier, 297 real held-out digits vs the 1500 training digits):
digits_fid {real['digits_fid']:.2f}, digits_is {real['digits_is']:.2f}, accuracy
{real['accuracy']:.4f}, confidence {real['confidence']:.3f}, class_entropy
{real['class_entropy']:.3f} (log 10 = 2.303). Samples of the embedded default: measure with
`python scripts/eval_digits.py --samples workdir/eval/ckpt_<step>/sampler_<tag>/samples_0.npz`
(or `--mode=eval`, which reports it for every checkpoint); results in the section "Offline
default" below.
{END}"""
  print(section)
  if args.write:
    with open('docs/benchmarks.md') as f:
      text = f.read()
    if BEGIN in text:
      text = re.sub(re.escape(BEGIN) + '.*?' + re.escape(END), lambda _: section, text, flags=re.S)
    else:
      text = text.rstrip('\n') + '\n\n' + section + '\n'
    with open('docs/benchmarks.md', 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
