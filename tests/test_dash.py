"""Dash: its threshold schedule and selection on hand-worked values, rho_hat from the labeled
training loss, learning on tiny digits, and resuming."""
import math

import numpy as np
import tensorflow as tf

from conftest import check_learns, check_resumes, tiny_config
from ssl_ema import algorithms
from ssl_ema.nn import losses
from ssl_ema.algorithms import Batch, base


def test_threshold_decays_by_gamma_per_stage_down_to_its_floor():
    rho = losses.dash_threshold(0.5, tf.constant([-3., 0., 2., 20.]), 1.0001, 1.27, 0.05)
    np.testing.assert_allclose(rho, [0.50005, 0.50005, 0.50005 / 1.27 ** 2, 0.05], rtol=1e-6)


def identity_student(x, training=False):
    """A 'model' whose logits are its inputs: every quantity can be worked by hand."""
    return x


def probs_batch(state, progress, weak_probs=((.9, .1), (.6, .4))):
    weak = tf.math.log(tf.constant(weak_probs, tf.float32))
    labeled = tf.math.log(tf.constant([[.8, .2], [.4, .6]]))   # labels 0, 1: xe (-ln .8 - ln .6)/2
    return Batch(labeled, tf.constant([0, 1]), (weak, weak), tf.constant(1.),
                 tf.random.Generator.from_seed(0), tf.constant(progress), state=state)


def test_warm_up_fixes_rho_hat_from_the_labeled_loss_then_the_weak_loss_selects():
    algorithm = algorithms.ALGORITHMS['dash'](supervised_fraction=0.5, state_momentum=0.5,
                                              threshold_every_fraction=0.25)
    state = base.initial_state(algorithm, 2, 4)
    np.testing.assert_allclose(float(state['labeled_loss']), math.log(2), rtol=1e-6)
    xe = (-math.log(.8) - math.log(.6)) / 2
    # In the warm-up: the running labeled loss moves, no unlabeled image counts.
    out = algorithm(identity_student, None, probs_batch(state, 0.1))
    rho_hat = 0.5 * math.log(2) + 0.5 * xe
    np.testing.assert_allclose(float(out.state['labeled_loss']), rho_hat, rtol=1e-6)
    assert float(out.metrics['mask']) == 0. and float(out.unlabeled) == 0.
    # After it (stage floor((.8 - .5) / .25) = 1): rho_hat stays, rho = C rho_hat / gamma.
    after = algorithm(identity_student, None, probs_batch(out.state, 0.8))
    np.testing.assert_allclose(float(after.state['labeled_loss']), rho_hat, rtol=1e-6)
    rho = 1.0001 * rho_hat / 1.27
    np.testing.assert_allclose(float(after.metrics['threshold']), rho, rtol=1e-6)
    # Soft targets (T = .5): [.81, .01] / .82 and [.36, .16] / .52; their weak-view losses
    # .132 <= rho = .417 < .636: the first image counts, and trains the strong view (here the
    # same logits) with the same loss, over 2 images.
    target = np.array([.81, .01]) / .82
    first = -(target * np.log([.9, .1])).sum()
    second = -(np.array([.36, .16]) / .52 * np.log([.6, .4])).sum()
    assert first <= rho < second
    assert float(after.metrics['mask']) == .5
    np.testing.assert_allclose(float(after.unlabeled), first / 2, rtol=1e-5)
    # With the floor above rho, rho = rho_min = .45 and the targets are hard: -ln .9 counts,
    # -ln .6 = .51 does not.
    floored = algorithms.ALGORITHMS['dash'](supervised_fraction=0.5, min_threshold=0.45,
                                            threshold_every_fraction=0.25)
    out = floored(identity_student, None, probs_batch(out.state, 0.8))
    np.testing.assert_allclose(float(out.metrics['threshold']), .45, rtol=1e-6)
    np.testing.assert_allclose(float(out.unlabeled), -math.log(.9) / 2, rtol=1e-5)


def test_learns_on_tiny_digits(digits_data, tmp_path):
    cfg = tiny_config(algorithm='dash', train_steps=150, eval_every_kimg=1.171875,
                      log_every_steps=10)
    algorithm = algorithms.create('dash', supervised_fraction=0.1, threshold_every_fraction=0.1)
    check_learns(cfg, algorithm, digits_data, tmp_path)


def test_interrupted_run_resumes_to_the_same_weights_and_state(digits_data, tmp_path):
    """rho_hat, fixed in the warm-up (the first 6 of 12 steps), comes back from the checkpoint."""
    cfg = tiny_config(algorithm='dash', train_steps=12, eval_every_kimg=0.09375,
                      log_every_steps=2)
    straight = check_resumes(cfg, algorithms.create('dash', supervised_fraction=0.5),
                             digits_data, tmp_path, 8)
    assert float(straight.state['labeled_loss']) != np.float32(math.log(10))   # it moved from ln C
