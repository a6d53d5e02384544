"""The algorithms beyond Mean Teacher and VAT: each learns on tiny digits with an unlabeled loss
that actually moves, and each one's flags reach --helpfull. Their math is in test_losses.py."""
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from ssl_ema import algorithms
from ssl_ema.nn import backbones, losses
from ssl_ema.algorithms import Batch
from ssl_ema.nn.backbones import call_keeping_statistics
from ssl_ema.core.ema import EMA
from ssl_ema.base.errors import ConfigError
from ssl_ema.core.loop import Trainer

NEW = ['pi_model', 'pseudo_label', 'ict', 'mixmatch', 'fixmatch', 'uda']


def logged_values(lines, key):
    return [float(line.split(f' {key}=')[1].split()[0]) for line in lines if f' {key}=' in line]


@pytest.mark.parametrize('name', NEW)
def test_algorithm_learns_on_tiny_digits(name, digits_data, tmp_path):
    cfg = tiny_config(algorithm=name, train_steps=200, eval_every_kimg=1.5625, log_every_steps=10,
                      warmup_fraction=0.2)
    # pseudo_label's own confidence would mask nearly every unlabeled image in so short a run
    overrides = {'pseudo_label': dict(confidence_threshold=0.8)}.get(name, {})
    logged = []
    trainer = Trainer(cfg, algorithms.ALGORITHMS[name](**overrides), digits_data, str(tmp_path))
    summary = trainer.train(log=logged.append)
    labeled = logged_values(logged, 'labeled')
    unlabeled = logged_values(logged, 'unlabeled')
    # the labeled loss falls (MixMatch's is on mixed-up labels, whose entropy is its floor)
    assert np.mean(labeled[-5:]) < (0.75 if name == 'mixmatch' else 0.5) * np.mean(labeled[:2]), labeled
    # the unlabeled loss is alive: positive and changing (USB's Mean Teacher's was always zero)
    assert max(unlabeled) > 0 and len(set(unlabeled)) > 5, unlabeled
    assert summary['ema']['test']['last'] > 60, summary                   # chance is 10%
    assert summary['raw']['test']['last'] > 60, summary


def test_mixmatch_guesses_from_k_views():
    assert algorithms.ALGORITHMS['mixmatch'](label_guess_views=3).views == ('weak',) * 3
    assert algorithms.ALGORITHMS['mixmatch']().views == ('weak', 'weak')


def test_uda_rejects_an_unknown_tsa_schedule():
    with pytest.raises(ConfigError, match='--tsa=cosine is unknown; valid: none, linear, log, exp'):
        algorithms.ALGORITHMS['uda'](tsa='cosine')


def test_helpfull_lists_each_algorithms_flags_with_defaults():
    text = subprocess.run([sys.executable, '-m', 'ssl_ema.train', '--helpfull'], capture_output=True,
                          text=True).stdout
    sections = {}   # module -> its part of the help text
    for part in text.split('\n\n'):
        head = part.strip().split('\n')[0]
        if head.startswith('ssl_ema.algorithms.'):
            sections[head[len('ssl_ema.algorithms.'):-1]] = ' '.join(part.split())
    for module, flag in [('ict', None), ('mixmatch', 'label_guess_views'), ('uda', 'tsa'),
                         ('mean_teacher', 'input_noise'), ('vat', 'vat_eps'), ('vat', 'vat_target'),
                         ('base', 'consistency_weight'), ('base', 'confidence_threshold'),
                         ('base', 'mixup_alpha'), ('base', 'temperature'),
                         ('crmatch', 'distance_weight'), ('shrinkmatch', 'shrink_weight'),
                         ('base', 'rotation_weight')]:
        if flag:
            assert f'--{flag}:' in sections[module], (module, flag)
    # a flag several algorithms share is listed once, under base, with every algorithm's default
    assert not any('--consistency_weight:' in v for k, v in sections.items() if k != 'base')
    for default in ['fixmatch 1.0', 'ict 100.0', 'mixmatch 75.0', 'pi_model 10.0', 'pseudo_label 1.0',
                    'uda 1.0', 'vat 0.3', 'mean_teacher 50.0', 'fixmatch 0.95', 'pseudo_label 0.95',
                    'uda 0.8', 'mixmatch 0.5', 'uda 0.4', 'ict 1.0', 'mixmatch 0.75',
                    'crmatch 1.0, darp 0.5, remixmatch 0.5', 'shrinkmatch 32',
                    "darp its base's"]:
        assert default in sections['base'], default


@pytest.mark.parametrize('name, setting, rule', [
    ('mixmatch', dict(temperature=0.), '--temperature=0.0 is invalid for --algorithm=mixmatch: '
     'it must be > 0'),
    ('mixmatch', dict(label_guess_views=0), 'must be >= 1'),
    ('fixmatch', dict(confidence_threshold=1.5), '--confidence_threshold=1.5 .* in \\[0, 1\\]'),
    ('vat', dict(vat_eps=0.), '--vat_eps=0.0 .* > 0'),
    ('mean_teacher', dict(input_noise=-1.), '--input_noise=-1.0 .* >= 0'),
    ('ict', dict(mixup_alpha=0.), '--mixup_alpha=0.0'),
    ('pi_model', dict(consistency_weight=-1.), '--consistency_weight=-1.0'),
])
def test_bad_hyperparameters_are_refused_by_name(name, setting, rule):
    with pytest.raises(ConfigError, match=rule):
        algorithms.ALGORITHMS[name](**setting)


def tiny_batch(views, seed=0):
    rng = tf.random.Generator.from_seed(seed)
    x = lambda n: tf.random.stateless_uniform((n, 8, 8, 1), [seed, n])   # noqa: E731
    unlabeled = tuple(x(8) + 0.01 * i for i in range(len(views)))
    return Batch(x(4), tf.constant([0, 1, 2, 3]), unlabeled, tf.constant(1.), rng, tf.constant(.5))


@pytest.mark.parametrize('name', sorted(algorithms.ALGORITHMS))
def test_no_gradient_reaches_the_teacher_and_it_stays_unchanged(name):
    """The EMA is changed only by its update: no loss term may train it or move its statistics."""
    algorithm = algorithms.ALGORITHMS[name]()
    student = backbones.build('small_cnn', (8, 8, 1), 10)
    teacher = EMA(student, 0.99)
    teacher.model.set_weights([w + 0.1 for w in student.get_weights()])   # a distinct teacher
    before = [np.array(w) for w in teacher.model.weights]
    batch = tiny_batch(algorithm.views)   # and what the newer algorithms ask for (state, ...)
    batch.state = algorithms.base.initial_state(algorithm, 10, 8, 4, feature_width=128)
    batch.unlabeled_index, batch.labeled_index = tf.range(8), tf.range(4)
    batch.labeled_views = tuple(batch.labeled_x + 0.02 * (i + 1)
                                for i in range(len(algorithm.labeled_views)))
    batch.heads = algorithms.base.with_heads(student, algorithm.heads) if algorithm.heads else None
    with tf.GradientTape(persistent=True) as tape:
        out = algorithm(student, teacher, batch)
        total = out.labeled + out.unlabeled
    assert all(g is None for g in tape.gradient(total, teacher.model.trainable_variables))
    assert all(g is not None for g in tape.gradient(total, student.trainable_variables))
    for b, w in zip(before, teacher.model.weights):
        np.testing.assert_array_equal(b, np.array(w))


def test_vat_power_iteration_differentiates_the_function_its_target_came_from(monkeypatch):
    """KL(p(x) || p(x + r)) has its minimum at r = 0 only if p(x) comes from the same function
    (same batch statistics) as the perturbed passes; otherwise Eq. 12's gradient is the mismatch's,
    not the curvature's (the bug of taking the clean logits from a labeled+unlabeled pass)."""
    seen = {}
    original = losses.vat_perturbation

    def spy(logits_fn, x, target_logits, noise, xi, eps, scale=1., resolution=0.):
        seen['gap'] = float(tf.reduce_max(tf.abs(logits_fn(x) - target_logits)))
        seen['scale'] = float(tf.reduce_max(tf.abs(target_logits)))
        return original(logits_fn, x, target_logits, noise, xi, eps, scale, resolution)

    monkeypatch.setattr(losses, 'vat_perturbation', spy)
    student = backbones.build('small_cnn', (8, 8, 1), 10)
    algorithms.ALGORITHMS['vat']()(student, EMA(student), tiny_batch(('weak',)))
    assert seen['gap'] < 1e-5 * max(1., seen['scale']), seen


def test_vat_default_xi_is_above_float32_rounding(digits_data):
    """Eq. 12's finite difference needs x + xi d to differ from x in float32. With the default
    xi the direction is stable (it barely changes with 10x smaller or larger xi); at the paper's
    1e-6 it is rounding noise, nearly orthogonal to that direction."""
    import keras
    keras.utils.set_random_seed(0)
    student = backbones.build('small_cnn', (8, 8, 1), 10)
    x = tf.constant(digits_data.eval_arrays()['test'][0][:64], tf.float32)
    noise = tf.random.stateless_normal(x.shape, [1, 2])
    f = lambda v: call_keeping_statistics(student, v)   # noqa: E731

    def direction(xi):
        r = losses.vat_perturbation(f, x, f(x), noise, xi, 1.)
        return tf.reshape(r, [x.shape[0], -1]).numpy()

    def cosine(a, b):   # mean over images (each direction has unit norm)
        return float(np.mean(np.sum(a * b, axis=1)))

    xi = algorithms.ALGORITHMS['vat']().vat_xi
    assert cosine(direction(xi), direction(xi / 10)) > 0.95
    assert cosine(direction(xi), direction(xi * 10)) > 0.95
    assert cosine(direction(xi), direction(1e-6)) < 0.5


@pytest.mark.parametrize('rounding, resolution', [('bfloat16', 2. ** -8), ('tf32', 2. ** -11)])
def test_vat_direction_survives_low_precision_inputs(rounding, resolution, digits_data):
    """bfloat16 (--precision=mixed_*) and TF32 (float32 convolutions on Ampere+ GPUs) round the
    model's inputs: x + xi d rounds to x and Eq. 12's finite difference returns rounding noise.
    With the step raised to what that precision resolves, the direction under rounded inputs is
    float32's (emulated here: the inputs are rounded, the rest computes in float32)."""
    import keras
    from ssl_ema.bench.gpu_check import cosine, round_to_bfloat16, round_to_tf32, vat_direction
    keras.utils.set_random_seed(0)
    student = backbones.build('small_cnn', (8, 8, 1), 10)
    x = tf.constant(digits_data.eval_arrays()['test'][0][:64], tf.float32)
    noise = tf.random.stateless_normal(x.shape, [1, 2])
    rounding = {'bfloat16': round_to_bfloat16, 'tf32': round_to_tf32}[rounding]
    xi = algorithms.ALGORITHMS['vat']().vat_xi
    float32 = vat_direction(student, x, noise, xi)
    assert cosine(vat_direction(student, x, noise, xi, rounding, resolution), float32) > 0.9
    # xi's own step under the rounding: noise (the fault)
    assert cosine(vat_direction(student, x, noise, xi, rounding), float32) < 0.8
    # float32 itself keeps xi's step: its resolution changes nothing
    np.testing.assert_allclose(vat_direction(student, x, noise, xi, resolution=2. ** -24),
                               float32, rtol=1e-5, atol=1e-6)


def test_fixmatch_without_the_students_weak_pass_trains_on_the_emas_labels_only():
    """--nostudent_weak_pass: the student's one pass holds labeled + strong images, and the loss
    is the cross-entropy of the strong view against the EMA's confident weak-view labels."""
    student = backbones.build('small_cnn', (8, 8, 1), 10)
    teacher = EMA(student, 0.99)
    teacher.model.set_weights([w + 0.1 for w in student.get_weights()])
    batch = tiny_batch(('weak', 'strong'))
    sizes = []

    def counted(x, training=False):
        sizes.append(int(x.shape[0]))
        return student(x, training=training)

    algorithm = algorithms.ALGORITHMS['fixmatch'](teacher='ema', student_weak_pass=False,
                                                  confidence_threshold=0.)
    out = algorithm(counted, teacher, batch)
    assert sizes == [4 + 8]                                   # labeled + strong, one pass
    weak, strong = batch.unlabeled
    logits = student(tf.concat([batch.labeled_x, strong], 0), training=True)
    want = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        tf.argmax(teacher(weak), 1), logits[4:]))
    np.testing.assert_allclose(float(out.unlabeled), float(want), rtol=1e-5)
    with pytest.raises(ConfigError, match='--nostudent_weak_pass needs --teacher=ema'):
        algorithms.ALGORITHMS['fixmatch'](student_weak_pass=False)
