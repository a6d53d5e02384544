"""CReST, CReST+, DASO and CoSSL (algorithms/crest.py, daso.py, cossl.py): their sampling rates,
selections, alignment schedule, prototype queue, blended pseudo-labels and feature mixing by
hand, and CReST+'s generations and DASO's queue through an interrupted run."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import straight_and_resumed, tiny_config, weights_of
from ssl_ema import algorithms
from ssl_ema.algorithms import Batch, base
from ssl_ema.algorithms.cossl import balanced_cross_entropy, tfe_mix
from ssl_ema.algorithms.crest import (crest_plus_temperature, crest_sampling_rates,
                                      crest_selection)
from ssl_ema.algorithms.daso import (daso_pseudo_labels, enqueue_per_class, prototypes,
                                     semantic_logits)
from ssl_ema.base.errors import ConfigError
from ssl_ema.core.ema import EMA
from ssl_ema.nn import backbones

NEW = ('crest', 'crest_plus', 'daso', 'cossl')


def softmax(x):
    e = np.exp(x - np.max(x, -1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def identity(x, training=False):
    return x


# ---- CReST and CReST+ ---------------------------------------------------------------------------

def test_crest_sampling_rates_rank_classes_by_their_labeled_counts():
    # Counts 100, 500, 400: class 1 is the head (not class 0), class 0 the tail. The head keeps
    # N_tail / N_head = 1/5 of its pseudo-labels, class 2 (rank 1) N_2nd-to-last / N_head = 4/5,
    # the tail all of them; alpha = 1/2 takes square roots.
    prior = np.array([100., 500., 400.]) / 1000.
    np.testing.assert_allclose(crest_sampling_rates(prior, 1.), [1., 0.2, 0.8])
    np.testing.assert_allclose(crest_sampling_rates(prior, 0.5), [1., 0.2 ** 0.5, 0.8 ** 0.5])
    np.testing.assert_allclose(crest_sampling_rates(np.full(4, 0.25), 1 / 3), 1.)


def test_crest_generation_adds_the_most_confident_share_of_each_class():
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1],
                      [0.03, 0.95, 0.02], [0.1, 0.8, 0.1], [0.3, 0.5, 0.2]])
    # Class 0: images 0, 3, int(2 * 1) = 2 kept; class 1: 1, 4, 5, 6, int(4 * 0.5) = 2, the
    # most confident 4 (0.95) and 5 (0.8); class 2: image 2, int(1 * 0.34) = 0.
    selected, label = crest_selection(probs, [1., 0.5, 0.34])
    assert selected.tolist() == [1, 0, 0, 1, 1, 1, 0]
    assert label.tolist() == [0, 1, 2, 0, 1, 1, 1]


def test_crest_from_pool_is_a_generation_until_the_last():
    crest = algorithms.ALGORITHMS['crest'](generations=3, crest_alpha=1.)
    assert crest.pool_pass_every_fraction == pytest.approx(1 / 3)
    assert crest.pool_pass_start == pytest.approx(1 / 3)
    state = {'crest_generation': np.float32(0.), base.LABELED_PRIOR: np.array([0.8, 0.2])}
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    new = crest.from_pool(probs, state, 1 / 3)
    # class 0 (the head) keeps int(3 * 0.25) = 0 of its 3, class 1 (the tail) its one image
    assert new['crest_selected'].tolist() == [0, 0, 1, 0] and new['crest_generation'] == 1
    assert crest.from_pool(probs, {**state, 'crest_generation': np.float32(2.)}, 0.9) == {}


def test_crest_learns_the_added_images_as_labeled():
    crest = algorithms.ALGORITHMS['crest']()
    weak = tf.math.log(tf.constant([[0.7, 0.3], [0.97, 0.03], [0.5, 0.5]]))
    # Pool images 4 and 2 (batch rows 0 and 2) were added with labels 1 and 0.
    state = {'crest_selected': tf.constant([0., 0., 1., 0., 1.]),
             'crest_label': tf.constant([0, 0, 0, 0, 1]),
             'crest_generation': tf.constant(1.), base.LABELED_PRIOR: tf.constant([0.5, 0.5])}
    batch = Batch(tf.math.log(tf.constant([[0.8, 0.2]])), tf.constant([0]), (weak, weak),
                  tf.constant(1.), tf.random.Generator.from_seed(0), tf.constant(.5),
                  state=state, unlabeled_index=tf.constant([4, 1, 2]))
    out = crest(identity, None, batch)
    # mean over the labeled image and the two added ones, each on its stored label
    expected = -(np.log(0.8) + np.log(0.3) + np.log(0.5)) / 3
    np.testing.assert_allclose(float(out.labeled), expected, rtol=1e-5)
    # FixMatch on the pool as before: only row 1 is confident (0.97)
    np.testing.assert_allclose(float(out.unlabeled), -np.log(0.97) / 3, rtol=1e-5)


def test_crest_plus_temperature_falls_from_one_to_t_min_over_the_generations():
    t = [float(crest_plus_temperature(g, 6, 0.5)) for g in range(6)]
    np.testing.assert_allclose(t, [1., 0.9, 0.8, 0.7, 0.6, 0.5], rtol=1e-6)
    assert float(crest_plus_temperature(0, 1, 0.5)) == 1.


def test_crest_plus_aligns_to_the_tempered_labeled_distribution():
    crest = algorithms.ALGORITHMS['crest_plus'](generations=6, prediction_window=2)
    # The last generation: t = 0.5, target (0.8, 0.2)^0.5 normalised = (2/3, 1/3); the window's
    # mean prediction (1/2, 1/2): q = (0.6, 0.4) becomes (0.8, 0.2667) / 1.0667 = (0.75, 0.25).
    state = {'crest_generation': tf.constant(5.), base.LABELED_PRIOR: tf.constant([0.8, 0.2]),
             'p_model': tf.constant([[0.6, 0.4], [0.4, 0.6]])}
    batch = Batch(None, None, (), tf.constant(1.), None, state=state)
    aligned, new = crest.pseudo_label_probabilities(tf.constant([[0.6, 0.4], [0.2, 0.8]]), batch)
    np.testing.assert_allclose(aligned[0], [0.75, 0.25], rtol=1e-4)
    # the window moves on by this batch's mean prediction, after the alignment used it
    np.testing.assert_allclose(new['p_model'], [[0.4, 0.6], [0.4, 0.6]], rtol=1e-6)


# ---- DASO ---------------------------------------------------------------------------------------

def test_daso_queue_keeps_the_last_images_of_each_class():
    queue = tf.zeros([2, 2, 1])
    pointer, filled = tf.zeros([2], tf.int32), tf.zeros([2], tf.int32)
    queue, pointer, filled = enqueue_per_class(queue, pointer, filled,
                                               tf.constant([[1.], [2.], [3.], [10.]]),
                                               tf.constant([0, 0, 0, 1], tf.int64))
    # class 0 took 1, 2, 3 into two slots: 3 over 1; class 1 one of two slots
    assert queue.numpy()[:, :, 0].tolist() == [[3., 2.], [10., 0.]]
    assert pointer.numpy().tolist() == [1, 1] and filled.numpy().tolist() == [2, 1]
    np.testing.assert_allclose(prototypes(queue, filled)[:, 0], [2.5, 10.])
    # the next image of class 0 replaces its oldest, 2
    queue, pointer, filled = enqueue_per_class(queue, pointer, filled, tf.constant([[4.]]),
                                               tf.constant([0]))
    np.testing.assert_allclose(prototypes(queue, filled)[:, 0], [3.5, 10.])
    np.testing.assert_allclose(prototypes(tf.zeros([2, 2, 1]), tf.zeros([2], tf.int32)), 0.)


def test_daso_blend_leans_on_semantics_for_over_predicted_classes():
    linear = tf.constant([[0.7, 0.3], [0.2, 0.8]])
    semantic = tf.constant([[0.1, 0.9], [0.6, 0.4]])
    # m = (0.2, 0.8) at T_dist = 1: v = (1/4, 1); row 0 (class 0) keeps 3/4 of its linear
    # pseudo-label, row 1 (class 1, over-predicted) is all semantic.
    blended = daso_pseudo_labels(linear, semantic, tf.constant([0.2, 0.8]), 1.)
    np.testing.assert_allclose(blended, [[0.55, 0.45], [0.6, 0.4]], rtol=1e-6)
    # T_dist = 2 flattens v: (sqrt(1/4), 1) = (1/2, 1)
    blended = daso_pseudo_labels(linear, semantic, tf.constant([0.2, 0.8]), 2.)
    np.testing.assert_allclose(blended[0], [0.4, 0.6], rtol=1e-6)


def features_are_logits_model():
    """A model whose pooled features and logits both equal its 2-d input."""
    x = keras.Input((2,))
    pooled = keras.layers.Identity(name=backbones.FEATURES)(x)
    head = keras.layers.Dense(2, use_bias=False, kernel_initializer='identity')(pooled)
    return keras.Model(x, head)


def test_daso_semantic_pseudo_labels_come_from_the_current_prototypes():
    """An empty queue takes this batch's labeled features first: the prototypes are (1, 0) and
    (0, 1) at once (USB's pseudo-labels would use the previous batch's, here none)."""
    student = features_are_logits_model()
    daso = algorithms.ALGORITHMS['daso'](pretrain_fraction=0., confidence_threshold=0.7,
                                         distribution_temperature=1., dist_update_steps=1)
    state = base.initial_state(daso, 2, 4, feature_width=2)
    state['daso_distribution'] = tf.constant([0.2, 0.8])
    weak, strong = tf.constant([[2., 1.]]), tf.constant([[0., 1.]])
    batch = Batch(tf.constant([[1., 0.], [0., 1.]]), tf.constant([0, 1]), (weak, strong),
                  tf.constant(1.), tf.random.Generator.from_seed(0), tf.constant(.5), state=state)
    out = daso(student, EMA(student), batch)
    q = softmax(np.array([2., 1.]))
    q_sem = softmax(np.array([2., 1.]) / np.sqrt(5.) / 0.05)
    blended = 0.75 * q + 0.25 * q_sem   # class 0: v = 1/4
    assert blended.max() >= 0.7
    pseudo = -np.log(softmax(np.array([0., 1.]))[0])
    align = -(q_sem * np.log(softmax(np.array([0., 1.]) / 0.05))).sum()
    np.testing.assert_allclose(float(out.unlabeled), pseudo + align, rtol=1e-4)
    np.testing.assert_allclose(out.state['daso_queue'][:, 0], [[1., 0.], [0., 1.]])
    # a period of one step ended: m is this batch's pseudo-labels, the count starts again
    np.testing.assert_allclose(out.state['daso_distribution'], [1., 0.])
    np.testing.assert_allclose(out.state['daso_counts'], [0., 0.])


# ---- CoSSL --------------------------------------------------------------------------------------

def test_tfe_mixes_tail_features_with_pool_features():
    prior = tf.constant([0.5, 0.3, 0.2])   # mixing chances 0, 0.4, 0.6
    labels = tf.constant([0, 1, 2, 2, 1, 2])
    x = tf.reshape(tf.range(12, dtype=tf.float32), [6, 2])
    u = -tf.ones([6, 2])
    mixed, was_mixed = tfe_mix(x, labels, u, prior, tf.random.Generator.from_seed(3), 0.6)
    draws = tf.random.Generator.from_seed(3)   # the same draws, by hand
    chance = np.array([0., 0.4, 0.6, 0.6, 0.4, 0.6])
    expected_mixed = draws.uniform([6]).numpy() < chance
    lam = np.where(expected_mixed, draws.uniform([6], 0.6, 1.).numpy(), 1.)[:, None]
    np.testing.assert_array_equal(was_mixed, expected_mixed)
    np.testing.assert_allclose(mixed, lam * x.numpy() - (1. - lam), rtol=1e-6)
    # over many rows: the head class never, the tail 60%, lambda in [0.6, 1]
    labels = tf.constant([0] * 2000 + [2] * 2000)
    f = tf.ones([4000, 1])
    mixed, was_mixed = tfe_mix(f, labels, 0. * f, prior, tf.random.Generator.from_seed(0), 0.6)
    assert not np.any(was_mixed[:2000]) and abs(np.mean(was_mixed[2000:]) - 0.6) < 0.03
    assert mixed.numpy().min() >= 0.6


def test_tfe_loss_is_class_balanced_in_expectation():
    # weights 1 / (K pi_y) = 2/3 and 2 on ln 2 each
    loss = balanced_cross_entropy(tf.constant([0, 1]), tf.zeros([2, 2]), tf.constant([.75, .25]))
    np.testing.assert_allclose(float(loss), (2 / 3 + 2) / 2 * np.log(2.), rtol=1e-6)


def test_cossl_trains_its_classifier_on_tfe_alone_and_switches_the_pseudo_labels():
    """TFE's loss reaches only the classifier (the features are the EMA model's); from
    start_fraction the base's pseudo-labels are the classifier's on the EMA features."""
    student = backbones.build('small_cnn', (8, 8, 1), 10)
    teacher = EMA(student)
    rng = np.random.RandomState(0)
    x = lambda n: tf.constant(rng.rand(n, 8, 8, 1), tf.float32)   # noqa: E731
    losses_at = {}
    for progress in (0.5, 0.9):
        cossl = algorithms.ALGORITHMS['cossl'](start_fraction=0.8, confidence_threshold=0.)
        batch = Batch(x(4), tf.constant([0, 1, 2, 3]), (x(8), x(8)), tf.constant(1.),
                      tf.random.Generator.from_seed(0), tf.constant(progress),
                      state={base.LABELED_PRIOR: tf.constant([0.4] + [0.2] * 3 + [0.] * 6)},
                      heads=base.with_heads(student, cossl.heads), labeled_views=(x(4),))
        with tf.GradientTape() as tape:
            out = cossl(student, teacher, batch)
        grads = tape.gradient(out.metrics['tfe'], student.trainable_variables)
        assert [g is not None for g in grads] == [False] * (len(grads) - 2) + [True, True]
        losses_at[progress] = float(out.metrics['pseudo_label'])
    assert losses_at[0.5] != pytest.approx(losses_at[0.9], rel=1e-4)


# ---- all four -----------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NEW)
def test_an_unsupported_base_is_refused(name):
    with pytest.raises(ConfigError, match='--base_algorithm=mixmatch .* valid: fixmatch'):
        algorithms.ALGORITHMS[name](base_algorithm='mixmatch')


def test_interrupted_crest_plus_resumes_through_its_generations(digits_data, tmp_path):
    """CReST+'s generations (the first before the stop, the second after it), its selections
    and its alignment window come back from the checkpoint: the resumed run ends as the
    straight one, CReST's state included."""
    cfg = tiny_config(algorithm='crest_plus', train_steps=6, log_every_steps=1)
    algorithm = algorithms.ALGORITHMS['crest_plus'](generations=3, prediction_window=4,
                                                    confidence_threshold=0.2)
    straight, resumed, _ = straight_and_resumed(cfg, algorithm, digits_data, tmp_path, 3)
    for a, b in zip(weights_of(straight.student), weights_of(resumed.student)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for key, value in straight.state.items():
        np.testing.assert_allclose(np.array(resumed.state[key]), np.array(value), rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    assert float(straight.state['crest_generation'].numpy()) == 2   # passes at steps 2 and 4
    assert np.array(straight.state['crest_selected']).sum() > 0


def test_interrupted_daso_resumes_to_the_same_queue_and_distribution(digits_data, tmp_path):
    cfg = tiny_config(algorithm='daso', train_steps=6, log_every_steps=1)
    algorithm = algorithms.ALGORITHMS['daso'](pretrain_fraction=0.3, dist_update_steps=2,
                                              queue_size=2, confidence_threshold=0.2)
    straight, resumed, _ = straight_and_resumed(cfg, algorithm, digits_data, tmp_path, 3)
    for a, b in zip(weights_of(straight.student), weights_of(resumed.student)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for key, value in straight.state.items():
        np.testing.assert_allclose(np.array(resumed.state[key]), np.array(value), rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    assert np.array(straight.state['daso_filled']).min() == 2   # every class's queue wrapped
    assert int(straight.state['daso_step'].numpy()) == 6
