"""ABC and DARP (algorithms/abc.py, darp.py): their masks, projection and pseudo-labels by hand,
and their state through an interrupted run."""
import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_resumed_exactly, straight_and_resumed, tiny_config
from ssl_ema import algorithms
from ssl_ema.algorithms import Batch
from ssl_ema.algorithms.abc import abc_keep_probability, abc_loss
from ssl_ema.algorithms.darp import darp_projection
from ssl_ema.base.errors import ConfigError


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


def test_darp_pseudo_labels_follow_the_refined_distribution():
    darp = algorithms.ALGORITHMS['darp']()
    weak = tf.math.log(tf.constant([[0.97, 0.03], [0.6, 0.4], [0.96, 0.04]]))
    # Image 0 of the batch (pool index 5) was refined towards class 1; the others not yet.
    refined = np.zeros([6, 2], np.float32)
    refined[5] = [0.2, 0.8]
    batch = Batch(tf.constant([[2., 0.]]), tf.constant([0]), (weak, weak), tf.constant(1.),
                  tf.random.Generator.from_seed(0), tf.constant(.9),
                  state={'refined': tf.constant(refined)}, unlabeled_index=tf.constant([5, 0, 1]))
    out = darp(identity, None, batch)
    # Masks from the base's own confidence (0.97, 0.6, 0.96 against 0.95); labels 1, -, 0.
    expected = (-np.log(0.03) - np.log(0.96)) / 3
    np.testing.assert_allclose(float(out.unlabeled), expected, rtol=1e-5)
    np.testing.assert_allclose(float(out.metrics['mask']), 2 / 3, rtol=1e-6)


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
        with pytest.raises(ConfigError, match='--base_algorithm=mixmatch .* valid: fixmatch'):
            algorithms.ALGORITHMS[name](base_algorithm='mixmatch')


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
