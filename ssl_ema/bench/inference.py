"""Inference cost against batch size: `python -m ssl_ema.bench.inference`.

    python -m ssl_ema.bench.inference --arch=small_cnn --image_shape=28,28,1 --images=10000

Times what every evaluation, pool pass and export check does (core/accuracy.py: arg-max and
unknown score of an inference-mode model, `--images` images in slices) at each of --batches and at
the size the toolkit picks (`accuracy.inference_batch`, "auto"), in turn, --repeats times
(alternating, so a machine shared with other work slows them alike). Prints, for each batch size,
the median CPU-seconds of one pass (every thread's: `time.process_time`) and wall seconds, their
ratio to the first of --batches (the toolkit's former fixed 1,024), and whether its predictions
equal that baseline's. Random weights and images: the arithmetic, not the accuracy, is measured.
"""
import os
import statistics
import sys
import time

from absl import app, flags

flags.DEFINE_string('arch', 'small_cnn', 'Backbone (--arch of ssl_ema.train).')
flags.DEFINE_list('image_shape', ['28', '28', '1'], 'Height, width, channels of the images.')
flags.DEFINE_integer('images', 10000, 'Images per timed pass.')
flags.DEFINE_list('batches', ['1024', '512', '256', '128', '64'],
                  'Batch sizes to time; the first is the baseline of the ratios.')
flags.DEFINE_integer('repeats', 3, 'Alternating repetitions; the median is reported.')
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        sys.exit(f'error: unexpected arguments {argv[1:]}; flags look like --name=value')
    if len(FLAGS.image_shape) != 3 or not all(v.isdigit() and int(v) > 0
                                              for v in FLAGS.image_shape):
        sys.exit(f'error: --image_shape={",".join(FLAGS.image_shape)} must be three positive '
                 'integers, e.g. 28,28,1')
    for name in ('images', 'repeats'):
        if FLAGS[name].value < 1:
            sys.exit(f'error: --{name}={FLAGS[name].value} must be at least 1')
    if not FLAGS.batches or not all(v.isdigit() and int(v) > 0 for v in FLAGS.batches):
        sys.exit(f'error: --batches={",".join(FLAGS.batches)} must be positive integers, '
                 'e.g. 1024,128')
    import numpy as np
    import tensorflow as tf
    from ssl_ema.base.errors import ConfigError
    from ssl_ema.base.machine import cpu_flags, cpu_model
    from ssl_ema.core import accuracy
    from ssl_ema.nn import backbones
    tf.get_logger().setLevel('ERROR')
    shape = tuple(int(v) for v in FLAGS.image_shape)
    try:
        model = backbones.build(FLAGS.arch, shape, 10)
    except ConfigError as e:
        sys.exit(f'error: {e}')
    x = np.random.default_rng(0).random((FLAGS.images, *shape), np.float32)
    scores = accuracy.make_scores(model, shape)
    sizes = {f'{b}': int(b) for b in FLAGS.batches}
    sizes[f'auto ({accuracy.inference_batch(shape)})'] = accuracy.inference_batch(shape)
    for size in set(sizes.values()):   # trace, and warm every size's kernels once
        accuracy.predictions(scores, x[:2 * size], size)
    print(f'CPU: {cpu_model()} ({cpu_flags()}); load average {os.getloadavg()[0]:.1f}; '
          f'TensorFlow {tf.__version__}')
    print(f'{FLAGS.arch}, {FLAGS.images} images of {"x".join(FLAGS.image_shape)}: median of '
          f'{FLAGS.repeats} alternating passes per batch size')
    times, predicted = {name: [] for name in sizes}, {}
    for _ in range(FLAGS.repeats):
        for name, size in sizes.items():
            wall, cpu = time.perf_counter(), time.process_time()
            predicted[name] = accuracy.predictions(scores, x, size)[0]
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    base = next(iter(sizes))
    base_cpu, base_wall = (statistics.median(t[i] for t in times[base]) for i in (0, 1))
    print(f'{"batch":<12} {"CPU-s":>7} {"wall s":>7} {"CPU ratio":>9} {"wall ratio":>10}  same '
          f'predictions as {base}')
    for name in sizes:
        cpu, wall = (statistics.median(t[i] for t in times[name]) for i in (0, 1))
        same = bool(np.array_equal(predicted[name], predicted[base]))
        print(f'{name:<12} {cpu:7.2f} {wall:7.2f} {cpu / base_cpu:9.2f} {wall / base_wall:10.2f}  '
              f'{"yes" if same else "NO"}')


if __name__ == '__main__':
    app.run(main)
