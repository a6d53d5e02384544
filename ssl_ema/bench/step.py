"""Training-step speed against two baselines: `python -m ssl_ema.bench_step`.

    python -m ssl_ema.bench_step --algorithms=mean_teacher,vat,fixmatch --arch=wrn28_2 \
        --batch=64 --uratio=1 --precisions=float32,mixed_bfloat16 --baselines=keras,anchors

For each algorithm it times the toolkit's real training step (`Trainer.train_step`: the
algorithm's loss, the optimizer step and the EMA update, compiled as in training) once per
--precisions entry, and in the same run the same computation built without the toolkit, the
baselines (--baselines):
- keras: a plain Keras 3 float32 step (stock layers, GradientTape, SGD, an EMA over every weight);
- anchors: the step as google-research/fixmatch builds it, a TF1 graph of WRN-D-K run in a
  tf.compat.v1.Session with fused batch norm, tf.train.ExponentialMovingAverage and its
  optimizer (`ssl_ema/bench/anchors.py`; wrnD_K only).
Variants are timed in turn, --repeats times (alternating, so a machine shared with other work
slows them alike), and the median of each is reported as steps/s, images/s (labeled + unlabeled
images per second, as the training log counts them) and its ratio to each baseline (ours /
baseline's). Every step sees the same fixed synthetic batch: the input pipeline is not measured
here (`python -m ssl_ema.data.bench` does that). `--profile_dir` also writes a TensorFlow profiler
trace of a few steps per variant (open it with TensorBoard's profile plugin).
"""
import dataclasses
import math
import os
import re
import statistics
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

flags.DEFINE_list('algorithms', ['mean_teacher', 'vat', 'fixmatch'], 'Algorithms to time.')
flags.DEFINE_string('arch', 'wrn28_2', 'Backbone (--arch of ssl_ema.train).')
flags.DEFINE_integer('batch', 64, 'Labeled images per step.')
flags.DEFINE_integer('uratio', 1, 'Unlabeled images per step = uratio * batch.')
flags.DEFINE_list('image_shape', ['32', '32', '1'], 'Height, width, channels of the images.')
flags.DEFINE_list('precisions', ['float32', 'mixed_bfloat16'],
                  'Toolkit variants to time (--precision of ssl_ema.train).')
flags.DEFINE_list('baselines', ['keras', 'anchors'],
                  'Baselines to time beside the toolkit: keras (a plain Keras 3 step), anchors '
                  '(the anchors\' TF1 graph construction; wrnD_K only, left out by default for '
                  'other archs).')
flags.DEFINE_list('hparams', [], 'name=value hyperparameters of the toolkit\'s algorithms (each '
                  'algorithm takes those it has), e.g. bn_passes=separate.')
flags.DEFINE_bool('jit_compile', False, 'Also time each toolkit variant with --jit_compile.')
flags.DEFINE_integer('steps', 10, 'Steps per timed repetition (after --warmup untimed ones).')
flags.DEFINE_integer('warmup', 3, 'Untimed steps before the first repetition (tracing).')
flags.DEFINE_integer('repeats', 3, 'Alternating repetitions; the median is reported.')
flags.DEFINE_string('profile_dir', None, 'If set, a profiler trace of 3 toolkit steps of each '
                    'variant is written under it.')
FLAGS = flags.FLAGS
NUM_CLASSES = 10


class FixedBatches:
    """The part of `ssl_ema.data.SSLData` the Trainer's step uses: one random batch, repeated."""

    def __init__(self, image_shape, seed=0):
        self.image_shape, self.num_classes = tuple(int(v) for v in image_shape), NUM_CLASSES
        self.rng = np.random.RandomState(seed)

    @property
    def mean(self):   # pixels of the run's units (custom backbones undo the standardisation)
        return np.full(self.image_shape[-1:], 127.5, np.float32)

    @property
    def std(self):
        return np.full(self.image_shape[-1:], 127.5, np.float32)

    def images(self, n):
        return self.rng.normal(0, 1, (n,) + self.image_shape).astype(np.float32)

    unlabeled_size = 50_000   # the pool size algorithms with per-image state are built for

    def train(self, batch, uratio, views, start_step=0, indices=False, share=None):
        import tensorflow as tf
        labeled = (self.images(batch), np.arange(batch) % NUM_CLASSES)
        unlabeled = tuple(self.images(batch * uratio) for _ in views)
        if indices:   # e.g. flexmatch: the images' places in the unlabeled pool
            unlabeled += (np.arange(batch * uratio, dtype=np.int64),)
        if share is not None:   # this input pipeline's rows, as SSLData.train(share=...)
            (first, rows), (u_first, u_rows) = share.rows(batch), share.rows(batch * uratio)
            labeled = tuple(t[first:first + rows] for t in labeled)
            unlabeled = tuple(t[u_first:u_first + u_rows] for t in unlabeled)
        return tf.data.Dataset.from_tensors((labeled, unlabeled)).repeat()

    def eval_arrays(self):
        return {}


def toolkit_step(algorithm_name, precision, jit_compile):
    """A `step()` running the Trainer's compiled step, and the Trainer."""
    from ssl_ema import algorithms
    from ssl_ema.base.config import TrainConfig
    from ssl_ema.core.loop import Trainer
    cfg = TrainConfig(algorithm=algorithm_name, arch=FLAGS.arch, batch=FLAGS.batch,
                      uratio=FLAGS.uratio, train_steps=10 ** 6, precision=precision,
                      jit_compile=jit_compile)
    cls = algorithms.ALGORITHMS[algorithm_name]
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    hparams = dict(item.split('=', 1) for item in FLAGS.hparams)
    parse = lambda t, v: v.lower() in ('1', 'true') if t is bool else t(v)  # noqa: E731
    algorithm = cls(**{k: parse(types[k], v) for k, v in hparams.items() if k in types})
    trainer = Trainer(cfg, algorithm, FixedBatches(FLAGS.image_shape), tempfile.mkdtemp())
    iterator = trainer.batches(0)
    return lambda: trainer.train_step(iterator)['loss/total'].numpy()


def plain_keras_step(algorithm_name):
    """The same computation as the toolkit's step for `algorithm_name`, written the way a Keras 3
    user would without the toolkit: stock layers in float32, one tf.function with GradientTape,
    SGD, the EMA teacher as a clone whose every weight is averaged after the step. Its
    hyperparameters are the algorithms' defaults; they do not change the cost."""
    import keras
    import tensorflow as tf

    from ssl_ema.nn import backbones
    student = backbones.build(FLAGS.arch, FixedBatches(FLAGS.image_shape).image_shape,
                              NUM_CLASSES, portable=True)
    teacher = keras.models.clone_model(student)
    teacher.set_weights(student.get_weights())
    optimizer = keras.optimizers.SGD(0.03, momentum=0.9, nesterov=True, weight_decay=5e-4)
    optimizer.build(student.trainable_variables)
    data = FixedBatches(FLAGS.image_shape)
    views = {'mean_teacher': 2, 'vat': 1, 'fixmatch': 2}[algorithm_name]
    batch = data.train(FLAGS.batch, FLAGS.uratio, range(views)).take(1).get_single_element()
    (x, y), unlabeled = batch
    xe = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    kl = keras.losses.KLDivergence()

    def unit(v):
        return v / (tf.norm(tf.reshape(v, [tf.shape(v)[0], -1]), axis=1)[:, None, None, None]
                    + 1e-12)

    def loss_fn():
        if algorithm_name == 'mean_teacher':
            u1, u2 = (u + 0.15 * tf.random.normal(tf.shape(u)) for u in unlabeled)
            logits_l, logits_u = tf.split(student(tf.concat([x, u1], 0), training=True),
                                          [len(x), len(u1)])
            target = tf.nn.softmax(teacher(u2, training=True))
            return xe(y, logits_l) + 50. * tf.reduce_mean(tf.square(tf.nn.softmax(logits_u)
                                                                     - target))
        if algorithm_name == 'fixmatch':
            weak, strong = unlabeled
            logits = student(tf.concat([x, weak, strong], 0), training=True)
            logits_l, logits_w, logits_s = tf.split(logits, [len(x), len(weak), len(strong)])
            p = tf.nn.softmax(tf.stop_gradient(logits_w))
            mask = tf.cast(tf.reduce_max(p, 1) >= 0.95, tf.float32)
            pseudo = tf.reduce_mean(mask * keras.losses.sparse_categorical_crossentropy(
                tf.argmax(p, 1), logits_s, from_logits=True))
            return xe(y, logits_l) + pseudo
        (u,) = unlabeled   # VAT: one power iteration, EMA target, entropy minimisation
        logits_l = student(x, training=True)
        logits_u = student(u, training=True)
        p = tf.nn.softmax(tf.stop_gradient(logits_u))
        d = tf.random.normal(tf.shape(u))
        with tf.GradientTape() as inner:
            inner.watch(d)
            p_hat = tf.nn.softmax(student(u + 1e-3 * unit(d), training=True))
            distance = kl(p, p_hat)
        r_adv = 6. * math.sqrt(math.prod(u.shape[1:]) / 3072) * unit(
            tf.stop_gradient(inner.gradient(distance, d)))
        target = tf.nn.softmax(teacher(u, training=False))
        consistency = kl(target, tf.nn.softmax(student(u + r_adv, training=True)))
        q = tf.nn.softmax(logits_u)
        entropy = -tf.reduce_mean(tf.reduce_sum(q * tf.nn.log_softmax(logits_u), 1))
        return xe(y, logits_l) + 0.3 * consistency + 0.06 * entropy

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, student.trainable_variables)
        optimizer.apply(grads, student.trainable_variables)
        for shadow, weight in zip(teacher.weights, student.weights):
            shadow.assign(0.999 * shadow + 0.001 * weight)
        return loss
    return lambda: step().numpy()


def steps_per_second(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def profile(step, name):
    import tensorflow as tf
    tf.profiler.experimental.start(f'{FLAGS.profile_dir}/{name}')
    for _ in range(3):
        step()
    tf.profiler.experimental.stop()


def anchors_step(algorithm_name):
    """The anchors' construction of the step (ssl_ema/bench/anchors.py) on the same fixed batch
    as the toolkit's."""
    import re

    from ssl_ema.bench.anchors import AnchorStep
    wrn = re.fullmatch(r'wrn(\d+)_(\d+)', FLAGS.arch)
    data = FixedBatches(FLAGS.image_shape)
    views = 1 if algorithm_name == 'vat' else 2
    images = (data.images(FLAGS.batch), np.arange(FLAGS.batch) % NUM_CLASSES,
              [data.images(FLAGS.batch * FLAGS.uratio) for _ in range(views)])
    return AnchorStep(algorithm_name, FLAGS.batch, FLAGS.uratio, data.image_shape, NUM_CLASSES,
                      int(wrn[1]), int(wrn[2]), images=images)


BASELINES = {'keras': ('plain Keras fp32', plain_keras_step),
             'anchors': ('anchors\' TF1 graph fp32', anchors_step)}


def bench(algorithm_name, log=print):
    baselines = [BASELINES[b][0] for b in FLAGS.baselines]
    variants = {BASELINES[b][0]: BASELINES[b][1](algorithm_name) for b in FLAGS.baselines}
    for precision in FLAGS.precisions:
        for jit in (False, True) if FLAGS.jit_compile else (False,):
            name = f'ssl_ema {precision}' + (' + XLA' if jit else '')
            variants[name] = toolkit_step(algorithm_name, precision, jit)
    for step in variants.values():
        for _ in range(FLAGS.warmup):
            step()
    rates = {name: [] for name in variants}
    for _ in range(FLAGS.repeats):
        for name, step in variants.items():   # alternating: noise on the machine hits all
            rates[name].append(steps_per_second(step, FLAGS.steps))
    if FLAGS.profile_dir:
        for name, step in variants.items():
            profile(step, f'{algorithm_name}.{re.sub(r"[^A-Za-z0-9_.]+", "_", name)}')
    images = FLAGS.batch * (1 + FLAGS.uratio)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    log(f'\n{algorithm_name}, {FLAGS.arch}, batch {FLAGS.batch} + {FLAGS.batch * FLAGS.uratio} '
        f'unlabeled, images {"x".join(FLAGS.image_shape)}: median of {FLAGS.repeats} alternating '
        f'repetitions of {FLAGS.steps} steps'
        + (f'; toolkit --hparams={",".join(FLAGS.hparams)}' if FLAGS.hparams else ''))
    log(f'{"variant":<28}{"steps/s":>9}{"images/s":>10}'
        + ''.join(f'{"x " + b:>10}' for b in FLAGS.baselines)
        + '   (each repetition)')
    for name, values in rates.items():
        log(f'{name:<28}{medians[name]:9.3f}{medians[name] * images:10.1f}'
            + ''.join(f'{medians[name] / medians[b]:10.2f}' for b in baselines) + '   '
            + ' '.join(f'{v:.3f}' for v in values))


def main(argv):
    if len(argv) > 1:
        sys.exit(f'error: unexpected arguments {argv[1:]}; flags look like --name=value')
    from ssl_ema.base.errors import ConfigError
    from ssl_ema.base.machine import cpu_flags, cpu_model
    try:
        for name in FLAGS.algorithms:
            if name not in ('mean_teacher', 'vat', 'fixmatch'):
                raise ConfigError(f'--algorithms={name}: the baselines exist for '
                                  'mean_teacher, vat and fixmatch')
        for item in FLAGS.hparams:
            if '=' not in item:
                raise ConfigError(f'--hparams={item} must look like name=value, e.g. '
                                  'bn_passes=separate')
        for name in FLAGS.baselines:
            if name not in BASELINES:
                raise ConfigError(f'--baselines={name} is unknown; valid: keras, anchors')
        if ('anchors' in FLAGS.baselines and not re.fullmatch(r'wrn\d+_\d+', FLAGS.arch)
                and not FLAGS['baselines'].present):   # the default: time what exists
            FLAGS.baselines = [b for b in FLAGS.baselines if b != 'anchors']
        if 'anchors' in FLAGS.baselines and not re.fullmatch(r'wrn\d+_\d+', FLAGS.arch):
            raise ConfigError(f'--arch={FLAGS.arch}: the anchors baseline is a wide ResNet '
                              '(wrnD_K, e.g. wrn28_2); use --baselines=keras')
        if len(FLAGS.image_shape) != 3 or not all(v.isdigit() for v in FLAGS.image_shape):
            raise ConfigError(f'--image_shape={",".join(FLAGS.image_shape)} must be three '
                              'positive integers, e.g. 32,32,1')
        import tensorflow as tf
        tf.get_logger().setLevel('ERROR')
        print(f'CPU: {cpu_model()} ({cpu_flags()}); load average {os.getloadavg()[0]:.1f}; '
              f'TensorFlow {tf.__version__}')
        for name in FLAGS.algorithms:
            bench(name)
    except ConfigError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    app.run(main)
