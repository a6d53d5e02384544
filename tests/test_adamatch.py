"""AdaMatch: its warm-up, relative threshold and distribution alignment on hand-worked values,
learning on tiny digits, and resuming."""
import math

import numpy as np
import tensorflow as tf

from conftest import check_learns, check_resumes, tiny_config
from ssl_ema import algorithms
from ssl_ema.nn import losses
from ssl_ema.algorithms import Batch, base


def test_cosine_warm_up_is_the_papers_mu():
    """mu(t) = 1/2 - cos(min(pi, 2 pi t / T)) / 2 (Sec. 3.4) over the first half of training."""
    progress = tf.constant([0., .1, .25, .5, .9])
    expected = [0., 0.5 - 0.5 * math.cos(0.2 * math.pi), 0.5, 1., 1.]
    np.testing.assert_allclose(losses.cosine_rampup(progress, 0.5), expected, atol=1e-6)
    assert float(losses.RAMPUPS['cosine'](tf.constant(0.), 0.)) == 1.


def test_relative_threshold_is_tau_times_the_mean_labeled_confidence():
    labeled = tf.constant([[0.8, 0.2], [0.4, 0.6]])   # largest probabilities 0.8 and 0.6
    np.testing.assert_allclose(float(losses.relative_threshold(labeled, 0.9)), 0.63, rtol=1e-6)


def identity_student(x, training=False):
    """A 'model' whose logits are its inputs: every quantity can be worked by hand."""
    return x


def probs_batch(state, weak_probs, labeled_probs=((0.8, 0.2), (0.4, 0.6))):
    weak = tf.math.log(tf.constant(weak_probs, tf.float32))
    return Batch(tf.math.log(tf.constant(labeled_probs, tf.float32)), tf.constant([0, 1]),
                 (weak, weak), tf.constant(1.), tf.random.Generator.from_seed(0),
                 tf.constant(.5), state=state)


def test_alignment_and_threshold_on_a_hand_worked_batch():
    algorithm = algorithms.ALGORITHMS['adamatch'](state_momentum=0.5, prediction_window=2)
    state = base.initial_state(algorithm, 2, 4)   # p~_L = 1/2, a window of two batch means 1/2
    # Labeled predictions [.8, .2], [.4, .6]: p~_L = .5 * 1/2 + .5 * [.6, .4] = [.55, .45], and
    # c_tau = .9 * mean(.8, .6) = .63. Unlabeled [.6, .4], [.4, .6]: mean [.5, .5], so p~_U stays
    # [.5, .5]; aligned by [1.1, .9]: [.66, .36] / 1.02 and [.44, .54] / .98.
    out = algorithm(identity_student, None, probs_batch(state, [[.6, .4], [.4, .6]]))
    np.testing.assert_allclose(out.state['p_labeled'], [.55, .45], rtol=1e-6)
    np.testing.assert_allclose(out.state['p_unlabeled'], [[.5, .5], [.5, .5]], rtol=1e-6)
    np.testing.assert_allclose(float(out.metrics['threshold']), .63, rtol=1e-6)
    # The first image counts only once aligned (.6 < .63 <= .66 / 1.02 = .647); the second,
    # .54 / .98 = .551, does not.
    assert float(out.metrics['mask']) == .5
    # Its hard pseudo-label 0 trains the strong view (here the same logits): -log .6 over 2 images.
    np.testing.assert_allclose(float(out.unlabeled), -math.log(.6) / 2, rtol=1e-5)
    # Step 2: unlabeled mean [.8, .2] enters the window (oldest out), p~_U = [.65, .35]; the
    # labeled predictions [.9, .1] twice: p~_L = .5 * [.55, .45] + .5 * [.9, .1] = [.725, .275].
    out = algorithm(identity_student, None, probs_batch(out.state, [[.9, .1], [.7, .3]],
                                                        ((.9, .1), (.9, .1))))
    np.testing.assert_allclose(out.state['p_unlabeled'], [[.5, .5], [.8, .2]], rtol=1e-6)
    np.testing.assert_allclose(out.state['p_labeled'], [.725, .275], rtol=1e-6)
    np.testing.assert_allclose(float(out.metrics['threshold']), .81, rtol=1e-6)
    # Aligned by [.725 / .65, .275 / .35]: .7 -> .7 * 1.1154 / (.7808 + .2357) = .768 < .81.
    ratio = np.array([.725 / .65, .275 / .35])
    aligned = np.array([[.9, .1], [.7, .3]]) * ratio
    aligned /= aligned.sum(1, keepdims=True)
    assert aligned[0, 0] >= .81 > aligned[1, 0]
    assert float(out.metrics['mask']) == .5


def test_a_moving_average_without_the_window():
    algorithm = algorithms.ALGORITHMS['adamatch'](state_momentum=0.5, prediction_window=0)
    state = base.initial_state(algorithm, 2, 4)
    assert state['p_unlabeled'].shape == (2,)
    out = algorithm(identity_student, None, probs_batch(state, [[.9, .1], [.7, .3]]))
    np.testing.assert_allclose(out.state['p_unlabeled'], [.65, .35], rtol=1e-6)


def test_learns_on_tiny_digits(digits_data, tmp_path):
    cfg = tiny_config(algorithm='adamatch', train_steps=150, eval_every_kimg=1.171875,
                      log_every_steps=10, warmup_fraction=0.2)
    check_learns(cfg, algorithms.create('adamatch'), digits_data, tmp_path)


def test_interrupted_run_resumes_to_the_same_weights_and_state(digits_data, tmp_path):
    """The two class distributions come back from the checkpoint with the weights."""
    cfg = tiny_config(algorithm='adamatch', train_steps=12, eval_every_kimg=0.09375,
                      log_every_steps=2)
    straight = check_resumes(cfg, algorithms.create('adamatch'), digits_data, tmp_path, 8)
    assert all(np.any(np.array(v) != 0.1) for v in straight.state.values())   # moved from 1/C
