"""CRMatch: its pseudo-label, feature-distance and rotation terms on hand-worked values, its heads
on the feature map and the pooled features found by name, and a run with mixed precision, the
EMA teacher and a custom backbone."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import logged_values, tiny_config
from ssl_ema import algorithms
from ssl_ema.algorithms import Batch, base
from ssl_ema.algorithms.crmatch import feature_distance
from ssl_ema.core.loop import Trainer
from ssl_ema.nn import backbones


def fake_heads(x, training=False):
    """2 x 2 images read as v = [top-left, top-right, bottom-left, bottom-right]: logits v[:2],
    rotation logits v, feature-map vector v[2:]."""
    v = tf.reshape(x, [-1, 4])
    return [v[:, :2], v, v[:, 2:]]


def image(*v):
    return np.reshape(np.array(v, np.float32), (2, 2, 1))


def lse(v):
    return math.log(sum(math.exp(x) for x in v))


def test_feature_distance_counts_only_masked_pairs_that_still_point_the_same_way():
    weak = tf.constant([[1., 0.], [1., 0.], [1., 1.], [0., 3.]])
    strong = tf.constant([[1., 1.], [-1., 0.], [2., 2.], [0., 1.]])
    # cosines .7071, -1 (-> 0), 1 (masked out), 1
    out = feature_distance(weak, strong, tf.constant([1., 1., 0., 1.]))
    np.testing.assert_allclose(float(out), (math.sqrt(.5) + 0. + 1.) / 4, rtol=1e-6)


def test_loss_on_a_tiny_batch():
    algorithm = algorithms.ALGORITHMS['crmatch']()   # tau 0.95, every weight 1
    weak = [image(4, 0, 1, 0), image(0, 0, 0, 1)]     # softmax([4, 0]) = .982: a pseudo-label 0
    strong = [image(0, 1, 1, 1), image(0, 0, 2, 0)]
    batch = Batch(tf.constant([image(1, 0, 0, 0)]), tf.constant([0]),
                  (tf.constant(weak), tf.constant(strong)), tf.constant(1.),
                  tf.random.Generator.from_seed(0), heads=fake_heads)
    out = algorithm(None, None, batch)
    np.testing.assert_allclose(float(out.labeled), lse([1, 0]) - 1, rtol=1e-5)
    assert float(out.metrics['mask']) == .5
    pseudo = lse([0, 1]) / 2                    # strong [0, 1] to class 0; the other masked out
    distance = math.sqrt(.5) / 2                # cos([1, 0], [1, 1]), masked in
    # the first weak image (as many as labeled ones) turned 0-3 quarter turns counter-clockwise,
    # [[4, 0], [1, 0]] -> [[0, 0], [4, 1]] -> [[0, 1], [0, 4]] -> [[1, 4], [0, 0]], labels 0-3
    rotation = (lse([4, 0, 1, 0]) - 4 + lse([0, 0, 4, 1]) - 0 + lse([0, 1, 0, 4]) - 0
                + lse([1, 4, 0, 0]) - 0) / 4
    np.testing.assert_allclose(float(out.metrics['pseudo_label']), pseudo, rtol=1e-5)
    np.testing.assert_allclose(float(out.metrics['feature_distance']), distance, rtol=1e-5)
    np.testing.assert_allclose(float(out.metrics['rotation']), rotation, rtol=1e-5)
    np.testing.assert_allclose(float(out.unlabeled), pseudo + distance + rotation, rtol=1e-5)


@pytest.mark.parametrize('precision', ['float32', 'mixed_bfloat16'])
def test_heads_read_the_feature_map_and_the_pooled_features(precision):
    """The feature-distance head flattens the map under the pooling (small_cnn: 2 x 2 x 128 on
    8 x 8 digits) to the features' width; the rotation head is an MLP on the pooled features; a
    backbone that returns features has its features as its map."""
    heads = algorithms.ALGORITHMS['crmatch']().heads
    flat = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten()], name='flat')
    for model, width, map_size in [
            (backbones.build('small_cnn', (8, 8, 1), 10, precision=precision), 128, 512),
            (backbones.build('auto', (8, 8, 1), 10, precision=precision, model=flat), 64, 64)]:
        with_heads = base.with_heads(model, heads)
        assert with_heads.get_layer('head_distance').kernel.shape == (map_size, width)
        assert with_heads.get_layer('head_rotation_hidden0').kernel.shape == (width, width)
        outputs = with_heads(np.zeros((2, 8, 8, 1), np.float32))
        assert [o.shape[-1] for o in outputs] == [10, 4, width]
        assert all(o.dtype == 'float32' for o in outputs)


def test_runs_with_mixed_precision_ema_teacher_and_a_custom_backbone(digits_data, tmp_path):
    own = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation='relu'),
                            keras.layers.Conv2D(8, 3)], name='own')
    cfg = tiny_config(algorithm='crmatch', train_steps=3, eval_every_kimg=0.046875,
                      log_every_steps=1, precision='mixed_bfloat16', backbone_scale='0.0039')
    logged = []
    # tau 0: every pseudo-label and feature-distance pair counts from the first step
    trainer = Trainer(cfg, algorithms.ALGORITHMS['crmatch'](teacher='ema',
                                                            confidence_threshold=0.),
                      digits_data, str(tmp_path), backbone=own)
    distance_head = trainer.heads.get_layer('head_distance').kernel   # only FeatDistLoss trains it
    assert distance_head.shape == (4 * 4 * 8, 8)   # the custom backbone's 4 x 4 x 8 map
    before = np.array(distance_head)
    trainer.train(log=logged.append)
    unlabeled = logged_values(logged, 'unlabeled')
    assert len(unlabeled) == 3 and all(np.isfinite(unlabeled)) and len(set(unlabeled)) == 3
    assert np.all(np.isfinite(distance_head)) and np.abs(before - distance_head).max() > 0
