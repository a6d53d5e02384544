"""OpenMatch and IOMatch (algorithms/openmatch.py, iomatch.py): their one-vs-all losses, open-set
targets, inlier selection and unknown scores by hand; the averaged heads; OpenMatch's state
through an interrupted run; the unknown score of the export and of predict."""
import csv
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import quiet, straight_and_resumed, tiny_config, weights_of
from ssl_ema import algorithms
from ssl_ema.algorithms import Batch
from ssl_ema.algorithms.iomatch import open_set_targets
from ssl_ema.algorithms.openmatch import inlier_fixmatch, select_inliers
from ssl_ema.nn import open_set
from ssl_ema.nn.heads import OneVsAll, OpenSetProjection, unknown_score, with_heads

LN = np.log


def ova(outlier_logits, inlier_logits):
    """One-vs-all logits [N, 2K]: the outlier row, then the inlier row (OneVsAll's layout)."""
    return tf.constant(np.concatenate([outlier_logits, inlier_logits], -1), tf.float32)


def test_ova_loss_takes_the_hardest_negative():
    # Class 0's pair (0, ln 3): p(inlier) 3/4. Class 1: (0, ln 3) too, p(outlier) 1/4, -log 4;
    # class 2: (0, ln 1/3), p(outlier) 3/4, -log 3/4. Label 0: -log 3/4 + max(log 4, log 4/3).
    logits = ova([[0., 0., 0.]], [[LN(3.), LN(3.), LN(1 / 3)]])
    np.testing.assert_allclose(float(open_set.ova_loss(logits, tf.constant([0]))),
                               -LN(0.75) + LN(4.), rtol=1e-5)


def test_soft_open_set_consistency_and_entropy_by_hand():
    view1, view2 = ova([[0.]], [[LN(3.)]]), ova([[0.]], [[0.]])   # (1/4, 3/4) and (1/2, 1/2)
    np.testing.assert_allclose(float(open_set.soft_open_set_consistency(view1, view2)),
                               (0.25 - 0.5) ** 2 + (0.75 - 0.5) ** 2, rtol=1e-5)
    np.testing.assert_allclose(float(open_set.ova_entropy(view1)),
                               -(0.25 * LN(0.25) + 0.75 * LN(0.75)), rtol=1e-5)


def test_iomatch_open_set_targets_by_hand():
    q = open_set_targets(tf.constant([[0.6, 0.4]]), tf.constant([[0.2, 0.5]]))
    np.testing.assert_allclose(q, [[0.48, 0.2, 0.32]], rtol=1e-6)


def fake_heads(k, width):
    """A 'model with heads' whose input rows are its outputs: [logits K | head output]."""
    return lambda x, training=False: [x[:, :k], x[:, k:k + width]]


def test_iomatch_loss_by_hand():
    k = 2
    logit = lambda o: LN(o / (1 - o))   # noqa: E731 the outlier logit of p(outlier) o, inlier 0
    labeled = np.r_[LN([0.8, 0.2]), 0., 0., LN(3.), 0., 0., 0., 0.]
    weak = np.r_[LN([0.97, 0.03]), logit(0.2), logit(0.5), 0., 0., 0., 0., 0.]
    strong = np.r_[LN([0.5, 0.5]), 0., 0., 0., 0., LN([0.5, 0.25, 0.25])]
    batch = Batch(tf.constant([labeled], tf.float32), tf.constant([0]),
                  (tf.constant([weak], tf.float32), tf.constant([strong], tf.float32)),
                  tf.constant(1.), tf.random.Generator.from_seed(0), tf.constant(0.5),
                  heads=fake_heads(k, 3 * k + 1))
    out = algorithms.ALGORITHMS['iomatch']()(None, None, batch)
    np.testing.assert_allclose(float(out.labeled), -LN(0.8) - LN(0.75) + LN(2.), rtol=1e-5)
    # Outlier score 0.97 * 0.2 + 0.03 * 0.5 = 0.209 < 0.5 and max p 0.97: a closed-set target;
    # q = (0.776, 0.015, 0.209), max 0.776 >= 0.5: an open-set target.
    opened = -(0.776 * LN(0.5) + 0.015 * LN(0.25) + 0.209 * LN(0.25))
    np.testing.assert_allclose(float(out.unlabeled), LN(2.) + opened, rtol=1e-5)
    # Before 1/256 of training the open-set term is off.
    batch.progress = tf.constant(0.001)
    early = algorithms.ALGORITHMS['iomatch']()(None, None, batch)
    np.testing.assert_allclose(float(early.unlabeled), LN(2.), rtol=1e-5)


def test_openmatch_selects_inliers_and_trains_fixmatch_on_them_alone():
    assert select_inliers(np.array([0.1, 0.5, 0.7, 0.49])).tolist() == [1., 0., 0., 1.]
    weak = tf.math.log(tf.constant([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))
    strong = tf.math.log(tf.constant([[0.5, 0.5], [0.1, 0.9], [0.25, 0.75]]))
    loss, mask = inlier_fixmatch(weak, strong, tf.constant([1., 0., 1.]), 0.)
    np.testing.assert_allclose(mask, [1., 0., 1.])
    np.testing.assert_allclose(float(loss), -(LN(0.5) + LN(0.25)) / 2, rtol=1e-5)
    # From the pool pass: the unknown scores choose the state, none before the first pass.
    openmatch = algorithms.ALGORITHMS['openmatch']()
    new = openmatch.from_pool(np.zeros([3, 2]), {}, 0.5, unknown=np.array([0.2, 0.9, 0.4]))
    assert new['inlier'].tolist() == [1., 0., 1.]
    assert openmatch.state(2, 3)['inlier'].initial == 0.


def test_unknown_scores_by_hand():
    logits = tf.constant([[2., 1.], [0., 3.]])   # predicted classes 0 and 1
    outputs = ova([[LN(3.), 0.], [0., LN(1 / 3)]], [[0., 0.], [0., 0.]])
    # p(outlier) of class 0 in image 0: 3/4; of class 1 in image 1: 1/4.
    np.testing.assert_allclose(unknown_score(OneVsAll(), logits, outputs), [0.75, 0.25],
                               rtol=1e-5)
    # IOMatch: q = (0.2, 0.2, 0.6) and (0.3, 0.3, 0.4): q_3 / (q_3 + max(q_1, q_2)) = 0.75 and
    # 0.4 / 0.7, above 0.5 though q_3 is 0.4: "unknown" is the arg-max, so the image is unknown.
    open_logits = tf.constant([[0.] * 4 + [LN(0.2), LN(0.2), LN(0.6)],
                               [0.] * 4 + [LN(0.3), LN(0.3), LN(0.4)]])
    np.testing.assert_allclose(unknown_score(OpenSetProjection(), logits, open_logits),
                               [0.75, 0.4 / 0.7], rtol=1e-5)


def test_the_averages_carry_an_open_set_algorithms_heads():
    from ssl_ema.core.ema import EMA
    from ssl_ema.nn import backbones
    student = backbones.build('small_cnn', (8, 8, 1), 3)
    heads = {'ova': OneVsAll()}
    student_heads = with_heads(student, heads)
    ema = EMA(student, decay=0.5)
    ema.carry_heads(student_heads, heads)
    kernel = student_heads.get_layer('head_ova').kernel
    before = np.array(kernel)
    np.testing.assert_array_equal(np.array(ema.heads.get_layer('head_ova').kernel), before)
    kernel.assign(kernel + 1.)
    ema.update()
    np.testing.assert_allclose(np.array(ema.heads.get_layer('head_ova').kernel), before + 0.5,
                               rtol=1e-6)
    assert len(ema.heads.outputs) == 2 and ema.heads.outputs[1].shape[-1] == 6


@pytest.fixture(scope='module')
def interrupted_openmatch(digits_data, tmp_path_factory):
    """OpenMatch stopped at step 4 of 6 and resumed, and the same run straight; selections at
    steps 2 and 4 (one before the stop, one redone after it)."""
    tmp_path = tmp_path_factory.mktemp('openmatch')
    cfg = tiny_config(algorithm='openmatch', train_steps=6, eval_every_kimg=0.0625,
                      log_every_steps=2)
    algorithm = algorithms.ALGORITHMS['openmatch'](select_every_fraction=1 / 3,
                                                   start_fraction=0.3)
    straight, resumed, _ = straight_and_resumed(cfg, algorithm, digits_data, tmp_path, 4)
    return straight, resumed, tmp_path


def test_interrupted_openmatch_resumes_to_the_same_weights_heads_and_selection(
        interrupted_openmatch):
    straight, resumed, _ = interrupted_openmatch
    def everything(t):
        return (weights_of(t.student) + [np.array(v) for v in t.head_variables]
                + [np.array(v) for v in t.ema.head_variables] + [np.array(t.state['inlier'])])
    for a, b in zip(everything(straight), everything(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The EMA's head is an average, not the student's head.
    assert not np.allclose(np.array(straight.ema.head_variables[0]),
                           np.array(straight.head_variables[0]))
    assert np.array(straight.state['inlier']).sum() > 0   # it did select


def test_the_export_and_predict_give_the_emas_unknown_score(digits_data, tmp_path):
    from conftest import run
    from ssl_ema import predict
    from ssl_ema.core import accuracy, classifier
    from ssl_ema.core.loop import Trainer
    train_dir = str(tmp_path / 'run')
    cfg = tiny_config(algorithm='openmatch', train_steps=6, eval_every_kimg=0.0625,
                      log_every_steps=2, train_dir=train_dir)
    algorithm = algorithms.ALGORITHMS['openmatch'](select_every_fraction=1 / 3,
                                                   start_fraction=0.3)
    run(cfg, algorithm)   # as ssl_ema.train makes it: a run directory, exported at its end
    straight = Trainer(cfg, algorithm, digits_data, train_dir)   # its models, restored
    assert straight.restore() == 6
    model = classifier.load_classifier(classifier.export_run(train_dir, log=quiet))
    images = digits_data.arrays.x_test[:20]
    probabilities, unknown = model.outputs(images)
    x = straight.eval_arrays['test'][0][:20]
    _, expected = accuracy.predictions(straight.scores['ema'], x)
    np.testing.assert_allclose(unknown, expected, rtol=1e-4, atol=1e-5)
    assert model.open_set and probabilities.shape == (20, 10)
    saved = classifier.load_classifier(os.path.join(train_dir, 'export', 'saved_model'))
    np.testing.assert_allclose(saved.unknown(images), expected, rtol=1e-4, atol=1e-5)
    npz = tmp_path / 'x.npz'
    np.savez(npz, x=images)
    out = str(tmp_path / 'p.csv')
    predict.predict(predict.PredictConfig(model=os.path.join(train_dir, 'export'),
                                          input=str(npz), out=out, top_k=1), log=quiet)
    rows = list(csv.DictReader(open(out)))
    np.testing.assert_allclose([float(r['unknown']) for r in rows], expected, atol=1e-5)
