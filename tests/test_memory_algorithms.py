"""SimMatch and CoMatch, and the framework pieces they stand on: the projection head, labeled
views and indices, FIFO queues and row banks. Their math on hand-worked values, their state after
known updates, resuming, and a run with mixed precision, an EMA teacher and a custom backbone.
(Two replicas: tests/test_new_algorithms.py's batched subprocess; XLA: test_jit_compile.py.)"""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import (assert_resumed_exactly, logged_values, straight_and_resumed, tiny_config,
                      weights_of)
from ssl_ema import algorithms
from ssl_ema.algorithms import Batch, base
from ssl_ema.core import run_dir
from ssl_ema.core.ema import EMA
from ssl_ema.core.loop import Trainer
from ssl_ema.nn import backbones, memory
from test_new_algorithms import random_batch

MEMORY = ['simmatch', 'comatch']


# ---- the framework pieces -------------------------------------------------------------------

@pytest.mark.parametrize('precision', ['float32', 'mixed_bfloat16'])
def test_projection_head_is_a_unit_length_mlp_on_the_pooled_features(precision):
    student = backbones.build('small_cnn', (8, 8, 1), 10, precision=precision)
    heads = base.with_heads(student, {'projection': base.Projection(16)})
    logits, z = heads(np.random.RandomState(0).rand(3, 8, 8, 1).astype(np.float32))
    assert logits.shape == (3, 10) and z.shape == (3, 16) and z.dtype == tf.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1., rtol=1e-5)
    # on the 128 pooled features (not the logits, which mixed precision follows with a layer)
    assert heads.get_layer('head_projection_hidden').kernel.shape == (128, 128)
    assert heads.get_layer('head_projection').kernel.shape == (128, 16)
    new = [v for v in heads.trainable_variables
           if not any(v is w for w in student.trainable_variables)]
    assert [tuple(v.shape) for v in new] == [(128, 128), (128,), (128, 16), (16,)]


def test_heads_only_for_the_algorithms_that_ask(digits_data, tmp_path):
    """The student (its checkpoint, its export) is the classifier alone for every algorithm; the
    head variables the checkpoint adds exist only for the algorithms with heads, ReMixMatch's
    under the names today's run directories hold."""
    with_heads = {name for name, cls in algorithms.ALGORITHMS.items() if cls().heads}
    assert with_heads == {'remixmatch', 'simmatch', 'comatch', 'crmatch', 'shrinkmatch', 'abc',
                          'openmatch', 'iomatch', 'cossl', 'acr'}
    fixmatch = Trainer(tiny_config(), algorithms.ALGORITHMS['fixmatch'](), digits_data,
                       str(tmp_path / 'f'))
    simmatch = Trainer(tiny_config(), algorithms.ALGORITHMS['simmatch'](projection_units=8),
                       digits_data, str(tmp_path / 's'))
    assert fixmatch.heads is None and fixmatch.head_variables == []
    assert [v.shape for v in fixmatch.student.weights] == [v.shape for v in
                                                           simmatch.student.weights]
    assert [tuple(v.shape) for v in simmatch.head_variables] == [(128, 128), (128,), (128, 8),
                                                                 (8,)]
    remix = base.with_heads(backbones.build('small_cnn', (8, 8, 1), 10), {'rotation': 4})
    assert [layer.name for layer in remix.layers[-1:]] == ['head_rotation']


def test_labeled_views_and_indices_leave_the_labeled_batch_as_it_was(digits_data):
    plain = next(iter(digits_data.labeled(16, 3)))
    x, y, strong, index = next(iter(digits_data.labeled(16, 3, views=('strong',), indices=True)))
    np.testing.assert_array_equal(plain[0], x)   # bit-identical: the first view's seed is kept
    np.testing.assert_array_equal(plain[1], y)
    assert not np.allclose(x, strong)
    np.testing.assert_array_equal(
        y, digits_data.arrays.y_train[digits_data.split.labeled][index.numpy()])
    assert digits_data.labeled_size == 50 and index.numpy().max() < 50
    weak, medium, strong1, strong2 = next(iter(digits_data.unlabeled(
        8, ('weak', 'medium', 'strong', 'strong'))))
    # the two strong views of CoMatch are two draws; each view differs from the others
    for a, b in [(strong1, strong2), (weak, medium), (medium, strong1)]:
        assert not np.allclose(a, b)
    # views before the new ones keep their batches
    np.testing.assert_array_equal(weak, next(iter(digits_data.unlabeled(8, ('weak',))))[0])


def test_enqueue_wraps_over_the_oldest_rows():
    queue = tf.constant([[0.], [1.], [2.], [3.]])
    queue, pointer = base.enqueue(queue, tf.constant(3), tf.constant([[10.], [11.], [12.]]))
    np.testing.assert_array_equal(queue[:, 0], [11., 12., 2., 10.])
    assert int(pointer) == 2
    # more rows than the queue holds: the last ones win, deterministically
    queue, pointer = base.enqueue(queue, pointer, tf.constant([[20.], [21.], [22.], [23.], [24.]]))
    np.testing.assert_array_equal(queue[:, 0], [22., 23., 24., 21.])
    assert int(pointer) == 3


def test_scatter_last_writes_whole_rows_of_a_bank():
    bank = tf.zeros([3, 2])
    out = base.scatter_last(bank, tf.constant([2, 0, 2]), tf.constant([[1., 1.], [2., 2.],
                                                                      [3., 3.]]),
                            tf.constant([True, True, True]))
    np.testing.assert_array_equal(out, [[2., 2.], [0., 0.], [3., 3.]])


# ---- the memory math on hand-worked values --------------------------------------------------

def test_similarities_unfolding_and_aggregation():
    z = tf.constant([[1., 0.]])
    bank = tf.constant([[1., 0.], [0., 1.], [-1., 0.]])
    labels = tf.constant([0, 1, 1])
    q = memory.similarities(z, bank, 1.)
    e = math.e
    np.testing.assert_allclose(q, [[e / (e + 1 + 1 / e), 1 / (e + 1 + 1 / e),
                                    1 / e / (e + 1 + 1 / e)]], rtol=1e-5)
    p = tf.constant([[.25, .75]])
    # unfolding: q_k p[class(k)], normalised
    unfolded = np.array([e * .25, .75, .75 / e]) / (e * .25 + .75 + .75 / e)
    np.testing.assert_allclose(memory.unfold(q, p, labels), [unfolded], rtol=1e-5)
    # aggregation: the similarity mass of each class
    aggregated = memory.aggregate(q, labels, 2)
    np.testing.assert_allclose(aggregated, [[e / (e + 1 + 1 / e), (1 + 1 / e) / (e + 1 + 1 / e)]],
                               rtol=1e-5)
    np.testing.assert_allclose(memory.smooth(p, aggregated, .9),
                               .9 * p + .1 * aggregated, rtol=1e-6)


def test_pseudo_label_graph_and_its_contrastive_loss():
    probs = tf.constant([[.9, .1], [.8, .2], [.1, .9]])
    graph = memory.pseudo_label_graph(probs, probs, 0.7)
    # p0.p1 = .74 and p1.p0 = .74 pass 0.7; .18 and .26 do not; self-loops are 1
    np.testing.assert_allclose(graph, [[1 / 1.74, .74 / 1.74, 0], [.74 / 1.74, 1 / 1.74, 0],
                                       [0, 0, 1]], rtol=1e-5)
    # rows of one replica (the last two images) against the global batch's columns
    np.testing.assert_allclose(memory.pseudo_label_graph(probs[1:], probs, 0.7, offset=1),
                               graph[1:], rtol=1e-6)
    z1 = tf.constant([[1., 0.], [0., 1.], [1., 0.]])
    z2 = tf.constant([[0., 1.], [1., 0.], [1., 0.]])
    logits = np.array(z1) @ np.array(z2).T / .5
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -(np.array(graph) * log_softmax).sum(1).mean()
    np.testing.assert_allclose(float(memory.graph_contrastive_loss(graph, z1, z2, .5)), expected,
                               rtol=1e-5)
    # both views learn, the gathered one too (CoMatch gathers the columns over replicas)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([z1, z2])
        loss = memory.graph_contrastive_loss(graph, z1, base.replica_concat(z2), .5)
    assert all(np.any(tape.gradient(loss, z) != 0) for z in (z1, z2))


class Heads:
    """A 'model with heads' whose logits are its inputs' first C columns and whose embeddings
    their last ones: every quantity of a step can be worked by hand."""
    non_trainable_weights = []
    layers = []

    def __init__(self, classes):
        self.classes = classes

    def __call__(self, x, training=False):
        return [x[:, :self.classes], x[:, self.classes:]]


def rows(logits, embeddings):
    return tf.constant(np.concatenate([logits, embeddings], 1), tf.float32)


def test_simmatch_step_by_hand():
    """Two unlabeled images whose weak predictions average to uniform (so the alignment leaves
    them), a full memory of two labeled rows, t = 1, alpha = 1/2."""
    algorithm = algorithms.ALGORITHMS['simmatch'](
        similarity_temperature=1., smoothing_alpha=.5, confidence_threshold=.75,
        bank_momentum=.5, prediction_window=1, projection_units=2)
    p = np.array([[.8, .2], [.2, .8]])
    weak = rows(np.log(p), [[1., 0.], [1., 0.]])
    strong = rows(np.zeros((2, 2)), [[0., 1.], [0., 1.]])
    labeled = rows(np.zeros((3, 2)), [[.6, .8], [1., 0.], [.8, .6]])
    state = {'p_model': tf.constant([[.5, .5]]), 'bank': tf.constant([[1., 0.], [0., 1.]]),
             'bank_labels': tf.constant([0, 1])}
    batch = Batch(labeled, tf.constant([1, 0, 1]), (weak, strong), tf.constant(1.),
                  tf.random.Generator.from_seed(0), state=state, heads=Heads(2),
                  labeled_index=tf.constant([1, 0, 1]))
    out = algorithm(None, None, batch)
    e = math.e
    q = np.array([e, 1.]) / (e + 1)                       # both weak embeddings are [1, 0]
    target = .5 * p + .5 * q                             # labels of the rows: 0, 1
    assert target[0].max() >= .75 > target[1].max()      # [.77, .23] counts, [.47, .53] not
    assert float(out.metrics['mask']) == .5
    # strong logits are zeros: cross-entropy log 2 for the one counted image, over two images
    np.testing.assert_allclose(float(out.metrics['pseudo_label']), math.log(2.) / 2, rtol=1e-5)
    # instance: the unfolded q_k p[class(k)] against softmax of the strong view's [0, 1] . rows
    unfolded = q * p / (q * p).sum(1, keepdims=True)
    log_qs = np.array([0., 1.]) - math.log(1 + e)
    expected = -(unfolded * log_qs).sum(1).mean()
    np.testing.assert_allclose(float(out.metrics['instance']), expected, rtol=1e-5)
    np.testing.assert_allclose(float(out.unlabeled), math.log(2.) / 2 + expected, rtol=1e-5)
    # memory: row 0 = normalize(.5 [1, 0] + .5 [1, 0]); row 1 from its last copy, [.8, .6]
    np.testing.assert_allclose(out.state['bank'], [[1., 0.], np.array([.4, .8]) / math.hypot(.4,
                                                                                        .8)],
                               rtol=1e-5)
    np.testing.assert_array_equal(out.state['bank_labels'], [0, 1])
    assert float(out.metrics['memory_ready']) == 1.
    # a memory with an empty row: the plain prediction is the target, no instance loss
    batch.state = dict(state, bank_labels=tf.constant([-1, 1]))
    out = algorithm(None, None, batch)
    assert float(out.metrics['instance']) == 0. and float(out.metrics['memory_ready']) == 0.
    assert float(out.metrics['mask']) == 1.   # .8 >= .75 both
    np.testing.assert_array_equal(out.state['bank_labels'], [0, 1])


def test_comatch_step_by_hand():
    """Memory-smoothed pseudo-labels from a full queue, the graph over the batch, and the
    queue's FIFO update (pointer 3 of 4: the three new rows wrap)."""
    algorithm = algorithms.ALGORITHMS['comatch'](
        similarity_temperature=1., smoothing_alpha=.5, confidence_threshold=.7,
        contrast_threshold=.5, queue_size=4, prediction_window=1, projection_units=2)
    p = np.array([[.9, .1], [.1, .9]])   # mean uniform: alignment leaves them
    weak = rows(np.log(p), [[1., 0.], [0., 1.]])
    s1 = rows(np.zeros((2, 2)), [[1., 0.], [0., 1.]])
    s2 = rows(np.zeros((2, 2)), [[0., 1.], [0., 1.]])
    labeled = rows(np.zeros((1, 2)), [[.6, .8]])
    queue = np.array([[1., 0.], [1., 0.], [0., 1.], [0., 1.]])
    queue_probs = np.array([[1., 0.], [1., 0.], [1., 0.], [0., 1.]])
    state = {'p_model': tf.constant([[.5, .5]]), 'queue_embeddings': tf.constant(queue, tf.float32),
             'queue_probs': tf.constant(queue_probs, tf.float32),
             'queue_pointer': tf.constant(3), 'queue_full': tf.constant(1)}
    batch = Batch(labeled, tf.constant([1]), (weak, s1, s2), tf.constant(1.),
                  tf.random.Generator.from_seed(0), state=state, heads=Heads(2))
    out = algorithm(None, None, batch)
    e = math.e
    # image 0 ([1, 0]) is like rows 0, 1 (class 0) with e, rows 2, 3 with 1
    a0 = np.array([e, e, 1, 1]) / (2 * e + 2)
    a1 = np.array([1, 1, e, e]) / (2 * e + 2)
    target = .5 * p + .5 * np.stack([a0 @ queue_probs, a1 @ queue_probs])
    # [.88, .12] counts; image 1's neighbours are half class 0: [.37, .63] does not
    assert target[0].max() >= .7 > target[1].max()
    assert float(out.metrics['mask']) == .5
    xe = -(target * np.log(.5)).sum(1)
    np.testing.assert_allclose(float(out.metrics['pseudo_label']), xe[0] / 2, rtol=1e-5)
    # the graph: t0 . t1 < .5, so only the self-loops; the embedding graph of s1 against s2
    logits = np.array([[1., 0.], [0., 1.]]) @ np.array([[0., 1.], [0., 1.]]).T
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(float(out.metrics['contrast']),
                               -np.mean([log_softmax[0, 0], log_softmax[1, 1]]), rtol=1e-5)
    # the queue: weak rows (with p, not the smoothed target) then the labeled one, at 3, 0, 1
    np.testing.assert_allclose(out.state['queue_embeddings'],
                               [[0., 1.], [.6, .8], [0., 1.], [1., 0.]], rtol=1e-6)
    np.testing.assert_allclose(out.state['queue_probs'], [p[1], [0., 1.], [1., 0.], p[0]],
                               rtol=1e-5)
    assert int(out.state['queue_pointer']) == 2 and int(out.state['queue_full']) == 1
    # a queue not yet full: no smoothing; full once a write reaches its end
    batch.state = dict(state, queue_full=tf.constant(0), queue_pointer=tf.constant(0))
    out = algorithm(None, None, batch)
    assert float(out.metrics['mask']) == 1. and int(out.state['queue_full']) == 0
    batch.state = dict(state, queue_full=tf.constant(0), queue_pointer=tf.constant(1))
    assert int(algorithm(None, None, batch).state['queue_full']) == 1


def test_invalid_values_are_refused_by_flag():
    from ssl_ema.base.errors import ConfigError
    with pytest.raises(ConfigError, match='--prediction_window=0 is invalid for '
                                          '--algorithm=simmatch: it must be >= 1'):
        algorithms.ALGORITHMS['simmatch'](prediction_window=0)
    with pytest.raises(ConfigError, match='--contrast_threshold=2.0 is invalid for '
                                          '--algorithm=comatch'):
        algorithms.ALGORITHMS['comatch'](contrast_threshold=2.)


# ---- the EMA teacher's heads ------------------------------------------------------------------

def test_the_averages_carry_the_heads_the_ema_targets_read():
    carrying = {teacher: {name for name, cls in algorithms.ALGORITHMS.items()
                          if base.averages_carry_heads(
                              cls(**({'teacher': teacher} if 'teacher' in cls.__dataclass_fields__
                                     else {})))}
                for teacher in ('student', 'ema')}
    assert carrying == {'student': {'openmatch', 'iomatch'},   # open-set: a head is scored
                        'ema': {'openmatch', 'iomatch', 'simmatch', 'comatch'}}


@pytest.mark.parametrize('name', MEMORY)
def test_with_the_ema_teacher_the_embeddings_are_the_averaged_heads(name, monkeypatch):
    """--teacher=ema: the weak views' embeddings the memory is searched with and the labeled (and
    CoMatch's weak) ones it stores are the averaged projection head's on the EMA features, one
    inference-mode pass; moving only the averaged head's weights moves them, not p^w."""
    algorithm = algorithms.ALGORITHMS[name](teacher='ema', projection_units=4,
                                            **({'bank_momentum': 0.} if name == 'simmatch' else {}))
    tf.keras.utils.set_random_seed(0)
    student = backbones.build('small_cnn', (8, 8, 1), 10)
    heads = base.with_heads(student, algorithm.heads)
    teacher = EMA(student)
    teacher.carry_heads(heads, algorithm.heads)
    batch = random_batch(algorithm, heads=heads)
    searched, similarities = [], memory.similarities
    monkeypatch.setattr(memory, 'similarities',
                        lambda z, *rest: searched.append(z) or similarities(z, *rest))
    images = tf.concat([batch.labeled_x, batch.unlabeled[0]], 0)

    def step():   # (the teacher's labeled and weak embeddings, what the step used and stored)
        out = algorithm(student, teacher, batch)
        z = np.array(teacher.heads(images, training=False)[1])
        stored = (out.state['bank'] if name == 'simmatch'   # rows of labeled images 0..3
                  else out.state['queue_embeddings'][:12])   # 8 weak rows, then 4 labeled
        np.testing.assert_allclose(searched[-1], z[4:], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stored, z[:4] if name == 'simmatch' else
                                   np.concatenate([z[4:], z[:4]]), rtol=1e-5, atol=1e-6)
        return z, np.array(out.state['p_model'])
    # carry_heads starts the average at the student's head (before the step's training-mode
    # pass moves the student's batch-norm statistics)
    own = np.array(heads(images, training=False)[1])
    z, p_model = step()
    np.testing.assert_allclose(own, z, rtol=1e-5, atol=1e-6)
    for v in teacher.head_variables:   # averaged head weights unlike the student's
        v.assign(tf.random.stateless_normal(v.shape, [1, 2]) * .1)
    moved, moved_p_model = step()
    assert not np.allclose(moved, z, atol=1e-3)
    assert not np.allclose(own, moved, atol=1e-3)
    np.testing.assert_allclose(moved_p_model, p_model, rtol=1e-6)   # p^w: the classifier's


def test_every_average_carries_the_heads_by_its_own_rule_and_only_then(digits_data, tmp_path):
    """SimMatch with --teacher=ema: every average (the teacher, --ema_decays', Polyak's) carries
    the projection head from the student's, checkpointed under average_heads, and each moves it
    towards the student's by its own beta_t. With --teacher=student, or targets that read no
    head (ShrinkMatch), or no heads (FixMatch): no averaged heads, the checkpoint as before."""
    cfg = tiny_config(ema_decays='0.9', polyak_start_fraction=0.)

    def trainer(name, **kwargs):
        return Trainer(cfg, algorithms.ALGORITHMS[name](**kwargs), digits_data,
                       str(tmp_path / f'{name}{len(kwargs)}'))
    layout = {'step', 'student', 'teacher', 'ema_updates', 'optimizer', 'rng', 'algorithm_state',
              'heads', 'averages'}
    for t in (trainer('simmatch', teacher='student', projection_units=8),
              trainer('shrinkmatch', teacher='ema'), trainer('fixmatch', teacher='ema')):
        assert set(t._checkpointed()) == layout
        assert all(a.heads is None and not a.head_variables for a in t.averages.values())
    t = trainer('simmatch', teacher='ema', projection_units=8)
    assert set(t._checkpointed()) == layout | {run_dir.AVERAGE_HEADS}
    assert set(t._checkpointed()[run_dir.AVERAGE_HEADS]) == {'ema', 'ema_0.9', 'polyak'}
    start = [np.array(v) for v in t.head_variables]
    for a in t.averages.values():
        for shadow, weight in zip(a.head_variables, start):
            np.testing.assert_array_equal(np.array(shadow), weight)
    for v in t.head_variables:
        v.assign_add(tf.ones_like(v))
    for a in t.averages.values():
        keep = float(a.current_decay())   # EMA's warm-up 1/10, Polyak's 0 at the first update
        a.update()
        for shadow, weight in zip(a.head_variables, start):
            np.testing.assert_allclose(np.array(shadow),
                                       keep * weight + (1. - keep) * (weight + 1.),
                                       rtol=1e-5, atol=1e-6)


# ---- runs -------------------------------------------------------------------------------------

SETTINGS = {'simmatch': {}, 'comatch': {'queue_size': 100}}   # full after three steps of 48


@pytest.mark.parametrize('name, teacher', [('simmatch', 'ema'), ('comatch', 'student')])
def test_interrupted_run_resumes_to_the_same_weights_heads_and_memory(name, teacher, digits_data,
                                                                      tmp_path):
    """SimMatch with --teacher=ema (its averaged projection head checkpointed and restored),
    CoMatch with --teacher=student."""
    cfg = tiny_config(algorithm=name, train_steps=8, eval_every_kimg=0.125, log_every_steps=1)
    algorithm = algorithms.ALGORITHMS[name](teacher=teacher, **SETTINGS[name])
    straight, resumed, _ = straight_and_resumed(cfg, algorithm, digits_data, tmp_path, 6)
    # weights, heads, averaged heads and memory: the memory was in use before the interruption
    # and after it (SimMatch's from step 5, once 4 steps of 16 of 50 labels filled it; CoMatch's
    # from step 4, after three of 48 rows)
    assert_resumed_exactly(straight, resumed)
    for a, b in zip(weights_of(straight.ema.model), weights_of(resumed.ema.model)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert bool(straight.ema.head_variables) == (teacher == 'ema')
    if teacher == 'ema':   # an average of the head, not the student's head
        assert not np.allclose(np.array(straight.ema.head_variables[0]),
                               np.array(straight.head_variables[0]))
    assert all(np.any(np.array(v) != s.initial) for v, s in zip(
        straight.state.values(), base.declared_state(algorithm, 10, 1, 50).values()))


@pytest.mark.parametrize('name', MEMORY)
def test_runs_mixed_precision_with_the_ema_teacher_on_a_custom_backbone(name, digits_data,
                                                                        tmp_path):
    """--precision=mixed_bfloat16, --teacher=ema and a keras.Model the user brings, together:
    finite losses, the memory terms live, the projection head on the model's features."""
    own = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation='relu'),
                            keras.layers.Conv2D(8, 3)], name='own')
    cfg = tiny_config(algorithm=name, train_steps=6, eval_every_kimg=0.09375, log_every_steps=1,
                      precision='mixed_bfloat16', backbone_scale='0.0039')
    algorithm = algorithms.ALGORITHMS[name](teacher='ema', **SETTINGS[name])
    logged = []
    trainer = Trainer(cfg, algorithm, digits_data, str(tmp_path), backbone=own)
    trainer.train(log=logged.append)
    assert trainer.heads.get_layer('head_projection_hidden').kernel.shape == (8, 8)
    unlabeled = logged_values(logged, 'unlabeled')
    assert len(unlabeled) == 6 and all(np.isfinite(unlabeled)) and max(unlabeled) > 0
    assert max(logged_values(logged, 'labeled')) < 10   # trains, does not diverge
    assert all(np.all(np.isfinite(np.array(v))) for v in trainer.state.values())
