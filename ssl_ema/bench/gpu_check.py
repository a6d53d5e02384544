"""What GPU arithmetic can break, checked on this machine: `python -m ssl_ema.bench.gpu_check`.

One table, one row per check, and a non-zero exit status if a row failed (docs/gpu.md):
- VAT's adversarial direction at xi and 10 xi under float32, and under inputs rounded to
  bfloat16 and to TF32's 10-bit mantissa (emulated: the rest computes in float32), as its cosine
  with float32's direction at xi; with a GPU, also under its real TF32 (TF32 on against off);
- each algorithm's training step under --jit_compile against the step without it (losses), and
  under --precision=mixed_bfloat16 against float32 (finite, close);
- two mirrored replicas against one device on the same global batch (weights), over two GPUs, or
  over two logical CPUs on a machine without a GPU.
Rows that need hardware this machine lacks print `skipped`. Digits and small_cnn throughout.
"""
import sys

import numpy as np
import tensorflow as tf

COSINE = 0.9     # VAT: smallest cosine with float32's direction that passes
STEP_RTOL = 1e-4  # --jit_compile: the losses of one step
# VAT's direction, a normalised finite-difference gradient, magnifies XLA's rounding, and on
# small_cnn an activation can cross a LeakyReLU's kink (its consistency 2e-4 apart on a CPU;
# tests/test_jit_compile.py compares on a backbone without kinks, at 1e-4).
STEP_RTOL_VAT = 1e-3
BF16_RTOL = 5e-2  # mixed_bfloat16: the losses of one step against float32's


def round_to_bfloat16(v):
    return tf.cast(tf.cast(v, tf.bfloat16), tf.float32)   # its gradient is the identity


def round_to_tf32(v, bits=10):
    """float32 rounded to a `bits`-bit mantissa (TF32's 10), to nearest even; the gradient passes
    as it does through the hardware's rounding of a convolution's inputs."""
    drop = 23 - bits
    i = tf.bitcast(v, tf.int32)
    half = (1 << (drop - 1)) - 1 + tf.bitwise.bitwise_and(tf.bitwise.right_shift(i, drop), 1)
    rounded = tf.bitcast(tf.bitwise.bitwise_and(i + half, ~((1 << drop) - 1)), tf.float32)
    return v + tf.stop_gradient(rounded - v)


def vat_direction(model, x, noise, xi, rounding=None, resolution=0.):
    """VAT's r_adv (eps 1) for the images `x`, their inputs rounded by `rounding`: [n, values]."""
    from ssl_ema.nn import losses
    from ssl_ema.nn.backbones import call_keeping_statistics

    def logits(v):
        return call_keeping_statistics(model, rounding(v) if rounding else v)
    r = losses.vat_perturbation(logits, x, logits(x), noise, xi, 1., resolution=resolution)
    return tf.reshape(r, [x.shape[0], -1]).numpy()


def cosine(a, b):
    """Mean over images of the cosine of two directions of unit norm each."""
    return float(np.mean(np.sum(a * b, axis=1)))


def vat_rows(data):
    import keras
    from ssl_ema import algorithms
    from ssl_ema.nn import backbones
    keras.utils.set_random_seed(0)
    model = backbones.build('small_cnn', data.image_shape, data.num_classes)
    x = tf.constant(data.eval_arrays()['test'][0][:64], tf.float32)
    noise = tf.random.stateless_normal(x.shape, [1, 2])
    xi = algorithms.ALGORITHMS['vat']().vat_xi
    reference = vat_direction(model, x, noise, xi)
    rows = []
    for name, rounding, resolution in (('float32', None, 0.),
                                       ('bfloat16 inputs (emulated)', round_to_bfloat16, 2. ** -8),
                                       ('TF32 inputs (emulated)', round_to_tf32, 2. ** -11)):
        for step in (1, 10):
            value = cosine(vat_direction(model, x, noise, step * xi, rounding, resolution),
                           reference)
            rows.append((f'VAT direction, {name}, {step:g} xi', f'cosine {value:.3f}',
                         value > COSINE))
    if not tf.config.list_physical_devices('GPU'):
        rows.append(('VAT direction, this GPU\'s TF32', 'skipped (no GPU)', None))
    else:
        from ssl_ema.nn import losses
        resolution = losses.compute_resolution(model)   # 2^-11 on an Ampere+ GPU with TF32 on
        tf.config.experimental.enable_tensor_float_32_execution(True)
        on = vat_direction(model, x, noise, xi, resolution=resolution)
        tf.config.experimental.enable_tensor_float_32_execution(False)
        off = vat_direction(model, x, noise, xi)
        tf.config.experimental.enable_tensor_float_32_execution(True)
        value = cosine(on, off)
        rows.append((f'VAT direction, this GPU\'s TF32 (resolution {resolution:.2g})',
                     f'cosine {value:.3f}', value > COSINE))
    return rows


def one_step(data, name, **settings):
    """The metrics of one training step of `name` on the run's first batch (a pure function of
    the seed), and the student's weights after it."""
    import tempfile
    from ssl_ema import algorithms
    from ssl_ema.base.config import TrainConfig
    from ssl_ema.core.loop import Trainer
    strategy = settings.pop('strategy', None)
    cfg = TrainConfig(algorithm=name, batch=16, uratio=2, train_steps=2, arch='small_cnn',
                      **settings)
    trainer = Trainer(cfg, algorithms.ALGORITHMS[name](), data, tempfile.mkdtemp(), strategy)
    metrics = {k: float(v) for k, v in trainer.train_step(trainer.batches(0)).items()}
    return metrics, [np.asarray(w) for w in trainer.student.weights]


def largest_difference(a: dict, b: dict, keys=None) -> float:
    """The largest relative difference of the metrics (`keys`: those only) of two steps."""
    keys = keys or a.keys()
    return max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-6) for k in keys)


def step_rows(data):
    from ssl_ema import algorithms
    rows = []
    for name in sorted(algorithms.ALGORITHMS):
        plain, _ = one_step(data, name)
        xla = largest_difference(plain, one_step(data, name, jit_compile=True)[0])
        rows.append((f'{name} step, --jit_compile', f'largest rel. diff {xla:.1e}',
                     xla < (STEP_RTOL_VAT if name == 'vat' else STEP_RTOL)))
        bf16, _ = one_step(data, name, precision='mixed_bfloat16')
        finite = all(np.isfinite(v) for v in bf16.values())
        low = largest_difference(plain, bf16, ['loss/labeled', 'loss/total'])
        rows.append((f'{name} step, --precision=mixed_bfloat16', f'largest rel. diff {low:.1e}',
                     finite and low < BF16_RTOL))
    return rows


def mirrored_row(data, strategy):
    if strategy is None:
        return [('two mirrored replicas = one device', 'skipped (one GPU)', None)]
    rows = []
    for name in ('fixmatch', 'flexmatch'):
        _, one = one_step(data, name)
        _, two = one_step(data, name, strategy=strategy, distribute='mirrored', cpu_devices=2)
        gap = max(float(np.max(np.abs(a - b))) for a, b in zip(one, two))
        rows.append((f'{name}: {strategy.num_replicas_in_sync} mirrored replicas = one device',
                     f'largest weight diff {gap:.1e}', gap < 2e-5))
    return rows


def main(argv=()):
    from ssl_ema import data as datasets
    from ssl_ema.base.config import TrainConfig
    from ssl_ema.core.cluster import make_strategy
    # Every GPU, or two logical CPUs without one (set before TensorFlow starts its devices).
    strategy = (None if len(tf.config.list_physical_devices('GPU')) == 1 else
                make_strategy(TrainConfig(distribute='mirrored', cpu_devices=2)))
    data = datasets.build('digits', labels=50, valid=200, seed=1)
    rows = vat_rows(data) + step_rows(data) + mirrored_row(data, strategy)
    width = max(len(row[0]) for row in rows)
    for check, value, passed in rows:
        status = 'skipped' if passed is None else ('ok' if passed else 'FAILED')
        print(f'{check:<{width}}  {value:<28} {status}')
    failed = [row[0] for row in rows if row[2] is False]
    if failed:
        print(f'{len(failed)} failed: ' + '; '.join(failed))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
