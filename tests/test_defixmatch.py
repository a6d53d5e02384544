"""DeFixMatch: its debiased loss on hand-worked values, and a run through the pipeline's labeled
strong view with mixed precision, the EMA teacher and a custom backbone."""
import math

import keras
import numpy as np
import tensorflow as tf

from conftest import logged_values, tiny_config
from ssl_ema import algorithms
from ssl_ema.algorithms import Batch
from ssl_ema.core.loop import Trainer


def identity_student(x, training=False):
    """A 'model' whose logits are its inputs."""
    return x


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_loss_is_fixmatch_minus_fixmatch_on_the_labeled_images():
    algorithm = algorithms.ALGORITHMS['defixmatch']()   # tau 0.95, lambda 0.5
    labeled, labeled_strong = [[3., 0.], [.1, 0.]], [[0., 0.], [0., 0.]]
    weak, strong = [[0., 4.], [0., 0.]], [[1., 0.], [0., 0.]]
    batch = Batch(tf.constant(labeled), tf.constant([0, 1]), (tf.constant(weak),
                  tf.constant(strong)), tf.constant(1.), tf.random.Generator.from_seed(0),
                  labeled_views=(tf.constant(labeled_strong),))
    out = algorithm(identity_student, None, batch)
    # labeled: the mean of the weak and strong views' cross-entropies
    xe = (-(log_softmax(labeled)[0, 0] + log_softmax(labeled)[1, 1]) / 2 + math.log(2.)) / 2
    np.testing.assert_allclose(float(out.labeled), xe, rtol=1e-5)
    # softmax([0, 4]) = .982 and softmax([3, 0]) = .953 reach tau: one pseudo-label each
    assert float(out.metrics['mask']) == .5 and float(out.metrics['labeled_mask']) == .5
    pseudo = -log_softmax(strong)[0, 1] / 2       # class 1 against [1, 0]
    anti = math.log(2.) / 2                        # class 0 against [0, 0]
    np.testing.assert_allclose(float(out.metrics['pseudo_label']), pseudo, rtol=1e-5)
    np.testing.assert_allclose(float(out.metrics['labeled_pseudo_label']), anti, rtol=1e-5)
    np.testing.assert_allclose(float(out.unlabeled), .5 * (pseudo - anti), rtol=1e-5)


def test_runs_with_the_labeled_strong_view_mixed_precision_and_ema_teacher(digits_data,
                                                                           tmp_path):
    own = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation='relu'),
                            keras.layers.Conv2D(8, 3)], name='own')
    # the backbone sees pixels in [0, 1] (it brings no normalisation of its own)
    cfg = tiny_config(algorithm='defixmatch', train_steps=4, eval_every_kimg=0.0625,
                      log_every_steps=1, precision='mixed_bfloat16', backbone_scale='0.0039')
    logged = []
    # tau 0: every image counts, so both pseudo-label terms are live from the first step
    trainer = Trainer(cfg, algorithms.ALGORITHMS['defixmatch'](teacher='ema',
                                                               confidence_threshold=0.),
                      digits_data, str(tmp_path), backbone=own)
    trainer.train(log=logged.append)
    unlabeled = logged_values(logged, 'unlabeled')
    assert len(unlabeled) == 4 and all(np.isfinite(unlabeled)) and len(set(unlabeled)) == 4
