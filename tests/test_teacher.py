"""--teacher=student|ema: with ema, the targets and pseudo-labels of every algorithm that makes
them from a prediction come from the EMA model (in inference mode), not from the student."""
import pytest
import tensorflow as tf

from ssl_ema import algorithms
from ssl_ema.nn import backbones, losses
from ssl_ema.algorithms import base
from ssl_ema.core.ema import EMA
from test_new_algorithms import random_batch

TEACHING = sorted(name for name, cls in algorithms.ALGORITHMS.items()
                  if 'teacher' in cls.__dataclass_fields__)


def confident_teacher(student, label):
    """An EMA model predicting `label` for every image, with near certainty."""
    teacher = EMA(student)
    kernel, bias = teacher.model.layers[-1].weights
    kernel.assign(tf.zeros_like(kernel))
    bias.assign(20. * tf.one_hot(label, bias.shape[0]))
    return teacher


def test_every_target_making_algorithm_has_the_teacher_flag():
    assert set(TEACHING) == {'pi_model', 'pseudo_label', 'mixmatch', 'fixmatch', 'uda',
                             'flexmatch', 'freematch', 'softmatch', 'remixmatch', 'adamatch',
                             'dash', 'simmatch', 'comatch', 'defixmatch', 'sequencematch',
                             'crmatch', 'shrinkmatch', 'darp', 'openmatch', 'iomatch',
                             'crest', 'crest_plus', 'daso', 'saw', 'debiaspl', 'adsh'}


@pytest.mark.parametrize('name', TEACHING)
def test_teacher_ema_makes_the_targets(name):
    """Two EMA teachers predicting different classes give different unlabeled losses with
    --teacher=ema (the targets are theirs), and the same one with --teacher=student. The student
    leans to class 3, so that targets of class 3 and of class 7 cost it clearly different losses
    (a student at chance would make the gap the luck of its random weights)."""
    tf.keras.utils.set_random_seed(0)
    student = backbones.build('small_cnn', (8, 8, 1), 10)
    student.layers[-1].weights[1].assign(2. * tf.one_hot(3, 10))
    heads = base.with_heads(student, algorithms.ALGORITHMS[name]().heads or {'rotation': 4})
    teachers = [confident_teacher(student, 3), confident_teacher(student, 7)]
    with_ema = algorithms.ALGORITHMS[name](teacher='ema')
    if base.averages_carry_heads(with_ema):   # as the Trainer (core/loop.py)
        for teacher in teachers:
            teacher.carry_heads(heads, with_ema.heads)

    def unlabeled_loss(teacher_flag, teacher):
        algorithm = algorithms.ALGORITHMS[name](teacher=teacher_flag)
        batch = random_batch(algorithm, heads=heads)
        if 'inlier' in batch.state:   # OpenMatch: pseudo-labels only on selected inliers
            batch.state['inlier'] = tf.ones_like(batch.state['inlier'])
        if 'daso_distribution' in batch.state:   # DASO: classes 3 and 7 take linear labels
            batch.state['daso_distribution'] = tf.one_hot(0, 10)
        return float(algorithm(student, teacher, batch).unlabeled)
    ema = [unlabeled_loss('ema', t) for t in teachers]
    own = [unlabeled_loss('student', t) for t in teachers]
    assert abs(ema[0] - ema[1]) > 1e-3 * max(1., abs(ema[0])), ema
    assert own[0] == pytest.approx(own[1], rel=1e-5), own


def test_fixmatch_pseudo_labels_are_the_ema_models_class():
    student = backbones.build('small_cnn', (8, 8, 1), 10)
    algorithm = algorithms.ALGORITHMS['fixmatch'](teacher='ema')
    batch = random_batch(algorithm)
    out = algorithm(student, confident_teacher(student, 3), batch)
    # the student's logits on the strong view, from the same joint training-mode pass
    strong = student(tf.concat((batch.labeled_x,) + batch.unlabeled, 0), training=True)[-8:]
    assert float(out.metrics['mask']) == 1.
    expected = float(losses.cross_entropy(tf.fill([8], 3), strong))
    assert float(out.metrics['pseudo_label']) == pytest.approx(expected, rel=1e-4)
