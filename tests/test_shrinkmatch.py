"""ShrinkMatch: the shrunk class set, its loss and both re-weightings on hand-worked values, its
auxiliary head, and a run with mixed precision, the EMA teacher and a custom backbone."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import logged_values, tiny_config
from ssl_ema import algorithms
from ssl_ema.algorithms import Batch, base
from ssl_ema.algorithms.shrinkmatch import shrunk_loss
from ssl_ema.core.loop import Trainer
from ssl_ema.nn import backbones


def lse(*v):
    return math.log(sum(math.exp(x) for x in v))


def test_shrunk_class_set_and_its_weight():
    # tau .9. Image 0: removing the 2nd, then the 3rd class gives .5/.7 = .71, .5/.6 = .83, then
    # removing the 4th too .5/.54 = .93: classes {1st, 5th} are kept, weight max q = .5.
    # Image 1 is certain (.96). Image 2 shrinks down to {1st, 5th}, .3/.4 = .75 < .9: weight 0.
    # Its classes are in a shuffled order, to be sorted by q.
    probs = tf.constant([[.5, .3, .1, .06, .04], [.96, .01, .01, .01, .01],
                         [.2, .1, .3, .15, .25]])
    logits = tf.constant([[0., .2, .4, .6, .8], [1., 2., 3., 4., 5.], [9., 9., 9., 9., 9.]])
    loss, cut = shrunk_loss(probs, logits, .9)
    np.testing.assert_array_equal(cut, [4, 5, 4])   # the sorted position of the first kept class
    np.testing.assert_allclose(float(loss), .5 * (lse(0., .8) - 0.) / 3, rtol=1e-6)
    # tau .8: image 0 stops one class earlier, {1st, 4th, 5th}; image 2 still never reaches it
    loss, cut = shrunk_loss(probs, logits, .8)
    np.testing.assert_array_equal(cut, [3, 5, 4])
    np.testing.assert_allclose(float(loss), .5 * (lse(0., .6, .8) - 0.) / 3, rtol=1e-6)


def authors_shrunk_loss(probs, logits, threshold):
    """A transcription of the authors' per-image, per-class loop (LiheYoung/ShrinkMatch
    CIFAR/shrinkmatch.py, shrink_loss) in float64: for each uncertain image, remove the classes
    ranked 2..c-1 for c = 2, 3, ... until the top-1's confidence among the rest reaches the
    threshold or c is the last class; cross-entropy to the top-1 over the kept classes, times
    max q and whether the threshold was reached; summed, then divided by B (their train)."""
    total = 0.
    for q, z in zip(probs, logits):
        order = np.argsort(-q, kind='stable')
        q, z = q[order], z[order]
        if q[0] >= threshold:
            continue
        for c in range(2, len(q)):
            shrunk = q[0] / (q[0] + q[c:].sum())
            if shrunk >= threshold or c == len(q) - 1:
                kept = np.concatenate([z[:1], z[c:]])
                total += (lse(*kept) - z[0]) * q[0] * (shrunk >= threshold)
                break
    return total / len(probs)


def test_vectorised_shrinking_equals_the_authors_loop_on_random_batches():
    rng = np.random.default_rng(0)
    for _ in range(40):
        classes = int(rng.integers(2, 12))
        probs = rng.dirichlet(np.full(classes, rng.uniform(.1, 2.)), 6)
        logits = rng.normal(size=(6, classes))
        threshold = float(rng.uniform(.3, .97))
        loss, _ = shrunk_loss(tf.constant(probs, tf.float32), tf.constant(logits, tf.float32),
                              threshold)
        np.testing.assert_allclose(float(loss), authors_shrunk_loss(probs, logits, threshold),
                                   rtol=1e-4, atol=1e-6)


def test_loss_and_certain_ratio_on_a_tiny_batch():
    """No alignment (window 0), so q is the weak view's softmax: image 0 is certain and trains
    the strong view with its soft q; image 1 (.6, .3, .06, .04) shrinks to {1st, 4th} (.6/.64 =
    .94 >= .9) and its auxiliary head's logits (2 x the strong view's) learn class 0 there."""
    def fake_heads(x, training=False):
        return [x, 2. * x]
    algorithm = algorithms.ALGORITHMS['shrinkmatch'](confidence_threshold=.9, prediction_window=0)
    q = np.array([[.95, .03, .01, .01], [.6, .3, .06, .04]])
    strong = np.array([[0., 1., 0., 0.], [1., 0., 0., 2.]], np.float32)
    log_softmax = strong[0] - lse(*strong[0])
    pseudo = -(q[0] * log_softmax).sum() / 2
    shrink = .6 * (lse(2., 4.) - 2.) / 2
    # the first batch's share, then the moving average
    for old, ratio in [(-1., .5), (.2, .999 * .2 + .001 * .5)]:
        state = base.initial_state(algorithm, 4, 8)
        state['certain_ratio'] = tf.constant(old)
        batch = Batch(tf.constant([[5., 0., 0., 0.]]), tf.constant([0]),
                      (tf.constant(np.log(q), tf.float32), tf.constant(strong)),
                      tf.constant(1.), tf.random.Generator.from_seed(0), state=state,
                      heads=fake_heads)
        out = algorithm(None, None, batch)
        np.testing.assert_allclose(float(out.metrics['pseudo_label']), pseudo, rtol=1e-5)
        np.testing.assert_allclose(float(out.metrics['shrunk']), shrink, rtol=1e-5)
        np.testing.assert_allclose(float(out.state['certain_ratio']), ratio, rtol=1e-6)
        np.testing.assert_allclose(float(out.unlabeled), pseudo + ratio * shrink, rtol=1e-5)
        assert float(out.metrics['removed_classes']) == 2.


@pytest.mark.parametrize('precision', ['float32', 'mixed_bfloat16'])
def test_auxiliary_head_is_the_authors_mlp(precision):
    model = backbones.build('small_cnn', (8, 8, 1), 10, precision=precision)
    heads = base.with_heads(model, algorithms.ALGORITHMS['shrinkmatch']().heads)
    kernels = [heads.get_layer(name).kernel.shape for name in
               ('head_auxiliary_hidden0', 'head_auxiliary_hidden1', 'head_auxiliary')]
    assert kernels == [(128, 32), (32, 32), (32, 10)]
    assert heads.get_layer('head_auxiliary_bn1').momentum == 0.9
    logits, auxiliary = heads(np.zeros((2, 8, 8, 1), np.float32))
    assert auxiliary.shape == (2, 10) and auxiliary.dtype == 'float32'


def test_runs_with_mixed_precision_ema_teacher_and_a_custom_backbone(digits_data, tmp_path):
    keras.utils.set_random_seed(0)   # the backbone's initial confidences, whatever ran before
    own = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation='relu'),
                            keras.layers.Conv2D(8, 3)], name='own')
    cfg = tiny_config(algorithm='shrinkmatch', train_steps=3, eval_every_kimg=0.046875,
                      log_every_steps=1, precision='mixed_bfloat16', backbone_scale='0.0039')
    # tau .15: the fresh EMA model's confidences (seeded above) straddle it, so some images are
    # certain and the others' spaces shrink from the first step (with none certain the ratio is 0)
    trainer = Trainer(cfg, algorithms.ALGORITHMS['shrinkmatch'](teacher='ema',
                                                                confidence_threshold=.15),
                      digits_data, str(tmp_path), backbone=own)
    auxiliary = trainer.heads.get_layer('head_auxiliary').kernel   # only the shrunk loss trains it
    before = np.array(auxiliary)
    logged = []
    trainer.train(log=logged.append)
    unlabeled = logged_values(logged, 'unlabeled')
    assert len(unlabeled) == 3 and all(np.isfinite(unlabeled)) and len(set(unlabeled)) == 3
    assert np.abs(before - auxiliary).max() > 0
    ratio = float(trainer.state['certain_ratio'])
    assert 0. < ratio < 1.
