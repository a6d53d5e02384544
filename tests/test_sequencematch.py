"""SequenceMatch: its chain of divergences under FlexMatch's curriculum mask on hand-worked
values, sharpened from logits (not USB's softmax of probabilities)."""
import math

import numpy as np
import tensorflow as tf

from ssl_ema import algorithms
from ssl_ema.algorithms import Batch


def identity_student(x, training=False):
    """A 'model' whose logits are its inputs."""
    return x


def softmax(logits):
    e = np.exp(np.asarray(logits, np.float64))
    return e / e.sum(-1, keepdims=True)


def kl(p, q):
    return float((p * np.log(p / q)).sum())


def test_divergences_along_weak_medium_strong_under_the_curriculum_mask():
    algorithm = algorithms.ALGORITHMS['sequencematch'](confidence_threshold=.9, temperature=.5)
    # class 0 fully learnt (threshold .9 * 1 / (2 - 1)), class 1 not yet (threshold 0)
    state = {'selected': tf.fill([4], -1), 'beta': tf.constant([1., 0.])}
    weak = np.log([[.8, .2], [.3, .7]])   # image 0: class 0 at .8 < .9, out; image 1: class 1, in
    medium, strong = np.array([[5., 0.], [0., 0.]]), np.array([[5., 0.], [0., 1.]])
    batch = Batch(tf.constant([[2., 0.]]), tf.constant([0]),
                  tuple(tf.constant(v, tf.float32) for v in (weak, medium, strong)),
                  tf.constant(1.), tf.random.Generator.from_seed(0), state=state,
                  unlabeled_index=tf.constant([0, 1]))
    out = algorithm(identity_student, None, batch)
    assert float(out.metrics['mask']) == .5
    # p^(1/T) normalised: [.3, .7] -> [.09, .49] / .58 (softmax of probabilities would flatten)
    weak_target = np.array([.09, .49]) / .58
    np.testing.assert_allclose(softmax(weak[1] / .5), weak_target, rtol=1e-6)
    expected = {'pseudo_label': (math.log(1 + math.e) - 1) / 2,   # class 1 against [0, 1]
                'weak_medium': kl(weak_target, softmax(medium[1])) / 2,
                'medium_strong': kl(softmax(medium[1] / .5), softmax(strong[1])) / 2,
                'weak_strong': kl(weak_target, softmax(strong[1])) / 2}
    for key, value in expected.items():
        np.testing.assert_allclose(float(out.metrics[key]), value, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(float(out.unlabeled), sum(expected.values()), rtol=1e-5)
    # no prediction reached tau: the per-image record and the class rates stay
    np.testing.assert_array_equal(out.state['selected'], [-1, -1, -1, -1])
    np.testing.assert_allclose(out.state['beta'], [1., 0.])
