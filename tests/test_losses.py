"""Each loss on values worked out by hand."""
import math

import numpy as np
import pytest
import tensorflow as tf

from ssl_ema import losses


def test_cross_entropy():
    # softmax([ln 3, 0]) = [0.75, 0.25]; the label is class 1 -> -ln 0.25
    assert float(losses.cross_entropy([1], [[math.log(3.), 0.]])) == pytest.approx(math.log(4.), 1e-6)


def test_softmax_mse_averages_over_classes_and_batch():
    # softmax([0, 0]) = [.5, .5]; target [1, 0] -> mean(.25, .25) = .25
    assert float(losses.softmax_mse([[0., 0.]], [[1., 0.]])) == pytest.approx(0.25)
    # identical distributions cost nothing: the Mean Teacher cost must not be constant
    assert float(losses.softmax_mse([[2., 0.]], tf.nn.softmax([[2., 0.]]))) == pytest.approx(0., abs=1e-7)


def test_kl_divergence_direction_is_target_first():
    target, student = [[0., 0.]], [[math.log(3.), 0.]]   # p = [.5, .5], q = [.75, .25]
    # KL(p || q) = .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3)
    assert float(losses.kl_divergence(target, student)) == pytest.approx(0.5 * math.log(4 / 3), 1e-5)
    # the reverse direction KL(q || p) = .75 ln 1.5 + .25 ln .5 differs: the order matters
    reverse = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(losses.kl_divergence(student, target)) == pytest.approx(reverse, 1e-5)


def test_entropy():
    assert float(losses.entropy([[0., 0.], [0., 0.]])) == pytest.approx(math.log(2.), 1e-6)
    assert float(losses.entropy([[100., 0.]])) == pytest.approx(0., abs=1e-6)


def test_linear_rampup():
    np.testing.assert_allclose(losses.linear_rampup(tf.constant([0., .2, .4, .9]), 0.4),
                               [0., .5, 1., 1.])
    assert float(losses.linear_rampup(tf.constant(0.), 0.)) == 1.


def test_fixmatch_cosine():
    assert float(losses.fixmatch_cosine(0.)) == pytest.approx(1.)
    assert float(losses.fixmatch_cosine(1.)) == pytest.approx(math.cos(7 * math.pi / 16), 1e-6)


def test_vat_perturbation_first_order_case():
    # Identity "model": logits = x + r. Target p = [.5, .5], student q(x) = [.75, .25].
    # d/dr KL(p || softmax(x + r)) = softmax(x + r) - p ~= [.25, -.25] -> eps * [1, -1] / sqrt 2.
    x = tf.constant([[math.log(3.), 0.]])
    r = losses.vat_perturbation(lambda v: v, x, tf.constant([[0., 0.]]),
                                tf.constant([[0.3, 0.7]]), xi=1e-6, eps=2.)
    np.testing.assert_allclose(r, [[math.sqrt(2.), -math.sqrt(2.)]], rtol=1e-4)


def test_vat_perturbation_power_iteration_finds_the_hessian_direction():
    # Target = the model's own prediction q = [.75, .25]: the gradient vanishes at r = 0 and the
    # power iteration returns the Hessian's top eigenvector. H = diag(q) - q q^T = .1875 [[1, -1],
    # [-1, 1]], so from d = [1, 0], H d points along [1, -1].
    x = tf.constant([[math.log(3.), 0.]])
    r = losses.vat_perturbation(lambda v: v, x, x, tf.constant([[1., 0.]]), xi=1e-2, eps=1.)
    np.testing.assert_allclose(r, [[1 / math.sqrt(2.), -1 / math.sqrt(2.)]], rtol=1e-3)
    assert float(tf.norm(r)) == pytest.approx(1., 1e-5)
