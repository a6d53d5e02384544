"""Input-pipeline throughput (images/s) per augmentation, against the training step it feeds.

    python -m ssl_ema.data.bench                 # synthetic 32x32x3 and Fashion-MNIST if present
    python -m ssl_ema.data.bench --steps=50 --train_step=false

For each data source it times the unlabeled stream of `SSLData` (gather, augment, normalise,
batch; tf.data with parallel map) with one view of each augmentation, and reports each as a ratio
to `none` (the same pipeline without augmentation, measured in the same run on the same machine),
so the figures compare across machines. It then times a FixMatch-shaped step stream (labeled weak
+ unlabeled weak and strong views) and, unless --train_step=false, one forward+backward+SGD step of
--arch on 32x32x3 images, and prints how many times faster the pipeline delivers than that step
consumes. Synthetic images are uniform noise: RandAugment's cost does not depend on content.
"""
import time

import numpy as np
from absl import app, flags

from ssl_ema.base.machine import cpu_model

flags.DEFINE_integer('steps', 30, 'Batches timed per measurement (after 3 warm-up batches).')
flags.DEFINE_integer('batch', 64, 'Labeled batch size; the unlabeled batch is batch * uratio.')
flags.DEFINE_integer('uratio', 7, 'Unlabeled images per labeled image in a step (FixMatch: 7).')
flags.DEFINE_bool('train_step', True, 'Also time a training step of --arch on 32x32x3 images.')
flags.DEFINE_string('arch', 'wrn28_2', 'Backbone whose training step the pipeline must outpace.')
flags.DEFINE_integer('train_batch', 64, 'Images per timed training step.')
flags.DEFINE_string('data_dir', None, 'Where Fashion-MNIST is cached (default: tfds data dir).')
FLAGS = flags.FLAGS


def images_per_second(dataset, images_per_batch: int, steps: int) -> float:
    """Steady-state rate: 3 untimed batches trace the graph; keep `steps` well above the few
    batches tf.data prefetches, or the figure includes work done during the warm-up."""
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return images_per_batch * steps / (time.perf_counter() - start)


def synthetic(n=50000, shape=(32, 32, 3), num_classes=10):
    from ssl_ema.data.datasets import Arrays
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, (n,) + shape).astype(np.uint8)
    y = (np.arange(n) % num_classes).astype(np.int64)
    return Arrays('synthetic', x, y, x[:100], y[:100], num_classes)


def bench_source(arrays, log):
    from ssl_ema.data.pipeline import SSLData
    from ssl_ema.data.splits import make_split
    data = SSLData(arrays, make_split(arrays.y_train, 250, 0, 1, arrays.num_classes), seed=1)
    unlabeled = FLAGS.batch * FLAGS.uratio
    rates = {}
    for view in ('none', 'weak', 'strong'):
        rates[view] = images_per_second(data.unlabeled(unlabeled, (view,)), unlabeled, FLAGS.steps)
    for view, rate in rates.items():
        log(f'  {view:<7} {rate:10.0f} images/s   {rate / rates["none"]:5.2f} x none')
    per_step = FLAGS.batch + 2 * unlabeled
    step_rate = images_per_second(data.train(FLAGS.batch, FLAGS.uratio, ('weak', 'strong')),
                                  per_step, FLAGS.steps)
    log(f'  step stream (labeled weak {FLAGS.batch} + unlabeled weak+strong 2x{unlabeled}): '
        f'{step_rate:.0f} images/s = {step_rate / per_step:.2f} steps/s')
    return step_rate


def train_step_rate(arch: str, batch: int, steps: int, shape=(32, 32, 3)) -> float:
    """Images/s of one forward+backward+SGD update of `arch` at `shape`, 10 classes."""
    import tensorflow as tf
    from ssl_ema.nn import backbones
    model = backbones.build(arch, tuple(shape), 10)
    optimizer = tf.keras.optimizers.SGD(0.01, momentum=0.9)
    x = tf.random.normal([batch, *shape])
    y = tf.random.uniform([batch], 0, 10, tf.int32)

    @tf.function(jit_compile=False)
    def step():
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss
    step().numpy()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.numpy()
    return batch * steps / (time.perf_counter() - start)


def main(argv):
    del argv
    import tensorflow as tf
    from ssl_ema.base.errors import DataError
    from ssl_ema.data.datasets import load
    log = print
    log(f'CPU: {cpu_model()}; TensorFlow {tf.__version__}; tf.data threads: default (AUTOTUNE)')
    log(f'unlabeled batch {FLAGS.batch * FLAGS.uratio}, {FLAGS.steps} batches per figure')
    log('synthetic 32x32x3 (CIFAR-10 shape), 50,000 images:')
    step_rate = bench_source(synthetic(), log)
    try:
        fashion = load('fashion_mnist', FLAGS.data_dir, download=False)
        log('fashion_mnist 28x28x1, 60,000 images:')
        bench_source(fashion, log)
    except DataError as e:
        log(f'fashion_mnist skipped: {e}')
    if FLAGS.train_step:
        rate = train_step_rate(FLAGS.arch, FLAGS.train_batch, max(2, FLAGS.steps // 10))
        log(f'training step {FLAGS.arch} (batch {FLAGS.train_batch}, forward+backward+SGD): '
            f'{rate:.0f} images/s')
        log(f'pipeline delivers {step_rate / rate:.1f}x what the {FLAGS.arch} step consumes '
            f'(32x32x3 step stream vs training step)')


if __name__ == '__main__':
    app.run(main)
