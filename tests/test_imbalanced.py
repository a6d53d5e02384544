"""ABC and DARP (algorithms/abc.py, darp.py): their masks, projection and pseudo-labels by hand,
on ReMixMatch against the pieces they must equal, and their state through an interrupted run."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_resumed_exactly, straight_and_resumed, tiny_config
from ssl_ema import algorithms
from ssl_ema.algorithms import Batch, base
from ssl_ema.algorithms.abc import abc_keep_probability, abc_loss
from ssl_ema.algorithms.darp import darp_projection
from ssl_ema.base.config import TrainConfig
from ssl_ema.base.errors import ConfigError
from ssl_ema.core import run_dir
from ssl_ema.nn import backbones
from ssl_ema.nn.backbones import call_keeping_statistics


def test_darp_projection_meets_its_target_distribution():
    rng = np.random.RandomState(0)
    logits = rng.randn(600, 4) * 2 + np.array([2., 1., 0., -1.])   # piled on class 0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    target = np.array([0.4, 0.3, 0.2, 0.1]) * 600
    refined = darp_projection(probs, target)
    np.testing.assert_allclose(refined.sum(1), 1., rtol=1e-5)           # distributions
    np.testing.assert_allclose(refined.sum(0), target, rtol=2e-3)       # the target's counts
    assert abs(probs.sum(0)[0] - target[0]) > 40                        # which they were not


def test_darp_projection_leaves_a_matching_pool_confident_images_alone():
    # Two images, one class each, target one image per class: nothing to move.
    refined = darp_projection(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([1., 1.]), alpha=1.)
    assert refined.argmax(1).tolist() == [0, 1] and refined[0, 0] > 0.99 and refined[1, 1] > 0.99


def identity(x, training=False):
    return x


def test_darp_pseudo_labels_and_masks_follow_the_refined_distribution():
    darp = algorithms.ALGORITHMS['darp']()
    weak = tf.math.log(tf.constant([[0.97, 0.03], [0.6, 0.4], [0.96, 0.04], [0.99, 0.01]]))
    # Pool images 5 and 3 were refined (towards class 1: confidently, and not); 0 and 1 not yet.
    refined = np.zeros([6, 2], np.float32)
    refined[5], refined[3] = [0.02, 0.98], [0.3, 0.7]
    batch = Batch(tf.constant([[2., 0.]]), tf.constant([0]), (weak, weak), tf.constant(1.),
                  tf.random.Generator.from_seed(0), tf.constant(.9),
                  state={'refined': tf.constant(refined)},
                  unlabeled_index=tf.constant([5, 0, 1, 3]))
    out = darp(identity, None, batch)
    # Masks on the refined distribution where there is one (0.98, -, -, 0.7), else on the base's
    # own (-, 0.6, 0.96, -), against 0.95 (the authors' train_fix): labels 1, -, 0, -; image 3,
    # confident before the projection (0.99), is dropped.
    expected = (-np.log(0.03) - np.log(0.96)) / 4
    np.testing.assert_allclose(float(out.unlabeled), expected, rtol=1e-5)
    np.testing.assert_allclose(float(out.metrics['mask']), 2 / 4, rtol=1e-6)


def test_pool_passes_follow_the_papers_interval_at_most_once_an_epoch_of_the_pool():
    """core/pool.pass_due: the paper's interval where the run is long (USB's length: SAW's 1/256
    of training), one epoch of the pool where that is sparser (a CPU-sized run), as given where
    a flag gives it; never at step 0; from the start fraction (or one interval) on."""
    from ssl_ema.core.pool import pass_due, pass_interval
    saw, adsh = algorithms.ALGORITHMS['saw'](), algorithms.ALGORITHMS['adsh']()
    # USB's length, 262,144 steps of 64 unlabeled images over a 7,443-image pool: 1/256.
    assert pass_interval(saw, 262144, 7443, 64) == 1024
    # A CPU-sized run of 1024 steps: 1/256 would be every 4 steps; an epoch of the pool is 117.
    assert pass_interval(saw, 1024, 7443, 64) == pass_interval(adsh, 1024, 7443, 64) == 117
    assert pass_interval(algorithms.ALGORITHMS['saw'](reweight_every_fraction=1 / 256),
                         1024, 7443, 64) == 4
    due = [s for s in range(1025) if pass_due(saw, s, 1024, 7443, 64)]
    assert due == list(range(117, 1025, 117))
    darp = algorithms.ALGORITHMS['darp']()   # from 40% of training: step 410, every 117
    assert pass_interval(darp, 262144, 7443, 64) == 117   # 10 steps, at most once a pool epoch
    assert [s for s in range(1025) if pass_due(darp, s, 1024, 7443, 64)][:3] == [410, 527, 644]
    openmatch = algorithms.ALGORITHMS['openmatch']()   # from 10/512: step 20
    assert [s for s in range(400) if pass_due(openmatch, s, 1024, 20000, 128)] == [20, 177, 334]
    assert not pass_due(algorithms.ALGORITHMS['fixmatch'](), 512, 1024, 7443, 64)
    assert not pass_due(algorithms.ALGORITHMS['darp'](start_fraction=0.), 0, 1024, 7443, 64)


def test_abc_masks_by_hand():
    prior = tf.constant([0.5, 0.3, 0.2])
    np.testing.assert_allclose(abc_keep_probability(prior, tf.constant([0, 1, 2])),
                               [0.4, 2 / 3, 1.], rtol=1e-6)
    # Pseudo-labels half way through training: 1 - 0.5 * (1 - ratio).
    np.testing.assert_allclose(abc_keep_probability(prior, tf.constant([0, 2]), 0.5), [0.7, 1.],
                               rtol=1e-6)
    # Over many labeled images of the head class, about 40% count.
    rng = tf.random.Generator.from_seed(1)
    labels = tf.zeros([4000], tf.int32)
    logits = tf.zeros([4000, 3])
    labeled, _, _ = abc_loss((logits, logits[:1], logits[:1]), labels, prior, 0., rng, 0.95)
    assert abs(float(labeled) / np.log(3) - 0.4) < 0.03


def test_abc_loss_with_a_balanced_prior_is_fixmatch_on_its_head():
    prior = tf.constant([0.5, 0.5])   # every keep probability is 1
    labeled_logits = tf.math.log(tf.constant([[0.8, 0.2]]))
    weak = tf.math.log(tf.constant([[0.97, 0.03], [0.7, 0.3]]))
    strong = tf.math.log(tf.constant([[0.5, 0.5], [0.1, 0.9]]))
    labeled, unlabeled, mask = abc_loss((labeled_logits, weak, strong), tf.constant([0]), prior,
                                        0.5, tf.random.Generator.from_seed(0), 0.95)
    np.testing.assert_allclose(float(labeled), -np.log(0.8), rtol=1e-5)
    np.testing.assert_allclose(mask, [1., 0.])
    np.testing.assert_allclose(float(unlabeled), -np.log(0.5) / 2, rtol=1e-5)


def test_an_unsupported_base_is_refused_by_name():
    for name in ('abc', 'darp'):
        with pytest.raises(ConfigError, match='--base_algorithm=mixmatch .* valid: fixmatch, '
                                              'remixmatch$'):
            algorithms.ALGORITHMS[name](base_algorithm='mixmatch')


def test_the_bases_defaults_and_run_names():
    """lambda_u follows the base (FixMatch's 1, ReMixMatch's w_match 1.5) unless given; a run
    directory is named by what differs from its base's defaults, so a FixMatch-based run keeps
    its name."""
    cfg = TrainConfig(algorithm='abc')
    for name in ('abc', 'darp'):
        cls = algorithms.ALGORITHMS[name]
        fix, remix = cls(), cls(base_algorithm='remixmatch')
        assert (fix.consistency_weight, remix.consistency_weight) == (1., 1.5)
        assert (fix.views, fix.ramp_up, remix.views, remix.ramp_up) == (
            ('weak', 'strong'), 'none', ('weak', 'strong', 'strong'), 'linear')
        assert cls(base_algorithm='remixmatch', consistency_weight=2.).consistency_weight == 2.
        names = [run_dir.default_train_dir(cfg, a, 'small_cnn').rsplit('/', 1)[1] for a in (
            fix, remix, cls(consistency_weight=1.5))]
        assert names == [f'{name}_small_cnn', f'{name}_small_cnn_base_algorithmremixmatch',
                         f'{name}_small_cnn_consistency_weight1.5']
    assert algorithms.ALGORITHMS['abc'](base_algorithm='remixmatch').heads == {
        'imbalanced': 0, 'rotation': 4}


def test_remixmatch_p_y_starts_at_the_labeled_class_distribution():
    """ReMixMatch's p(y) (and so ABC's and DARP's on it) starts at the labeled set's class
    distribution (USB's 'gt' target): uniform only where the labels are; p~(y) starts uniform."""
    prior = np.linspace(1., 4., 10) / 25
    for algorithm in (algorithms.ALGORITHMS['remixmatch'](),
                      algorithms.ALGORITHMS['darp'](base_algorithm='remixmatch')):
        state = base.initial_state(algorithm, 10, 16, labeled_prior=prior)
        np.testing.assert_allclose(state['p_data'], prior, rtol=1e-6)
        np.testing.assert_allclose(state['p_model'], 0.1)
        np.testing.assert_allclose(base.initial_state(algorithm, 10, 16)['p_data'], 0.1)
    assert not base.starts_at_prior(algorithms.ALGORITHMS['fixmatch']().state(10, 16))


def remixmatch_batch(algorithm, heads, seed=0, **state):
    """A tiny batch for a method on ReMixMatch: 4 labeled, 8 unlabeled images in its 3 views."""
    x = lambda n, i=0: tf.random.stateless_uniform((n, 8, 8, 1), [seed, n + i])  # noqa: E731
    initial = base.initial_state(algorithm, 10, 16, labeled_prior=np.linspace(1., 4., 10) / 25)
    return Batch(x(4), tf.constant([0, 3, 6, 9]), tuple(x(8, i) for i in range(3)),
                 tf.constant(0.5), tf.random.Generator.from_seed(seed), tf.constant(0.5),
                 state=dict(initial, **{k: tf.constant(v) for k, v in state.items()}),
                 unlabeled_index=tf.range(8) if algorithm.needs_indices else None, heads=heads)


def student_with_heads(heads):
    tf.keras.utils.set_random_seed(0)
    student = backbones.build('small_cnn', (8, 8, 1), 10)
    return student, base.with_heads(student, heads)


def assert_losses_equal(out, labeled, unlabeled, state):
    np.testing.assert_allclose(float(out.labeled), float(labeled), rtol=1e-5)
    np.testing.assert_allclose(float(out.unlabeled), float(unlabeled), rtol=1e-5)
    for key, value in state.items():
        np.testing.assert_allclose(out.state[key], value, rtol=1e-5, atol=1e-7)


def test_abc_on_remixmatch_is_remixmatch_on_its_head_plus_abc_loss():
    """The base part is ReMixMatch's own loss (and alignment state) with head_imbalanced as its
    classifier; ABC's is abc_loss on the balanced output's un-mixed labeled images, weak view and
    first strong view, its masks drawn after ReMixMatch's mixup and rotations."""
    abc = algorithms.ALGORITHMS['abc'](base_algorithm='remixmatch', abc_threshold=0.)
    student, heads = student_with_heads(abc.heads)
    out = abc(student, None, remixmatch_batch(abc, heads))
    # ReMixMatch on a model whose classifier is head_imbalanced (outputs 1 and 2 of `heads`)
    imbalanced = keras.Model(heads.inputs, heads.outputs[1])
    batch = remixmatch_batch(abc, keras.Model(heads.inputs, heads.outputs[1:]))
    remix = algorithms.ALGORITHMS['remixmatch']()(imbalanced, None, batch)
    weak, first = batch.unlabeled[:2]
    labeled, unlabeled, mask = abc_loss(
        (call_keeping_statistics(student, batch.labeled_x), call_keeping_statistics(student, weak),
         call_keeping_statistics(student, first)), batch.labels, batch.state['labeled_prior'],
        0.5, batch.rng, 0.)
    assert 0 < float(tf.reduce_mean(mask)) < 1 and float(unlabeled) > 0   # a live ABC term
    assert_losses_equal(out, remix.labeled + labeled, remix.unlabeled + unlabeled, remix.state)
    np.testing.assert_allclose(float(out.metrics['mixed']), float(remix.metrics['mixed']),
                               rtol=1e-5)


def test_darp_on_remixmatch_refines_the_aligned_sharpened_guess():
    """From the pool: ReMixMatch's guess of each image (aligned by p(y) / mean p~(y), sharpened
    with T = 1/2), by hand, is what the projection refines. In the loss: the refined rows replace
    ReMixMatch's guess (mixup and pre-mixup targets), the others keep it."""
    darp = algorithms.ALGORITHMS['darp'](base_algorithm='remixmatch')
    probs = np.random.RandomState(0).dirichlet(np.ones(10), 40).astype(np.float32)
    p_data, p_model = np.linspace(1., 4., 10) / 25, np.full([128, 10], 0.1)
    p_model[-1] = np.linspace(4., 1., 10) / 25          # the window's mean: not uniform
    state = {'p_data': p_data, 'p_model': p_model, 'labeled_prior': p_data}
    aligned = probs * p_data / p_model.mean(0)
    aligned /= aligned.sum(1, keepdims=True)
    guess = aligned ** 2 / (aligned ** 2).sum(1, keepdims=True)
    np.testing.assert_allclose(darp.from_pool(probs, state, 0.9)['refined'],
                               darp_projection(guess, p_data * 40), rtol=1e-4, atol=1e-6)
    student, heads = student_with_heads(darp.heads)
    refined = np.zeros([16, 10], np.float32)
    refined[[1, 6]] = np.linspace(1., 0., 10) / 5.5     # two refined images, soft targets
    out = darp(student, None, remixmatch_batch(darp, heads, refined=refined))
    remix = algorithms.ALGORITHMS['remixmatch']()
    batch = remixmatch_batch(remix, heads)
    guess, new_state = remix.student_guess(student, None, batch)
    target = tf.where(tf.constant([i in (1, 6) for i in range(8)])[:, None], refined[:8], guess)
    xe, unlabeled, _ = remix.anchored(student, batch, target)
    assert_losses_equal(out, xe, unlabeled, new_state)
    assert float(out.metrics['refined_changed']) > 0
    unrefined = remix(student, None, remixmatch_batch(remix, heads))
    assert abs(float(unrefined.unlabeled) - float(out.unlabeled)) > 1e-4


@pytest.mark.parametrize('name', ['abc', 'darp'])
def test_interrupted_run_on_remixmatch_resumes_exactly(name, digits_data, tmp_path):
    """On ReMixMatch the state is also its alignment distributions and rotation head (ABC: beside
    head_imbalanced; DARP: with its refined pool): a resumed run ends where a straight one does."""
    cfg = tiny_config(algorithm=name, train_steps=4, eval_every_kimg=0.0625, log_every_steps=2,
                      uratio=1)
    algorithm = algorithms.ALGORITHMS[name](
        base_algorithm='remixmatch', **(dict(refine_every_steps=2, start_fraction=0.3)
                                        if name == 'darp' else dict(abc_threshold=0.)))
    straight, resumed, _ = straight_and_resumed(cfg, algorithm, digits_data, tmp_path, 2)
    assert_resumed_exactly(straight, resumed)
    if name == 'darp':
        assert np.array(straight.state['refined']).sum() > 0   # it did refine


def test_interrupted_darp_resumes_to_the_same_weights_and_state(digits_data, tmp_path):
    """DARP's refined pool (refinements before and after the stop, each a pass over the pool)
    comes back from the checkpoint: a resumed run ends where a straight one does. (ABC's state
    is its head and the run's generator, which ReMixMatch's resume test covers.)"""
    cfg = tiny_config(algorithm='darp', train_steps=6, eval_every_kimg=0.0625, log_every_steps=2)
    algorithm = algorithms.ALGORITHMS['darp'](refine_every_steps=2, start_fraction=0.3,
                                              confidence_threshold=0.2)
    straight, resumed, _ = straight_and_resumed(cfg, algorithm, digits_data, tmp_path, 4)
    assert_resumed_exactly(straight, resumed)
    assert np.array(straight.state['refined']).sum() > 0   # it did refine
