"""SAW, DebiasPL, ADSH and ACR (algorithms/saw.py, debiaspl.py, adsh.py, acr.py): their weights,
debiased pseudo-labels, thresholds and adaptive adjustment on tiny batches by hand (numpy), and
their state through an interrupted run."""
import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_resumed_exactly, straight_and_resumed, tiny_config
from ssl_ema import algorithms
from ssl_ema.algorithms import Batch
from ssl_ema.algorithms.acr import (acr_targets, adaptive_tau, anchor_divergences,
                                    reversed_prior)
from ssl_ema.algorithms.adsh import adaptive_thresholds, head_class
from ssl_ema.algorithms.debiaspl import debiased_pseudo_labels
from ssl_ema.algorithms.saw import effective_number_weights
from ssl_ema.base.errors import ConfigError

LN = np.log
NEW = ('saw', 'debiaspl', 'adsh', 'acr')


def identity(x, training=False):
    return x


def softmax(z):
    e = np.exp(z - np.max(z, -1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def batch(labeled, labels, unlabeled, state, progress=0.5):
    return Batch(tf.constant(labeled, tf.float32), tf.constant(labels),
                 tuple(tf.constant(u, tf.float32) for u in unlabeled), tf.constant(1.),
                 tf.random.Generator.from_seed(0), tf.constant(progress),
                 state={k: tf.constant(v, tf.float32) for k, v in state.items()})


def effective(counts):
    """SAW's weights, written out: beta = (N - 1) / N, N the mean count, normalised to sum K."""
    counts = np.maximum(np.asarray(counts, np.float64), 1.)
    beta = 1. - 1. / counts.mean()
    w = (1. - beta) / (1. - beta ** counts)
    return w / w.sum() * len(counts)


# ---- SAW ------------------------------------------------------------------------------------

def test_saw_effective_number_weights_by_hand():
    # counts (3, 1): N = 2, beta = 1/2, raw weights (1/2 / (7/8), 1/2 / (1/2)) = (4/7, 1).
    np.testing.assert_allclose(effective_number_weights([3., 1.]),
                               [2 * (4 / 7) / (11 / 7), 2 / (11 / 7)], rtol=1e-5)
    np.testing.assert_allclose(effective_number_weights([5., 5., 5.]), [1., 1., 1.], rtol=1e-6)
    # an empty class counts as 1
    np.testing.assert_allclose(effective_number_weights([4., 0., 2.]), effective([4, 1, 2]),
                               rtol=1e-5)


def test_saw_recounts_the_pools_predictions():
    saw = algorithms.ALGORITHMS['saw']()
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1]])
    new = saw.from_pool(probs, {}, 0.5)   # predicted counts (3, 1, 0)
    np.testing.assert_allclose(new['unlabeled_weights'], effective([3, 1, 1]), rtol=1e-5)
    assert new['unlabeled_weights'][0] < new['unlabeled_weights'][1]


def test_saw_weighs_both_losses_by_hand():
    saw = algorithms.ALGORITHMS['saw']()
    state = {'labeled_prior': [0.75, 0.25], 'labeled_size': 4., 'unlabeled_weights': [0.5, 2.]}
    labeled = LN([[0.8, 0.2], [0.3, 0.7]])
    weak = LN([[0.97, 0.03], [0.6, 0.4], [0.02, 0.98]])
    strong = LN([[0.5, 0.5], [0.1, 0.9], [0.1, 0.9]])
    out = saw(identity, None, batch(labeled, [0, 1], (weak, strong), state))
    w = effective([3, 1])   # the labeled counts: prior times the labeled set's size
    np.testing.assert_allclose(float(out.labeled), (-LN(0.8) * w[0] - LN(0.7) * w[1]) / 2,
                               rtol=1e-5)
    # images 0 and 2 are confident (classes 0 and 1), weighted 0.5 and 2
    np.testing.assert_allclose(float(out.unlabeled), (-LN(0.5) * 0.5 - LN(0.9) * 2.) / 3,
                               rtol=1e-5)


# ---- DebiasPL -------------------------------------------------------------------------------

def test_debiasing_is_per_class_and_can_change_the_pseudo_label():
    z = LN([[0.6, 0.4], [0.99, 0.01]])
    prior = np.array([0.8, 0.2])
    labels, mask = debiased_pseudo_labels(tf.constant(z, tf.float32), tf.constant(prior, tf.float32),
                                          1., 0.7)
    expected = softmax(z - LN(prior))   # (0.75, 2) -> (3/11, 8/11); (0.99/0.8, 0.01/0.2)
    np.testing.assert_allclose(expected[0], [3 / 11, 8 / 11], rtol=1e-6)
    assert labels.numpy().tolist() == [1, 0]
    np.testing.assert_array_equal(mask, expected.max(1) >= 0.7)
    # A prior equal for every class (USB's scalar) leaves FixMatch's pseudo-labels unchanged.
    labels, mask = debiased_pseudo_labels(tf.constant(z, tf.float32), tf.constant([0.3, 0.3]),
                                          1., 0.7)
    assert labels.numpy().tolist() == [0, 0] and mask.numpy().tolist() == [0., 1.]


def test_debiaspl_loss_and_prior_update_by_hand():
    tau, m = 0.4, 0.9
    debiaspl = algorithms.ALGORITHMS['debiaspl'](debias_strength=tau, state_momentum=m,
                                                 confidence_threshold=0.815)
    prior = np.array([0.7, 0.2, 0.1])
    weak = LN([[0.9, 0.05, 0.05], [0.2, 0.1, 0.7]])
    strong = LN([[0.5, 0.3, 0.2], [0.3, 0.3, 0.4]])
    out = debiaspl(identity, None, batch(LN([[0.6, 0.3, 0.1]]), [0], (weak, strong),
                                         {'p_hat': prior}))
    debiased = softmax(weak - tau * LN(prior))   # pseudo-labels from the prior before the update
    new_prior = m * prior + (1 - m) * softmax(weak).mean(0)
    np.testing.assert_allclose(out.state['p_hat'], new_prior, rtol=1e-5)
    assert len(set(np.round(new_prior, 6))) == 3   # a vector, one value per class
    labels, keep = debiased.argmax(1), debiased.max(1) >= 0.815   # 0.82 and 0.81
    assert labels.tolist() == [0, 2] and keep.tolist() == [True, False]
    shifted = strong + tau * LN(new_prior)         # the adaptive marginal loss, updated prior
    per_image = -np.log(softmax(shifted)[np.arange(2), labels])
    np.testing.assert_allclose(float(out.unlabeled), (per_image * keep).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(out.labeled), -LN(0.6), rtol=1e-5)


# ---- ADSH -----------------------------------------------------------------------------------

def pool_rows(confidences_by_class, k=3):
    """Probability rows [N, k]: each class's confidence at its class, the rest spread evenly."""
    rows = []
    for c, confidences in confidences_by_class.items():
        for p in confidences:
            row = np.full(k, (1. - p) / (k - 1))
            row[c] = p
            rows.append(row)
    return np.array(rows)


def test_adsh_thresholds_relative_to_a_head_class_that_is_not_class_0():
    # Class 2 is the head class (the most labeled images); 2 of its 4 predictions reach 0.95,
    # so rho = 1/2: class 0 keeps its 3 most confident of 6 (threshold 0.6), class 1 its
    # ceil(1.5) = 2 of 3 (0.5).
    probs = pool_rows({0: [0.9, 0.7, 0.6, 0.5, 0.4, 0.35], 1: [0.8, 0.5, 0.45],
                       2: [0.99, 0.97, 0.9, 0.8]})
    adsh = algorithms.ALGORITHMS['adsh']()
    state = {'labeled_prior': np.array([0.2, 0.3, 0.5]), 'thresholds': np.full(3, 0.95)}
    thresholds = adsh.from_pool(probs, state, 0.5)['thresholds']
    np.testing.assert_allclose(thresholds, [0.6, 0.5, 0.95], rtol=1e-6)
    # Taking class 0 as the head (USB's assumption): none of its images reaches 0.95.
    assert not np.allclose(adaptive_thresholds(probs, 0, 0.95, np.full(3, 0.95)), thresholds)


def test_adsh_head_class_is_the_most_labeled_then_the_most_predicted():
    probs = pool_rows({0: [0.9], 1: [0.8, 0.7], 2: [0.6, 0.6, 0.6]})
    assert head_class([0.5, 0.3, 0.2], probs) == 0
    assert head_class([0.2, 0.4, 0.4], probs) == 2
    assert head_class([0.4, 0.4, 0.2], probs) == 1


def test_adsh_thresholds_start_at_tau_and_keep_a_class_never_predicted():
    adsh = algorithms.ALGORITHMS['adsh'](confidence_threshold=0.9)
    start = algorithms.base.initial_state(adsh, 3, 10)['thresholds']
    np.testing.assert_allclose(start, [0.9, 0.9, 0.9])
    probs = pool_rows({1: [0.95, 0.8, 0.7, 0.6], 2: [0.5, 0.4]})   # class 0 never predicted
    thresholds = adaptive_thresholds(probs, 1, 0.9, np.array([0.3, 0.9, 0.9]))
    np.testing.assert_allclose(thresholds, [0.3, 0.9, 0.5], rtol=1e-6)   # rho = 1/4
    # no head-class image reaches tau: every threshold back to tau
    np.testing.assert_allclose(adaptive_thresholds(probs, 2, 0.9, np.array([0.3, 0.9, 0.9])),
                               [0.9, 0.9, 0.9])


def test_adsh_masks_each_class_by_its_own_threshold():
    adsh = algorithms.ALGORITHMS['adsh']()
    weak = LN([[0.7, 0.2, 0.1], [0.1, 0.65, 0.25], [0.1, 0.1, 0.8]])
    strong = LN([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.1, 0.1, 0.8]])
    state = {'labeled_prior': [0.2, 0.3, 0.5], 'thresholds': [0.6, 0.7, 0.95]}
    out = adsh(identity, None, batch(LN([[0.5, 0.25, 0.25]]), [0], (weak, strong), state))
    np.testing.assert_allclose(float(out.metrics['mask']), 1 / 3)   # only image 0 passes
    np.testing.assert_allclose(float(out.unlabeled), -LN(0.5) / 3, rtol=1e-5)


# ---- ACR ------------------------------------------------------------------------------------

def symmetric_kl(p, q):
    return 0.5 * (np.sum(p * LN(p / q)) + np.sum(q * LN(q / p)))


def test_acr_anchors_and_adaptive_tau_by_hand():
    prior = np.array([0.2, 0.5, 0.3])   # head class 1: the reversed anchor by rank, not flipped
    np.testing.assert_allclose(reversed_prior(tf.constant(prior, tf.float32)), [0.5, 0.2, 0.3],
                               rtol=1e-6)
    estimate = np.array([0.3, 0.3, 0.4])
    d = anchor_divergences(tf.constant(estimate, tf.float32), tf.constant(prior, tf.float32))
    np.testing.assert_allclose(d, [symmetric_kl(estimate, prior),
                                   symmetric_kl(estimate, np.full(3, 1 / 3)),
                                   symmetric_kl(estimate, np.array([0.5, 0.2, 0.3]))], rtol=1e-4)
    np.testing.assert_allclose(adaptive_tau(d, 2.), 2. * softmax(d.numpy())[0], rtol=1e-6)
    # A consistent pool: d_con = 0; a uniform one: d_con = d_rev (tau -> 1 as they grow); tau
    # grows from a consistent to a uniform to a reversed pool.
    pools = [prior, np.full(3, 1 / 3), np.array([0.5, 0.2, 0.3])]
    d = [anchor_divergences(tf.constant(u, tf.float32), tf.constant(prior, tf.float32))
         for u in pools]
    assert abs(float(d[0][0])) < 1e-6 and abs(float(d[2][2])) < 1e-6
    np.testing.assert_allclose(d[1][0], d[1][2], rtol=1e-5)
    assert 0.99 < float(adaptive_tau(d[1] * 100, 2.)) < 1.
    taus = [float(adaptive_tau(x, 2.)) for x in d]
    assert taus == sorted(taus) and taus[0] < taus[1] < taus[2], taus


def test_acr_pseudo_labels_by_hand():
    prior = np.array([0.8, 0.2])
    standard = LN([[0.6, 0.4], [0.97, 0.03]])
    balanced = LN([[0.25, 0.75], [0.5, 0.5]])
    (labels, mask), (balanced_labels, balanced_mask) = acr_targets(
        tf.constant(standard, tf.float32), tf.constant(balanced, tf.float32),
        tf.constant(prior, tf.float32), 1., 2., 0.7)
    adjusted, adjusted12 = softmax(standard - LN(prior)), softmax(standard - 2 * LN(prior))
    np.testing.assert_allclose(adjusted[0], [3 / 11, 8 / 11], rtol=1e-5)
    assert labels.numpy().tolist() == [1, 0]
    # the adjusted (8/11) or the plain (0.97) prediction is confident
    assert mask.numpy().tolist() == [1., 1.]
    assert balanced_labels.numpy().tolist() == adjusted12.argmax(1).tolist() == [1, 0]
    # image 0: adjusted12's 0.91 (and the balanced branch's 0.75); image 1: adjusted12 =
    # (0.97/0.64, 0.03/0.04) -> 0.67 and the balanced branch's 0.5: not confident
    np.testing.assert_allclose(adjusted12[1, 0], (0.97 / 0.64) / (0.97 / 0.64 + 0.75), rtol=1e-6)
    assert balanced_mask.numpy().tolist() == [1., 0.]


def two_heads(k):
    """A 'model with heads' whose input rows are its outputs: [balanced logits | standard]."""
    return lambda x, training=False: [x[:, :k], x[:, k:]]


def test_acr_loss_and_window_by_hand():
    acr = algorithms.ALGORITHMS['acr'](confidence_threshold=0.7, estimate_start_fraction=0.,
                                       estimate_every_fraction=0.25, acr_momentum=0.5)
    prior = np.array([0.8, 0.2])
    labeled = np.r_[LN([0.6, 0.4]), LN([0.7, 0.3])][None]          # balanced | standard
    weak = np.r_[LN([0.9, 0.1]), LN([0.75, 0.25])][None]
    strong1 = np.r_[LN([0.5, 0.5]), LN([0.2, 0.8])][None]
    strong2 = np.r_[LN([0.4, 0.6]), LN([0.3, 0.7])][None]
    state = {'labeled_prior': prior, 'unlabeled_prior': [0.5, 0.5],
             'divergence_sum': [0.1, 0.5, 0.9], 'divergence_steps': 2., 'window': 1., 'tau': 2.}
    b = batch(labeled, [0], (weak, strong1, strong2), state, progress=0.5)   # window 2 begins
    b.heads = two_heads(2)
    out = acr(None, None, b)
    tau = 2. * softmax(np.array([0.05, 0.25, 0.45]))[0]   # the last window's mean divergences
    np.testing.assert_allclose(float(out.state['tau']), tau, rtol=1e-5)
    # the balanced branch's confident class 0 (0.9) moves the estimate half way to (1, 0)
    estimate = np.array([0.75, 0.25])
    np.testing.assert_allclose(out.state['unlabeled_prior'], estimate, rtol=1e-6)
    np.testing.assert_allclose(out.state['divergence_sum'], [
        symmetric_kl(estimate, prior), symmetric_kl(estimate, np.full(2, 0.5)),
        symmetric_kl(estimate, prior[::-1])], rtol=1e-4)
    assert float(out.state['divergence_steps']) == 1. and float(out.state['window']) == 2.
    # labeled: the standard branch's cross-entropy and the balanced one's, logit-adjusted (tau2 2)
    adjusted_labeled = softmax(LN([0.6, 0.4]) + 2 * LN(prior))
    np.testing.assert_allclose(float(out.labeled), -LN(0.7) - LN(adjusted_labeled[0]), rtol=1e-5)
    # The standard branch's pseudo-label: arg max softmax(z - tau log pi), class 0, kept by the
    # plain 0.75; the balanced branch's: softmax(z - 2 log pi), class 1, kept by its own 0.9.
    adjusted = softmax(LN([0.75, 0.25]) - tau * LN(prior))
    standard_label, standard_keep = adjusted.argmax(), True
    adjusted12 = softmax(LN([0.75, 0.25]) - 2 * LN(prior))
    assert standard_label == 0 and adjusted.max() < 0.7 and adjusted12.argmax() == 1
    standard_u = -(LN([0.2, 0.8])[standard_label] + LN([0.3, 0.7])[standard_label]) / 2
    balanced_u = -(LN([0.5, 0.5])[adjusted12.argmax()] + LN([0.4, 0.6])[adjusted12.argmax()]) / 2
    np.testing.assert_allclose(float(out.unlabeled), standard_u * standard_keep + balanced_u,
                               rtol=1e-5)


# ---- all four --------------------------------------------------------------------------------

def test_an_unsupported_base_is_refused_by_name():
    for name in NEW:
        with pytest.raises(ConfigError, match='--base_algorithm=mixmatch .* valid: fixmatch'):
            algorithms.ALGORITHMS[name](base_algorithm='mixmatch')


RESUMED = {   # short schedules, so that each state changes before and after the stop
    'saw': dict(reweight_every_fraction=1 / 3, confidence_threshold=0.2),
    'debiaspl': dict(state_momentum=0.9, confidence_threshold=0.2),
    'adsh': dict(adapt_every_fraction=1 / 8, confidence_threshold=0.105),
    'acr': dict(estimate_start_fraction=0., estimate_every_fraction=1 / 3,
                confidence_threshold=0.2),
}
# An untrained model predicts one class for the whole pool, which leaves ADSH's thresholds at
# tau: with the EMA at the student and 16 steps, the passes (every 2 steps) predict several
# classes, the most predicted one the head class of these balanced labels, and tau = 0.105
# near their confidences (0.10 to 0.14). (steps, stop, evaluation every kimg, EMA decay)
TRAINING = {'adsh': (16, 8, 0.125, 0.)}
CHANGED = {'saw': 'unlabeled_weights', 'debiaspl': 'p_hat', 'adsh': 'thresholds', 'acr': 'tau'}


@pytest.mark.parametrize('name', NEW)
def test_interrupted_run_resumes_to_the_same_weights_and_state(name, digits_data, tmp_path):
    """Each method's state (SAW's weights and ADSH's thresholds from passes over the pool before
    and after the stop, DebiasPL's prior, ACR's estimate, window sums and tau) comes back from
    the checkpoint: a resumed run ends where a straight one does."""
    steps, stop, every, decay = TRAINING.get(name, (6, 4, 0.0625, 0.999))
    cfg = tiny_config(algorithm=name, train_steps=steps, eval_every_kimg=every, log_every_steps=2,
                      ema_decay=decay)
    algorithm = algorithms.ALGORITHMS[name](**RESUMED[name])
    straight, resumed, _ = straight_and_resumed(cfg, algorithm, digits_data, tmp_path, stop)
    assert_resumed_exactly(straight, resumed)
    initial = algorithms.base.initial_state(algorithm, 10, digits_data.unlabeled_size, 50)
    assert not np.allclose(np.array(straight.state[CHANGED[name]]), initial[CHANGED[name]])
