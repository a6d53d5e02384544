"""FlexMatch, FreeMatch, SoftMatch and ReMixMatch: their pieces on hand-worked values, their state
after known updates, learning on tiny digits, every backbone, two replicas, and resuming."""
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from conftest import script_over_names, straight_and_resumed, tiny_config, weights_of
from ssl_ema import algorithms
from ssl_ema.nn import backbones, losses
from ssl_ema.algorithms import Batch, base
from ssl_ema.core.ema import EMA
from ssl_ema.core.loop import Trainer

NEW = ['flexmatch', 'freematch', 'softmatch', 'remixmatch']
# every algorithm with state (the replica check)
STATEFUL = NEW + ['adamatch', 'dash', 'simmatch', 'comatch', 'sequencematch', 'shrinkmatch']



# ---- pieces on hand-worked values -----------------------------------------------------------

def test_flexmatch_learning_effect_and_thresholds():
    # 3 images never selected, 2 selected as class 0, 1 as class 1, none as class 2
    selected = tf.constant([-1, -1, -1, 0, 0, 1])
    beta, update = losses.flexmatch_learning_effect(selected, 3, warmup=True)
    np.testing.assert_allclose(beta, [2 / 3, 1 / 3, 0.], rtol=1e-6)   # max count is the -1's 3
    assert bool(update)
    beta_no_warmup, _ = losses.flexmatch_learning_effect(selected, 3, warmup=False)
    np.testing.assert_allclose(beta_no_warmup, [1., .5, 0.], rtol=1e-6)
    # convex mapping: tau * beta / (2 - beta)
    np.testing.assert_allclose(losses.flexmatch_threshold(beta, 0.9), [0.45, 0.18, 0.], rtol=1e-5)
    # nothing selected yet: no update (USB keeps the previous rates)
    assert not bool(losses.flexmatch_learning_effect(tf.constant([-1, -1]), 3)[1])


def identity_student(x, training=False):
    """A 'model' whose logits are its inputs: the state updates can be worked by hand."""
    return x


def logit_batch(algorithm, weak_probs, state, index=None, labeled=((2., 0.),), labels=(0,)):
    weak = tf.math.log(tf.constant(weak_probs, tf.float32))
    views = (weak,) * len(algorithm.views)
    return Batch(tf.constant(labeled), tf.constant(labels), views, tf.constant(1.),
                 tf.random.Generator.from_seed(0), tf.constant(.5), state=state,
                 unlabeled_index=None if index is None else tf.constant(index))


def test_flexmatch_thresholds_after_two_updates():
    algorithm = algorithms.ALGORITHMS['flexmatch'](confidence_threshold=0.9)
    state = {'selected': tf.fill([4], -1), 'beta': tf.zeros([2])}
    # step 1: images 0 and 1 of the pool; image 0 is confident (class 0), image 1 is not
    out = algorithm(identity_student, None, logit_batch(
        algorithm, [[0.95, 0.05], [0.6, 0.4]], state, index=[0, 1]))
    np.testing.assert_array_equal(out.state['selected'], [0, -1, -1, -1])
    np.testing.assert_allclose(out.state['beta'], [1 / 3, 0.], rtol=1e-6)   # 1 / max(1, 3 unused)
    assert float(out.metrics['mask']) == 1.   # all thresholds were 0 at the start
    # step 2: images 2 and 3, both confident, class 1 and class 0
    out = algorithm(identity_student, None, logit_batch(
        algorithm, [[0.05, 0.95], [0.92, 0.08]], out.state, index=[2, 3]))
    np.testing.assert_array_equal(out.state['selected'], [0, -1, 1, 0])
    np.testing.assert_allclose(out.state['beta'], [1., .5], rtol=1e-6)   # counts 2, 1; 1 unused
    # step 2's mask used step 1's thresholds: class 0 at 0.9 * (1/3) / (5/3) = 0.18, class 1 at 0
    assert float(out.metrics['mask']) == 1.
    np.testing.assert_allclose(float(out.metrics['mean_threshold']), 0.09, rtol=1e-5)


def test_freematch_self_adaptive_thresholds_after_two_updates():
    algorithm = algorithms.ALGORITHMS['freematch'](state_momentum=0.5)
    state = base.initial_state(algorithm, 2, 4)
    batch = lambda s: logit_batch(algorithm, [[0.9, 0.1], [0.6, 0.4]], s)  # noqa: E731
    out = algorithm(identity_student, None, batch(state))
    # tau = .5 * 1/2 + .5 * mean(.9, .6); p~ = .5 * [.5, .5] + .5 * [.75, .25]; h~ from [1, 0]
    np.testing.assert_allclose(out.state['global_threshold'], 0.625, rtol=1e-6)
    np.testing.assert_allclose(out.state['p_model'], [0.625, 0.375], rtol=1e-6)
    np.testing.assert_allclose(out.state['label_hist'], [0.75, 0.25], rtol=1e-6)
    # class 0's threshold is 1 * 0.625: 0.9 passes, 0.6 does not
    assert float(out.metrics['mask']) == 0.5
    out = algorithm(identity_student, None, batch(out.state))
    np.testing.assert_allclose(out.state['global_threshold'], 0.6875, rtol=1e-6)
    np.testing.assert_allclose(out.state['p_model'], [0.6875, 0.3125], rtol=1e-6)


def test_freematch_fairness_term():
    # p~/h~ normalised is [.5, .5]; the confident images' mean [.8, .2] over histogram [1, 0]
    # normalises to [1, 0]: .5 log 1 + .5 log(1e-12)
    value = losses.freematch_fairness(tf.constant([.5, .5]), tf.constant([.5, .5]),
                                      tf.constant([.8, .2]), tf.constant([1., 0.]))
    np.testing.assert_allclose(float(value), 0.5 * math.log(1e-12), rtol=1e-5)


def test_softmatch_weight_and_running_estimates():
    weight = losses.truncated_gaussian_weight(tf.constant([0.9, 0.5, 0.3]), 0.7, 0.04, 2.)
    # 1 above the mean; exp(-d^2 / (2 * 0.04 / 4)) below it
    np.testing.assert_allclose(weight, [1., math.exp(-2.), math.exp(-8.)], rtol=1e-5)
    algorithm = algorithms.ALGORITHMS['softmatch'](state_momentum=0.5)
    state = base.initial_state(algorithm, 2, 4)
    # a batch whose mean prediction is uniform, so uniform alignment leaves it as it is
    out = algorithm(identity_student, None, logit_batch(
        algorithm, [[.9, .1], [.1, .9], [.6, .4], [.4, .6]], state))
    np.testing.assert_allclose(out.state['p_model'], [.5, .5], rtol=1e-6)
    np.testing.assert_allclose(out.state['mean'], .5 * .5 + .5 * .75, rtol=1e-5)
    # unbiased variance of (.9, .9, .6, .6) is 4 * .15^2 / 3 = .03
    np.testing.assert_allclose(out.state['variance'], .5 * 1. + .5 * .03, rtol=1e-4)


def test_distribution_alignment():
    aligned = losses.align_distribution(tf.constant([[.6, .4]]), tf.constant([.5, .5]),
                                        tf.constant([.8, .2]))
    np.testing.assert_allclose(aligned, [[.75 / 2.75, 2. / 2.75]], rtol=1e-5)
    # a uniform prediction becomes the target distribution when the model's average is uniform
    aligned = losses.align_distribution(tf.constant([[.5, .5]]), tf.constant([.2, .8]),
                                        tf.constant([.5, .5]))
    np.testing.assert_allclose(aligned, [[.2, .8]], rtol=1e-5)


def test_rotation_and_its_loss():
    image = tf.constant([[1., 2.], [3., 4.]])[None, :, :, None]
    images = tf.concat([image] * 4, 0)
    rotated = losses.rotate(images, tf.constant([0, 1, 2, 3]))[..., 0].numpy()
    np.testing.assert_array_equal(rotated[0], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(rotated[1], [[2, 4], [1, 3]])   # a quarter turn to the left
    np.testing.assert_array_equal(rotated[2], [[4, 3], [2, 1]])
    np.testing.assert_array_equal(rotated[3], [[3, 1], [4, 2]])
    # ReMixMatch's rotation loss: with a zero rotation head every angle has probability 1/4
    algorithm = algorithms.ALGORITHMS['remixmatch']()
    student = backbones.build('small_cnn', (8, 8, 1), 10)
    heads = base.with_heads(student, algorithm.heads)
    for w in heads.get_layer('head_rotation').weights:
        w.assign(tf.zeros_like(w))
    out = algorithm(student, EMA(student), random_batch(algorithm, heads=heads))
    np.testing.assert_allclose(float(out.metrics['rotation']), math.log(4.), rtol=1e-5)


def test_remixmatch_guess_is_aligned_and_sharpened():
    """With the labeled distribution [.2, .8] and a uniform model average p~, a uniform weak
    prediction is aligned to [.2, .8] and sharpened (T = .5) to [1/17, 16/17]: the pre-mixup
    cross-entropy of a uniform strong-view prediction against it is log 2."""
    algorithm = algorithms.ALGORITHMS['remixmatch'](strong_views=1)
    zeros = lambda x, units: tf.zeros([tf.shape(x)[0], units])  # noqa: E731
    batch = random_batch(algorithm, heads=Model(lambda x, training: [zeros(x, 2), zeros(x, 4)]))
    # p~(y) is the mean of the window of the last batches' mean predictions: here uniform
    batch.state = {'p_data': tf.constant([.2, .8]),
                   'p_model': tf.constant([[.3, .7], [.6, .4], [.6, .4]])}
    batch.labels = tf.constant([1, 1, 1, 1])
    out = algorithm(Model(lambda x, training: zeros(x, 2)), None, batch)
    np.testing.assert_allclose(float(out.metrics['pre_mixup']), math.log(2.), rtol=1e-5)
    # the running label distribution moved towards the batch's labels (all class 1)
    np.testing.assert_allclose(out.state['p_data'], [.2 * .999, .8 * .999 + .001], rtol=1e-6)
    # the window dropped its oldest batch and took this one's mean prediction (uniform)
    np.testing.assert_allclose(out.state['p_model'], [[.6, .4], [.6, .4], [.5, .5]], rtol=1e-6)
    # --prediction_window=0: a moving average with --state_momentum instead
    algorithm = algorithms.ALGORITHMS['remixmatch'](strong_views=1, prediction_window=0)
    assert algorithm.state(2, 16)['p_model'].shape == (2,)
    batch.state = {'p_data': tf.constant([.2, .8]), 'p_model': tf.constant([.5, .5])}
    out = algorithm(Model(lambda x, training: zeros(x, 2)), None, batch)
    np.testing.assert_allclose(float(out.metrics['pre_mixup']), math.log(2.), rtol=1e-5)
    np.testing.assert_allclose(out.state['p_model'], [.5, .5], rtol=1e-6)


class Model:
    """A callable with the attributes call_keeping_statistics needs."""
    non_trainable_weights = []
    layers = []

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x, training=False):
        return self.fn(x, training)


def random_batch(algorithm, num_classes=10, heads=None, seed=0):
    rng = tf.random.Generator.from_seed(seed)
    x = lambda n, i=0: tf.random.stateless_uniform((n, 8, 8, 1), [seed, n + i])  # noqa: E731
    state = base.initial_state(algorithm, num_classes, 16, 4, feature_width=128)
    views = tuple(x(8, i) for i in range(len(algorithm.views)))
    return Batch(x(4), tf.constant([0, 1, 2, 3]), views,
                 tf.constant(1.), rng, tf.constant(.5), state=state,
                 unlabeled_index=tf.range(8) if algorithm.needs_indices else None, heads=heads,
                 labeled_index=tf.range(4) if algorithm.needs_labeled_indices else None,
                 labeled_views=tuple(x(4, i + 1) for i in range(len(algorithm.labeled_views))))


# ---- learning, backbones, replicas, resuming --------------------------------------------------

def logged_values(lines, key):
    return [float(line.split(f' {key}=')[1].split()[0]) for line in lines if f' {key}=' in line]


@pytest.mark.parametrize('name', NEW)
def test_learns_on_tiny_digits_with_a_live_unlabeled_loss(name, digits_data, tmp_path):
    cfg = tiny_config(algorithm=name, train_steps=150, eval_every_kimg=1.171875,
                      log_every_steps=10, warmup_fraction=0.2)
    logged = []
    trainer = Trainer(cfg, algorithms.ALGORITHMS[name](), digits_data, str(tmp_path))
    summary = trainer.train(log=logged.append)
    labeled, unlabeled = logged_values(logged, 'labeled'), logged_values(logged, 'unlabeled')
    assert np.mean(labeled[-3:]) < (0.8 if name == 'remixmatch' else 0.5) * labeled[0], labeled
    assert max(unlabeled) > 0 and len(set(unlabeled)) > 5, unlabeled
    assert summary['ema']['test']['last'] > 60, summary   # chance is 10%
    assert summary['raw']['test']['last'] > 60, summary


@pytest.mark.parametrize('arch', ['small_cnn', 'cnn13', 'wrn10_1'])
def test_every_backbone(arch):
    """One loss and its gradient on each backbone (the rotation head sits on each one's pooled
    features); the new algorithms' state updates are finite."""
    student = backbones.build(arch, (8, 8, 1), 10)
    teacher = EMA(student)
    for name in NEW:
        algorithm = algorithms.ALGORITHMS[name]()
        heads = base.with_heads(student, algorithm.heads) if algorithm.heads else None
        variables = student.trainable_variables + (heads.trainable_variables if heads else [])
        with tf.GradientTape() as tape:
            out = algorithm(student, teacher, random_batch(algorithm, heads=heads))
            total = out.labeled + out.unlabeled
        grads = tape.gradient(total, variables)
        assert all(g is not None for g in grads), (arch, name)
        assert np.isfinite(float(total)) and float(out.unlabeled) > 0, (arch, name)
        assert all(np.all(np.isfinite(v)) for v in out.state.values()), (arch, name)


MIRRORED = '''
import dataclasses, json, sys, tempfile
import numpy as np, tensorflow as tf
from ssl_ema import algorithms, data
from ssl_ema.base.config import TrainConfig
from ssl_ema.core.cluster import make_strategy
from ssl_ema.core.loop import Trainer

cfg = TrainConfig(batch=16, uratio=2, train_steps=2,
                  arch='small_cnn', distribute='mirrored', cpu_devices=2)
mirrored = make_strategy(cfg)
# SequenceMatch on a backbone without kinks (conftest's kink_free_backbone): on small_cnn its
# first conv ended 2.3e-3 apart after two steps on an AVX2 CPU (4.4e-5 after one), its state
# equal: an activation at a LeakyReLU's kink or a max-pool tie that the replicas' other
# summation order puts on the other side (test_jit_compile traced such flips).
ARCH = {'sequencematch': sys.argv[1]}
dataset = data.build('digits', labels=50, valid=200, seed=1)
# ReMixMatch: one step (its mixup partners are drawn per replica, so the weights, and the
# predictions of the next step, differ from one device's), and its guesses from the EMA model,
# whose inference-mode predictions do not depend on how the batch is split.
# CoMatch: a queue the first step fills (48 rows), so the second smooths with it.
# SimMatch: the EMA teacher, its averaged projection head updated on every replica's copy.
# ShrinkMatch: tau .2, so some images are certain (the certain ratio moves) and the others'
# class spaces shrink, through its auxiliary head's batch norm.
# SequenceMatch: tau .15, so that its curriculum's class rates move (its warm-up's thresholds
# start at 0, so every image is already masked in).
SETTINGS = {'remixmatch': ({'teacher': 'ema'}, 1), 'comatch': ({'queue_size': 48}, 2),
            'simmatch': ({'teacher': 'ema'}, 2), 'shrinkmatch': ({'confidence_threshold': .2}, 2),
            'sequencematch': ({'confidence_threshold': .15}, 2)}
out = {}
for name in sys.argv[2:]:
    overrides, steps = SETTINGS.get(name, ({}, 2))
    run_cfg = dataclasses.replace(cfg, arch=ARCH.get(name, cfg.arch))
    for label, strategy in (('one', tf.distribute.get_strategy()), ('two', mirrored)):
        trainer = Trainer(run_cfg, algorithms.ALGORITHMS[name](**overrides), dataset,
                          tempfile.mkdtemp(), strategy)
        iterator = trainer.batches(0)
        for _ in range(steps):   # two steps: the second uses the state the first one left
            trainer.train_step(iterator)
        # The state is the first replica's (ONLY_FIRST_REPLICA): equal on every replica by
        # construction, right only if it was computed from the whole global batch.
        state = {k: np.asarray(strategy.experimental_local_results(v)[0]).tolist()
                 for k, v in trainer.state.items()}
        out[name + '/' + label] = {'state': state, 'student': [np.asarray(w).tolist()
                                   for w in trainer.student.weights]}
print(json.dumps(out))
'''


@pytest.fixture(scope='module')
def two_replica_runs(kink_free_backbone):
    """Two steps of every new algorithm on one device and on two (one process: the CPU split
    into two logical devices must happen before TensorFlow starts)."""
    return script_over_names(MIRRORED, [kink_free_backbone], list(STATEFUL), timeout=1800)


@pytest.mark.parametrize('name', STATEFUL)
def test_two_replicas(name, two_replica_runs):
    """Under --distribute=mirrored the algorithm state the replicas keep is the one one device
    computes on the same global batch (cross-replica statistics, not the first replica's half);
    the thresholding algorithms' weights match too (ReMixMatch's mixup partners are per
    replica)."""
    one, two = two_replica_runs[f'{name}/one'], two_replica_runs[f'{name}/two']
    assert one['state'].keys() == two['state'].keys() and two['state'], name
    for key, value in two['state'].items():
        np.testing.assert_allclose(value, one['state'][key], rtol=1e-4, atol=1e-6,
                                   err_msg=f'{name} {key}')
    if name == 'remixmatch':   # per-replica mixup partners
        return
    for a, b in zip(one['student'], two['student']):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('name', ['flexmatch', 'remixmatch', 'sequencematch', 'shrinkmatch'])
def test_interrupted_run_resumes_to_the_same_weights_and_state(name, digits_data, tmp_path):
    """FlexMatch's per-image state (int) and class rates (SequenceMatch's too), ReMixMatch's
    distributions and its rotation head, ShrinkMatch's alignment window, certain ratio and
    auxiliary head come back from the checkpoint: a resumed run ends where a straight one does."""
    cfg = tiny_config(algorithm=name, train_steps=12, eval_every_kimg=0.09375, log_every_steps=2)
    # a threshold low enough that images get selected (and the per-image state moves) this early
    algorithm = algorithms.ALGORITHMS[name](**({'confidence_threshold': 0.2}
                                               if name != 'remixmatch' else {}))
    straight, resumed, _ = straight_and_resumed(cfg, algorithm, digits_data, tmp_path, 8)
    for a, b in zip(weights_of(straight.student) + [np.array(v) for v in straight.head_variables],
                    weights_of(resumed.student) + [np.array(v) for v in resumed.head_variables]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for key, value in straight.state.items():
        np.testing.assert_allclose(np.array(resumed.state[key]), np.array(value), rtol=1e-5)
    assert any(np.any(np.array(v) != s.initial)
               for v, s in zip(straight.state.values(), algorithm.state(10, 1).values()))
