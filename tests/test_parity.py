"""Parity with the anchors (google-research/fixmatch): one step of the real Trainer with the
published flags (runs/protocols/cifar10.flags + runs/algorithms/<algorithm>.flags) gives the
weights that the anchors' update rule gives, written out here independently: their loss (the
passes that move batch norm, the linear ramp, VAT's KL direction and epsilon in [-1, 1] pixels),
L2 weight decay through TF1's Nesterov MomentumOptimizer, or TF1's Adam then decoupled decay.

A tiny WRN (wrn10_1, biases as the anchors) on 8x8 digits keeps it to seconds.
"""
import dataclasses
import math
import os
import typing

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from ssl_ema import algorithms, data
from ssl_ema.nn import draws
from ssl_ema.nn.backbones import call_keeping_statistics
from ssl_ema.base.config import TrainConfig
from ssl_ema.core.loop import Trainer

RUNS = os.path.join(os.path.dirname(__file__), '..', 'runs')
TOTAL, STEP = 100, 20        # ramp at step 20: linear 0.5 (the anchors), sigmoid 0.29
TINY = dict(dataset='digits', valid=200, labels=50, arch='wrn10_1', batch=4, uratio=1,
            train_steps=TOTAL)


def published(algorithm):
    """TrainConfig and algorithm from the published flagfiles, made tiny by TINY."""
    values = {}
    for path in ('protocols/cifar10.flags', f'algorithms/{algorithm}.flags'):
        with open(os.path.join(RUNS, path)) as f:
            for line in f:
                line = line.strip()
                if not line.startswith('--'):
                    continue
                name, has_value, value = line[2:].partition('=')
                if not has_value:
                    name, value = (name[2:], False) if name.startswith('no') else (name, True)
                values[name] = value
    cls = algorithms.ALGORITHMS[algorithm]

    def typed(fields, hints):
        return {f.name: hints[f.name](values[f.name]) if not isinstance(values[f.name], bool)
                else values[f.name] for f in fields if f.name in values}
    cfg_values = typed(dataclasses.fields(TrainConfig), {
        k: typing.get_args(t)[0] if typing.get_origin(t) is typing.Union else t
        for k, t in typing.get_type_hints(TrainConfig).items()})
    cfg = TrainConfig(**{**cfg_values, **TINY, 'algorithm': algorithm})
    return cfg, cls(**typed(dataclasses.fields(cls), typing.get_type_hints(cls)))


@pytest.fixture(scope='module')
def pm1_digits():
    return data.build('digits', labels=50, valid=200, seed=1, input_norm='plus_minus_one')


def fixed_batch(dataset, views):
    x, y = dataset.eval_arrays()['valid']
    labeled = tf.constant(x[:4]), tf.constant(y[:4])
    u = tf.constant(x[4:8])
    unlabeled = tuple(tf.roll(u, i, axis=2) for i in range(len(views)))   # distinct views
    return labeled, unlabeled


def make_trainer(cfg, algorithm, dataset, tmp_path, step):
    trainer = Trainer(cfg, algorithm, dataset, str(tmp_path))
    trainer.step.assign(step)
    if cfg.optimizer == 'sgd':   # the lr schedule reads the optimizer's step
        trainer.optimizer.iterations.assign(step)   # Adam stays at its first update
    return trainer


def one_step(trainer, batch):
    """One real training step on `batch`; returns the state before it."""
    before = {'student': [w.numpy() for w in trainer.student.weights],
              'teacher': [w.numpy() for w in trainer.ema.model.weights],
              'rng': np.array(trainer.rng.state)}
    trainer.train_step(iter(tf.data.Dataset.from_tensors(batch)))
    return before


# ---- the anchors' rule, independently ----------------------------------------------------------
class Reference:
    """A copy of the student (and teacher) at `before`, trained by the anchors' rule."""

    def __init__(self, trainer, before):
        self.model = keras.models.clone_model(trainer.student)
        self.model.set_weights(before['student'])
        self.teacher = keras.models.clone_model(trainer.student)
        self.teacher.set_weights(before['teacher'])
        self.kernels = [v for v in self.model.trainable_variables if 'kernel' in v.path]

    def moving(self, x):
        """A training-mode pass whose batch-norm updates are kept (the anchors' first pass)."""
        return self.model(x, training=True)

    def still(self, model, x):
        """A training-mode pass whose batch-norm updates are dropped (the later passes)."""
        saved = [v.numpy() for v in model.non_trainable_weights]
        out = model(x, training=True)
        for v, s in zip(model.non_trainable_weights, saved):
            v.assign(s)
        return out

    def l2(self):
        return sum(tf.reduce_sum(tf.square(v)) / 2 for v in self.kernels)

    def sgd_nesterov_step(self, tape, loss, lr):
        """tf.compat.v1.train.MomentumOptimizer(lr, 0.9, use_nesterov=True), first update:
        accum = 0.9 * 0 + g; var -= lr * (g + 0.9 * accum)."""
        grads = tape.gradient(loss, self.model.trainable_variables)
        for v, g in zip(self.model.trainable_variables, grads):
            accum = g
            v.assign(v - lr * (g + 0.9 * accum))

    def adam_then_decay_step(self, tape, loss, lr, wd):
        """tf.compat.v1.train.AdamOptimizer(lr) (beta1 0.9, beta2 0.999, epsilon 1e-8), first
        update, then the anchors' post-op kernel *= 1 - wd * lr (vat.py, ict.py)."""
        grads = tape.gradient(loss, self.model.trainable_variables)
        lr_t = lr * math.sqrt(1 - 0.999) / (1 - 0.9)
        for v, g in zip(self.model.trainable_variables, grads):
            m, s = 0.1 * g, 0.001 * tf.square(g)
            v.assign(v - lr_t * m / (tf.sqrt(s) + 1e-8))
        for v in self.kernels:
            v.assign(v * (1 - wd * lr))
        # Where the gradient is ~0 (e.g. the bias of a convolution followed by batch norm has
        # none in exact arithmetic), Adam's g / |g| turns float32 rounding noise into an
        # lr-sized step in any implementation, the anchors' included: those entries can only be
        # compared in size. Returns {path: mask of such entries}.
        return {v.path: np.abs(np.array(g)) < 1e-6
                for v, g in zip(self.model.trainable_variables, grads)}


def cosine_lr(cfg, step):
    return cfg.lr * math.cos(7 * math.pi * step / (16 * TOTAL))


def linear_ramp(cfg, step):
    return min(1., step / (cfg.warmup_fraction * TOTAL))


def xe(labels, logits):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


def assert_same_step(trainer, before, ref, cfg, noise=None):
    for old, got, want in zip(before['student'], trainer.student.weights, ref.model.weights):
        got, want, path = got.numpy(), want.numpy(), got.path
        if noise and path in noise:   # Adam on a ~0 gradient: a step of at most lr
            mask = noise[path]
            assert np.all(np.abs(got - old)[mask] <= 1.01 * cfg.lr), path
            got, want = got[~mask], want[~mask]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-7, err_msg=path)
    # The EMA (0.999, no warm-up in the protocol) of the trainable weights follows the new ones.
    student = {v.path: v.numpy() for v in ref.model.trainable_variables}
    for old, v in zip(before['teacher'], trainer.ema.model.weights):
        if v.path in student and not (noise and noise[v.path].any()):
            want = cfg.ema_decay * old + (1 - cfg.ema_decay) * student[v.path]
            np.testing.assert_allclose(v.numpy(), want, rtol=1e-5, atol=5e-7, err_msg=v.path)


# ---- the tests ---------------------------------------------------------------------------------
def test_supervised_matches_the_anchors_sgd_step(pm1_digits, tmp_path):
    cfg, algorithm = published('supervised')
    (lx, ly), _ = fixed_batch(pm1_digits, ())
    trainer = make_trainer(cfg, algorithm, pm1_digits, tmp_path, STEP)
    before = one_step(trainer, ((lx, ly), ()))
    ref = Reference(trainer, before)
    with tf.GradientTape() as tape:
        loss = xe(ly, ref.moving(lx)) + cfg.weight_decay * ref.l2()
    ref.sgd_nesterov_step(tape, loss, cosine_lr(cfg, STEP))
    assert_same_step(trainer, before, ref, cfg)


def test_fixmatch_matches_the_anchors_sgd_step(pm1_digits, tmp_path):
    cfg, algorithm = published('fixmatch')
    (lx, ly), (weak, strong) = fixed_batch(pm1_digits, algorithm.views)
    trainer = make_trainer(cfg, algorithm, pm1_digits, tmp_path, STEP)
    # At initialisation no prediction reaches 0.95: a threshold at the median exercises the mask.
    logits = call_keeping_statistics(trainer.student, tf.concat([lx, weak, strong], 0))
    threshold = float(np.median(np.max(tf.nn.softmax(logits[4:8]), -1)))
    trainer.algorithm = dataclasses.replace(algorithm, confidence_threshold=threshold)
    before = one_step(trainer, ((lx, ly), (weak, strong)))
    ref = Reference(trainer, before)
    with tf.GradientTape() as tape:
        logits = ref.moving(tf.concat([lx, weak, strong], 0))   # one pass, all move batch norm
        logits_x, logits_weak, logits_strong = logits[:4], logits[4:8], logits[8:]
        p = tf.stop_gradient(tf.nn.softmax(logits_weak))
        mask = tf.cast(tf.reduce_max(p, 1) >= threshold, tf.float32)
        xeu = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            tf.argmax(p, 1), logits_strong) * mask)
        loss = xe(ly, logits_x) + 1. * xeu + cfg.weight_decay * ref.l2()
    assert 0 < float(tf.reduce_sum(mask)) < 4
    ref.sgd_nesterov_step(tape, loss, cosine_lr(cfg, STEP))
    assert_same_step(trainer, before, ref, cfg)


def test_mean_teacher_matches_the_anchors_sgd_step(pm1_digits, tmp_path):
    cfg, algorithm = published('mean_teacher')
    (lx, ly), (y1, y2) = fixed_batch(pm1_digits, algorithm.views)
    trainer = make_trainer(cfg, algorithm, pm1_digits, tmp_path, STEP)
    # The anchors' teacher sees y_1, the student y_2; our views are (student, teacher): two
    # exchangeable random augmentations, so only their names differ.
    before = one_step(trainer, ((lx, ly), (y2, y1)))
    ref = Reference(trainer, before)
    with tf.GradientTape() as tape:
        logits_x = ref.moving(lx)   # "Take only first call to update batch norm."
        teacher = tf.stop_gradient(tf.nn.softmax(ref.still(ref.teacher, y1)))
        student = tf.nn.softmax(ref.still(ref.model, y2))
        loss_mt = tf.reduce_mean(tf.square(teacher - student))
        loss = (xe(ly, logits_x) + loss_mt * linear_ramp(cfg, STEP) * 50.
                + cfg.weight_decay * ref.l2())
    ref.sgd_nesterov_step(tape, loss, cosine_lr(cfg, STEP))
    assert_same_step(trainer, before, ref, cfg)


def test_vat_matches_the_anchors_adam_step(pm1_digits, tmp_path):
    cfg, algorithm = published('vat')
    (lx, ly), (y,) = fixed_batch(pm1_digits, algorithm.views)
    trainer = make_trainer(cfg, algorithm, pm1_digits, tmp_path, STEP)
    before = one_step(trainer, ((lx, ly), (y,)))
    ref = Reference(trainer, before)
    rng = tf.random.Generator.from_state(before['rng'], 'philox')
    d = draws.normal(rng, tf.shape(y))   # the trainer's draw: same generator state, same call

    def normalize(v):   # the VAT authors' get_normalized_vector
        v = v / (1e-12 + tf.reduce_max(tf.abs(v), [1, 2, 3], keepdims=True))
        return v / tf.sqrt(1e-6 + tf.reduce_sum(tf.square(v), [1, 2, 3], keepdims=True))

    def kl(p_logits, q_logits):
        p = tf.nn.softmax(p_logits)
        return tf.reduce_sum(p * (tf.nn.log_softmax(p_logits) - tf.nn.log_softmax(q_logits)), 1)

    # Pixels are in [-1, 1] here (--input_norm=plus_minus_one), as the anchors': eps needs no
    # conversion, only the sqrt(values / 3072) of this toolkit for 8x8x1 images.
    eps = 6. * math.sqrt(64 / 3072)
    with tf.GradientTape() as tape:
        logits_x = ref.moving(lx)   # "Take only first call to update batch norm."
        logits_y = ref.still(ref.model, y)
        with tf.GradientTape() as inner:
            r = algorithm.vat_xi * normalize(d)
            inner.watch(r)
            dist = tf.reduce_mean(kl(tf.stop_gradient(logits_y), ref.still(ref.model, y + r)))
        delta = tf.stop_gradient(eps * normalize(inner.gradient(dist, r)))
        logits_student = ref.still(ref.model, y + delta)
        loss_vat = tf.reduce_mean(kl(logits_student, tf.stop_gradient(logits_y)))  # student first
        p = tf.nn.softmax(logits_y)
        entropy = tf.reduce_mean(-tf.reduce_sum(p * tf.nn.log_softmax(logits_y), 1))
        loss = xe(ly, logits_x) + loss_vat * linear_ramp(cfg, STEP) * 0.3 + 0.06 * entropy
    noise = ref.adam_then_decay_step(tape, loss, cfg.lr, cfg.weight_decay)
    kernels = [path for path, mask in noise.items() if path.endswith('kernel')]
    assert all(noise[path].mean() < 0.01 for path in kernels)   # compared almost entirely
    assert_same_step(trainer, before, ref, cfg, noise)


# ---- each flag on hand-worked values -----------------------------------------------------------
class NoLoss(algorithms.Algorithm):
    """A zero loss with a zero gradient: only weight decay moves the weights."""
    name, views = 'no_loss', ()

    def __call__(self, student, teacher, batch):
        zero = 0. * tf.reduce_sum(student(batch.labeled_x, training=True))
        return algorithms.Losses(zero, zero)


def kernel_factor_after(steps, lr, wd, decay_type, momentum=0.9):
    """What a kernel is multiplied by after `steps` steps of zero loss gradient, by hand."""
    if decay_type == 'decoupled':
        return (1. - lr * wd) ** steps
    v, accum = 1., 0.   # the anchors' L2 through tf.compat.v1 Nesterov momentum
    for _ in range(steps):
        g = wd * v
        accum = momentum * accum + g
        v -= lr * (g + momentum * accum)
    return v


def test_kernel_factors_by_hand():
    # One step: decoupled 1 - lr wd; L2 1 - lr wd (1 + m) (Nesterov's look-ahead).
    assert kernel_factor_after(1, .1, .01, 'l2') == pytest.approx(1 - .001 * 1.9)
    assert kernel_factor_after(1, .1, .01, 'decoupled') == pytest.approx(1 - .001)
    # The figures: 1000 steps at lr 0.03, wd 5e-4 keep 0.985 (decoupled), 0.862 (L2).
    assert kernel_factor_after(1000, .03, 5e-4, 'decoupled') == pytest.approx(0.985, abs=5e-4)
    assert kernel_factor_after(1000, .03, 5e-4, 'l2') == pytest.approx(0.862, abs=5e-4)


@pytest.mark.parametrize('decay_type', ['l2', 'decoupled'])
def test_weight_decay_after_n_steps(decay_type, digits_data, tmp_path):
    cfg = tiny_config(lr=0.1, lr_decay='constant', weight_decay=0.01, arch='wrn10_1',
                      weight_decay_type=decay_type, wrn_conv_bias=True)
    trainer = Trainer(cfg, NoLoss(), digits_data, str(tmp_path))
    before = {v.path: v.numpy() for v in trainer.student.trainable_variables}
    images = tf.constant(digits_data.eval_arrays()['valid'][0][:4])
    batch = ((images, tf.constant([0, 1, 2, 3])), ())
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    for _ in range(20):
        trainer.train_step(iterator)
    factor = kernel_factor_after(20, .1, .01, decay_type)
    assert factor == pytest.approx({'l2': 0.8759, 'decoupled': 0.9802}[decay_type], abs=1e-4)
    for v in trainer.student.trainable_variables:
        want = before[v.path] * (factor if v.path.endswith('kernel') else 1.)   # only kernels
        np.testing.assert_allclose(v.numpy(), want, rtol=1e-5, atol=1e-7, err_msg=v.path)


def test_input_norm_and_pixel_scale(digits_data, pm1_digits):
    x = tf.constant([[[[0.], [127.5], [255.]]]])
    np.testing.assert_allclose(pm1_digits.normalize(x), [[[[-1.], [0.], [1.]]]])
    np.testing.assert_allclose(pm1_digits.pixel_scale, [1.])
    # Standardised: one [-1, 1] unit (127.5 grey levels) is 127.5 / std model units.
    step = digits_data.normalize(x)[0, 0, 1] - digits_data.normalize(x)[0, 0, 0]
    np.testing.assert_allclose(step, digits_data.pixel_scale, rtol=1e-6)
    assert 1. < float(digits_data.pixel_scale[0]) < 3.


def test_wrn_conv_bias_flag():
    from ssl_ema.nn import backbones
    from ssl_ema.core.optimization import decayed_variables
    plain, biased = (backbones.build('wrn10_1', (8, 8, 1), 10, conv_bias=b) for b in (False, True))
    conv_biases = [v for v in biased.trainable_variables if 'conv2d' in v.path and 'bias' in v.path]
    # wrn10_1: the stem, two per block (one block per scale), two 1x1 shortcuts: 9 convolutions.
    assert len(conv_biases) == 9 and not any(np.any(v.numpy()) for v in conv_biases)  # zeros
    assert len(biased.trainable_variables) == len(plain.trainable_variables) + 9
    decayed = decayed_variables(biased)   # the same kernels as without biases, no bias
    assert [v.shape for v in decayed] == [v.shape for v in decayed_variables(plain)]
    assert all(v.path.endswith('kernel') for v in decayed)


def test_ramp_up_is_a_flag_with_each_papers_default():
    defaults = {name: cls().ramp_up for name, cls in algorithms.ALGORITHMS.items()}
    assert defaults == {'fixmatch': 'none', 'uda': 'none', 'pi_model': 'sigmoid',
                        'mean_teacher': 'sigmoid', 'ict': 'sigmoid', 'vat': 'linear',
                        'pseudo_label': 'linear', 'mixmatch': 'linear', 'supervised': 'linear',
                        # the newer algorithms: FixMatch's constant weight, ReMixMatch the
                        # anchors' linear ramp (remixmatch_no_cta.py)
                        'flexmatch': 'none', 'freematch': 'none', 'softmatch': 'none',
                        'remixmatch': 'linear', 'adamatch': 'cosine',   # AdaMatch's mu(t)
                        'dash': 'none', 'simmatch': 'none', 'comatch': 'none',
                        'defixmatch': 'none', 'sequencematch': 'none', 'crmatch': 'none',
                        'shrinkmatch': 'none', 'openmatch': 'none', 'iomatch': 'none',
                        # on FixMatch: its constant weight (USB's classic_cv_imb)
                        'abc': 'none', 'darp': 'none', 'crest': 'none', 'crest_plus': 'none',
                        'daso': 'none', 'cossl': 'none', 'saw': 'none', 'debiaspl': 'none',
                        'adsh': 'none', 'acr': 'none'}
    assert algorithms.ALGORITHMS['mean_teacher'](ramp_up='linear').ramp_up == 'linear'
    assert algorithms.ALGORITHMS['remixmatch'](ramp_up='sigmoid').ramp_up == 'sigmoid'
    from ssl_ema.base.errors import ConfigError
    with pytest.raises(ConfigError, match='--ramp_up=step is invalid for --algorithm=pi_model'):
        algorithms.ALGORITHMS['pi_model'](ramp_up='step')
