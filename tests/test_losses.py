"""Each loss on values worked out by hand."""
import math

import numpy as np
import pytest
import tensorflow as tf

from ssl_ema.nn import losses


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


def test_sigmoid_rampup_is_the_papers_exp_minus_5_one_minus_t_squared():
    np.testing.assert_allclose(losses.sigmoid_rampup(tf.constant([0., .2, .4, .9]), 0.4),
                               [np.exp(-5.), np.exp(-1.25), 1., 1.], rtol=1e-6)
    assert float(losses.sigmoid_rampup(tf.constant(0.), 0.)) == 1.
    assert float(losses.RAMPUPS['none'](tf.constant(0.), 0.4)) == 1.


def test_linear_rampup():
    np.testing.assert_allclose(losses.linear_rampup(tf.constant([0., .2, .4, .9]), 0.4),
                               [0., .5, 1., 1.])
    assert float(losses.linear_rampup(tf.constant(0.), 0.)) == 1.


def test_fixmatch_cosine():
    assert float(losses.fixmatch_cosine(0.)) == pytest.approx(1.)
    assert float(losses.fixmatch_cosine(1.)) == pytest.approx(math.cos(7 * math.pi / 16), 1e-6)


def test_l2_normalize_gives_unit_norm_even_to_tiny_vectors():
    d = tf.constant([[3e-9, 4e-9], [3., 4.], [0., 0.]])
    np.testing.assert_allclose(losses.l2_normalize(d), [[.6, .8], [.6, .8], [0., 0.]], rtol=1e-6)
    images = tf.random.stateless_normal((2, 4, 4, 3), [1, 2]) * 1e-7
    np.testing.assert_allclose(tf.norm(tf.reshape(losses.l2_normalize(images), [2, -1]), axis=1),
                               [1., 1.], rtol=1e-5)


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


def test_vat_perturbation_has_norm_eps_in_pixel_units():
    # Identity model on model-input units, two channels at 2 and 0.5 model units per pixel unit:
    # logits = x + scale * r. Target [.5, .5], q(x) = [.75, .25]: the gradient w.r.t. the pixel
    # perturbation is scale * (q - p) = [.5, -.125]; normalised in pixel units and times eps = 2,
    # r_adv = 2 [.5, -.125] / 0.515388 = [1.940285, -0.485071] pixels, so in model units
    # [3.880570, -0.242536], whose norm is not 2 while the pixel norm is.
    x = tf.constant([[math.log(3.), 0.]])
    scale = tf.constant([2., .5])
    r = losses.vat_perturbation(lambda v: v, x, tf.constant([[0., 0.]]),
                                tf.constant([[0.3, 0.7]]), xi=1e-6, eps=2., scale=scale)
    np.testing.assert_allclose(r, [[3.880570, -0.242536]], rtol=1e-4)
    assert float(tf.norm(r / scale)) == pytest.approx(2., 1e-5)


def test_kl_divergence_is_generic_in_its_arguments():
    # VAT's --vat_kl swaps the arguments: KL(p || q) with p first, whichever is the target.
    p, q = tf.constant([[0., 0.]]), tf.constant([[math.log(3.), 0.]])   # [.5, .5], [.75, .25]
    assert float(losses.kl_divergence(q, p)) == pytest.approx(
        .75 * math.log(1.5) + .25 * math.log(.5), 1e-5)


def test_soft_cross_entropy_and_its_mask():
    # target [.5, .5], prediction [.75, .25]: -(.5 ln .75 + .5 ln .25)
    value = 0.5 * math.log(4 / 3) + 0.5 * math.log(4.)
    assert float(losses.soft_cross_entropy([[.5, .5]], [[math.log(3.), 0.]])) == pytest.approx(value, 1e-6)
    # a masked-out example still counts in the denominator (FixMatch Eq. 4: 1 / (mu B))
    masked = losses.soft_cross_entropy([[.5, .5], [.5, .5]], [[math.log(3.), 0.]] * 2, [1., 0.])
    assert float(masked) == pytest.approx(value / 2, 1e-6)


def test_confidence_mask_includes_the_threshold():
    probs = tf.constant([[.96, .04], [.95, .05], [.6, .4], [.02, .98]])
    np.testing.assert_array_equal(losses.confidence_mask(probs, 0.95), [1., 1., 0., 1.])


def test_fixmatch_mask_and_hard_pseudo_label():
    # Row 1: weak p = softmax([ln 19, 0]) = [.95, .05] -> confident, label 0; the strong view
    # predicts [.75, .25] -> -ln .75. Row 2: weak p = [.5, .5] -> masked out.
    weak = tf.constant([[math.log(19.), 0.], [0., 0.]])
    strong = tf.constant([[math.log(3.), 0.], [5., -5.]])
    loss, mask = losses.confident_pseudo_label_loss(weak, strong, 0.95)
    np.testing.assert_array_equal(mask, [1., 0.])
    assert float(loss) == pytest.approx(math.log(4 / 3) / 2, 1e-5)
    # the target side gets no gradient: pseudo-labelling a view with its own logits is allowed
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(weak)
        loss, _ = losses.confident_pseudo_label_loss(weak, strong, 0.95)
        same, _ = losses.confident_pseudo_label_loss(weak, weak, 0.95)
    assert tape.gradient(loss, weak) is None
    # Lee 2013 (target = logits): -ln .95 on row 1, nothing on row 2, gradient through logits only
    assert float(same) == pytest.approx(-math.log(.95) / 2, 1e-5)
    assert float(tf.reduce_sum(tf.abs(tape.gradient(same, weak)))) > 0


def test_sharpen():
    # MixMatch Eq. 7: [.6, .4] at T = .5 -> [.36, .16] / .52 = [9/13, 4/13]; T = 1 changes nothing
    np.testing.assert_allclose(losses.sharpen(tf.constant([[.6, .4]]), 0.5), [[9 / 13, 4 / 13]], rtol=1e-6)
    np.testing.assert_allclose(losses.sharpen(tf.constant([[.6, .4]]), 1.), [[.6, .4]], rtol=1e-6)
    # UDA's temperature control: sharpen(softmax(z), T) = softmax(z / T);
    # softmax([ln 3, 0]) = [.75, .25] -> [.5625, .0625] / .625 = [.9, .1] = softmax([2 ln 3, 0])
    np.testing.assert_allclose(losses.sharpen(tf.nn.softmax([[math.log(3.), 0.]]), 0.5), [[.9, .1]], rtol=1e-6)


def test_mix_broadcasts_one_weight_per_example():
    np.testing.assert_allclose(losses.mix(tf.constant([[1., 0.], [2., 2.]]), tf.constant([[0., 1.], [0., 0.]]),
                                          tf.constant([.75, .5])), [[.75, .25], [1., 1.]])
    images = losses.mix(tf.ones([2, 3, 3, 1]), tf.zeros([2, 3, 3, 1]), tf.constant([.9, .6]))
    np.testing.assert_allclose(images[:, 1, 2, 0], [.9, .6], rtol=1e-6)


def test_mixup_mixes_images_and_targets_alike():
    # ICT's and MixMatch's mix: image i is a constant i, its target the one-hot of i, so the mixed
    # image must equal the mean index under the mixed target: the same partner and lambda for both.
    n = 8
    images = tf.reshape(tf.range(n, dtype=tf.float32), [n, 1, 1, 1]) * tf.ones([n, 2, 2, 1])
    targets = tf.eye(n)
    mixed_images, mixed_targets = losses.mixup(tf.random.Generator.from_seed(0), 0.75, images, targets)
    np.testing.assert_allclose(mixed_images[:, 0, 0, 0], tf.linalg.matvec(mixed_targets, tf.range(n, dtype=tf.float32)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tf.reduce_sum(mixed_targets, 1), np.ones(n), rtol=1e-6)
    # lambda' = max(lambda, 1 - lambda): each example keeps at least half of itself (MixMatch Eq. 9)
    assert np.all(np.diag(mixed_targets) >= 0.5 - 1e-6)
    assert not np.allclose(mixed_targets, np.eye(n))   # it does mix
    # drawn from the run's generator only: the same state gives the same mix
    again = losses.mixup(tf.random.Generator.from_seed(0), 0.75, images, targets)[1]
    np.testing.assert_array_equal(mixed_targets, again)


def test_tsa_threshold_schedules():
    # eta_t = alpha_t (1 - 1/K) + 1/K with K = 10
    assert float(losses.tsa_threshold('linear', 0.5, 10)) == pytest.approx(.55)
    assert float(losses.tsa_threshold('linear', 0., 10)) == pytest.approx(.1)
    assert float(losses.tsa_threshold('log', 0.2, 10)) == pytest.approx((1 - math.exp(-1)) * .9 + .1, 1e-6)
    assert float(losses.tsa_threshold('exp', 0.8, 10)) == pytest.approx(math.exp(-1) * .9 + .1, 1e-6)
    assert float(losses.tsa_threshold('exp', 1., 10)) == pytest.approx(1.)
    assert float(losses.tsa_threshold('none', 0., 10)) == pytest.approx(1.)


def test_tsa_cross_entropy_drops_confident_labeled_examples():
    # p(correct) = .75 (CE ln 4/3) and .5 (CE ln 2); at eta = .6 only the second stays, averaged
    # over the examples kept (UDA's code)
    logits, labels = tf.constant([[math.log(3.), 0.], [0., 0.]]), tf.constant([0, 0])
    assert float(losses.tsa_cross_entropy(labels, logits, 0.6)) == pytest.approx(math.log(2.), 1e-6)
    assert float(losses.tsa_cross_entropy(labels, logits, 1.)) == pytest.approx(
        float(losses.cross_entropy(labels, logits)), 1e-6)
    assert float(losses.tsa_cross_entropy(labels, logits, 0.1)) == 0.
