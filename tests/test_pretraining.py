"""Self-supervised pretraining (issue 22): the methods' math on hand-worked values, the views, the
k-NN evaluation, the EMA teacher, exact resume and the backbone it writes."""
import dataclasses
import math
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import quiet, weights_of
from ssl_ema.algorithms import pretraining
from ssl_ema.algorithms.pretraining import byol, dino
from ssl_ema.core import knn
from ssl_ema.core.ema import CosineEMA
from ssl_ema.data import views

LN3 = math.log(3.)
SEED = tf.constant([3, 4], tf.int64)


# ---- the methods' math --------------------------------------------------------------------------
def test_byol_regression_loss_hand():
    # p = (1, 0), z = (1, 1): cos = 1/sqrt(2), 2 - 2 cos = 2 - sqrt(2) = 0.585786;
    # p = (3, 4), z = (-3, -4): cos = -1 -> 4.
    got = byol.regression_loss(tf.constant([[1., 0.], [3., 4.]]),
                               tf.constant([[1., 1.], [-3., -4.]]))
    np.testing.assert_allclose(got, [2 - math.sqrt(2), 4.], rtol=1e-6)
    # Symmetrised: L(p1, z2) = L((1,0), (1,1)) = 2 - sqrt(2); L(p2, z1) = L((0,2), (0,5)) = 0.
    got = byol.symmetrised_loss((tf.constant([[1., 0.]]), tf.constant([[0., 2.]])),
                                (tf.constant([[0., 5.]]), tf.constant([[1., 1.]])))
    np.testing.assert_allclose(got, 2 - math.sqrt(2), rtol=1e-6)


def test_cosine_teacher_momentum_hand():
    # tau_base 0.99 over K = 4 updates: k = 0 -> 0.99; k = 2 (K/2) -> 1 - 0.01 / 2 = 0.995;
    # k = 4 -> 1; k = 1 -> 1 - 0.01 (cos(pi/4) + 1) / 2 = 0.991464.
    ema = CosineEMA(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]), 0.99, 4)
    decays = []
    for _ in range(5):
        decays.append(float(ema.current_decay()))
        ema.updates.assign_add(1)
    np.testing.assert_allclose(decays, [0.99, 0.991464, 0.995, 0.998536, 1.], atol=1e-6)


def test_learning_rate_warmup_then_cosine_hand():
    # lr 1 over 10 steps, 20% warm-up (2 steps): step 1 -> 1/2; step 2 -> 1; step 6, halfway
    # through the 8 cosine steps -> (1 + cos(pi/2)) / 2 = 1/2; step 10 -> 0.
    from ssl_ema.core.pretraining import WarmupCosine
    schedule = WarmupCosine(1., 10, .2)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 1, 2, 6, 10)],
                               [0., .5, 1., .5, 0.], atol=1e-6)


def test_dino_loss_hand():
    # tau_t = tau_s = 0.5, centre (1, 1). Teacher: t0 = (1 + ln3/2, 1) -> (t0 - c) / 0.5 = (ln 3, 0)
    # -> softmax (3/4, 1/4); t1 = (1, 1) -> (1/2, 1/2). Student / 0.5: s0 = (7, 7) -> (1/2, 1/2);
    # s1 = (ln3/2, 0) -> (3/4, 1/4); s2 = (0, ln3/2) -> (1/4, 3/4).
    # Pairs of different views: H(t0, s1) = -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.562335;
    # H(t1, s0) = ln 2 = 0.693147: two views, (0.562335 + 0.693147) / 2 = 0.627741.
    # H(t0, s2) = -(3/4 ln 1/4 + 1/4 ln 3/4) = 1.111641; H(t1, s2) = -(ln 1/4 + ln 3/4) / 2
    # = 0.836988: three student views, (0.562335 + 1.111641 + 0.693147 + 0.836988) / 4 = 0.801028.
    t = [tf.constant([[1 + LN3 / 2, 1.]]), tf.constant([[1., 1.]])]
    s = [tf.constant([[7., 7.]]), tf.constant([[LN3 / 2, 0.]]), tf.constant([[0., LN3 / 2]])]
    centre = tf.constant([1., 1.])
    np.testing.assert_allclose(dino.dino_loss(s[:2], t, centre, .5, .5), 0.627741, atol=1e-6)
    np.testing.assert_allclose(dino.dino_loss(s, t, centre, .5, .5), 0.801028, atol=1e-6)
    # Centre: the teacher's batch mean (1 + ln3/4, 1) = (1.274653, 1);
    # 0.9 (1, 1) + 0.1 (1.274653, 1) = (1.027465, 1).
    np.testing.assert_allclose(dino.updated_center(centre, tf.reduce_mean(tf.concat(t, 0), 0), .9),
                               [1.027465, 1.], atol=1e-6)
    # Teacher temperature 0.04 -> 0.07 over the first 30%: halfway (15%) 0.055, then 0.07.
    np.testing.assert_allclose([dino.teacher_temperature(p, .04, .07, .3) for p in (0, .15, .6)],
                               [.04, .055, .07], rtol=1e-6)


def test_dino_head_weight_normalised_last_layer():
    head = pretraining.create('dino', hidden_dim=16, bottleneck_dim=4, out_dim=5).head(8)
    x = tf.random.stateless_normal([3, 8], [1, 2])
    before = head(x)
    last = head.layers[-1]
    last.kernel.assign(last.kernel * 5.)   # w = v / |v|: the scale of v does not matter
    np.testing.assert_allclose(head(x), before, rtol=1e-5, atol=1e-6)
    assert np.abs(before).max() <= 1 + 1e-6   # unit bottleneck . unit columns


def test_bad_method_flag():
    with pytest.raises(pretraining.base.ConfigError, match='--method=simclr is unknown'):
        pretraining.create('simclr')
    with pytest.raises(pretraining.base.ConfigError, match='--teacher_momentum=1.5'):
        pretraining.create('byol', teacher_momentum=1.5)


# ---- views and k-NN -------------------------------------------------------------------------------
def test_views_pure_functions_of_the_seed():
    for channels in (1, 3):
        x = tf.random.stateless_uniform([4, 28, 28, channels], [0, 1])
        for name, view in views.VIEWS.items():
            a = view(x, SEED)
            side = 12 if name == 'dino_local' else 28   # local crops: 96/224 of the side
            assert a.shape == (4, side, side, channels)
            assert 0 <= a.numpy().min() and a.numpy().max() <= 1
            np.testing.assert_array_equal(a, view(x, SEED))
            assert not np.allclose(a, view(x, SEED + 1))


def test_view_parts_hand():
    x = tf.random.stateless_uniform([2, 28, 28, 1], [0, 1])
    full = views.random_resized_crop(x, SEED, scale=(1., 1.), ratio=(1., 1.))
    np.testing.assert_allclose(full, x, atol=1e-6)   # the whole image, resized to itself
    # Solarisation: 0.2 stays, 0.7 -> 0.3, 0.5 -> 0.5.
    np.testing.assert_allclose(views.solarize(tf.constant([[[[.2], [.7], [.5]]]]), SEED, 1.),
                               [[[[.2], [.3], [.5]]]], atol=1e-6)
    # A normalised blur keeps a constant image constant away from the zero-padded border.
    blurred = views.gaussian_blur(tf.fill([2, 28, 28, 1], .6), SEED, 1.)
    np.testing.assert_allclose(blurred[:, 1:-1, 1:-1], .6, atol=1e-6)
    assert float(blurred[0, 0, 0, 0]) < .6


def test_knn_hand():
    # Memory (1,0):0, (0,1):1, (1,1):1; query (1,0) has cosine similarities 1, 0, 0.7071.
    # k=3, T=1: class 0 gets e^1 = 2.718, class 1 e^0 + e^0.7071 = 3.028 -> 1 (the majority).
    # T=0.07: class 0 e^14.29 = 1.6e6, class 1 1 + e^10.10 = 2.4e4 -> 0 (the nearest).
    # Query (0, 3): similarities 0, 1, 0.7071 -> class 1 either way. k=1: the nearest alone.
    memory = np.array([[1., 0.], [0., 1.], [1., 1.]], np.float32)
    labels = np.array([0, 1, 1])
    queries = np.array([[1., 0.], [0., 3.]], np.float32)
    assert knn.predict(memory, labels, queries, 2, k=3, temperature=1.).tolist() == [1, 1]
    assert knn.predict(memory, labels, queries, 2, k=3, temperature=.07).tolist() == [0, 1]
    assert knn.predict(memory, labels, queries, 2, k=1, temperature=1.).tolist() == [0, 1]
    identity = lambda x, training=False: x   # noqa: E731  features = the inputs
    assert knn.accuracy(identity, memory, labels, queries, np.array([0, 1]), 2, 3, 1.) == 50.
    assert knn.accuracy(identity, memory, labels, queries, np.array([0, 1]), 2, 3, .07) == 100.


# ---- the loop -------------------------------------------------------------------------------------
def tiny_pretraining(method='byol', **overrides):
    """A PretrainConfig and a method small enough for tests: small_cnn on digits, tiny heads."""
    from ssl_ema.base.pretraining_config import PretrainConfig
    settings = dict(method=method, batch=16, train_steps=8, eval_every_kimg=4 * 16 / 1024,
                    log_every_steps=2, arch='small_cnn')
    settings.update(overrides)
    sizes = ({'hidden_dim': 32, 'projection_dim': 16} if method == 'byol' else
             {'hidden_dim': 32, 'bottleneck_dim': 8, 'out_dim': 32})
    return PretrainConfig(**settings), pretraining.create(method, **sizes)


@pytest.mark.parametrize('method', ['byol', 'dino'])
def test_teacher_is_the_ema_of_the_student(method, digits_data, tmp_path):
    """No gradient reaches the teacher, and each step moves it to beta t + (1 - beta) s."""
    from ssl_ema.core.pretraining import Pretrainer
    cfg, algorithm = tiny_pretraining(method)
    trainer = Pretrainer(cfg, algorithm, digits_data, str(tmp_path))
    views_batch = next(iter(digits_data.unlabeled(cfg.batch, algorithm.views)))
    teacher_vars = trainer.teacher.model.trainable_variables
    with tf.GradientTape() as tape:
        out = algorithm(trainer.student, trainer.teacher, trainer.online, list(views_batch), 0.,
                        {k: tf.identity(v) for k, v in trainer.state.items()})
    grads = tape.gradient(out.loss, teacher_vars + trainer.trainable)
    assert all(g is None for g in grads[:len(teacher_vars)])       # the teacher: none
    assert all(g is not None for g in grads[len(teacher_vars):])   # the student, heads: all
    assert not any(any(v is t for t in teacher_vars) for v in trainer.trainable)
    before = weights_of(trainer.teacher.model)
    beta = float(trainer.teacher.current_decay())
    trainer.train_step(trainer.batches(0))
    student = weights_of(trainer.student)
    changed = 0
    for t0, t1, s in zip(before, weights_of(trainer.teacher.model), student):
        np.testing.assert_allclose(t1, beta * t0 + (1 - beta) * s, rtol=1e-5, atol=1e-6)
        changed += not np.allclose(t1, t0)
    assert changed and beta == pytest.approx(algorithm.teacher_momentum)


def test_pretraining_resumes_exactly(digits_data, tmp_path):
    """Interrupted at step 4 and resumed: the same weights, teacher and centre as straight through."""
    from ssl_ema.core.pretraining import Pretrainer
    cfg, method = tiny_pretraining('dino')
    straight = Pretrainer(cfg, method, digits_data, str(tmp_path / 'straight'))
    straight.train(log=quiet)

    def interrupt(line):
        if line.startswith('step 4/'):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        Pretrainer(cfg, method, digits_data, str(tmp_path / 'resumed')).train(log=interrupt)
    resumed = Pretrainer(cfg, method, digits_data, str(tmp_path / 'resumed'))
    summary = resumed.train(log=quiet)
    for a, b in [(straight.student, resumed.student),
                 (straight.teacher.model, resumed.teacher.model)]:
        for x, y in zip(weights_of(a), weights_of(b)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(straight.state['center'], resumed.state['center'], rtol=1e-4,
                               atol=1e-6)
    assert [h['step'] for h in resumed.history] == [0, 4, 8]
    assert summary['ema']['test']['last'] == straight.history[-1]['ema']['test']


def test_written_backbone_loads_without_ssl_ema(digits_data, tmp_path):
    """backbone.keras: stock layers only, pixels -> pooled features equal to the trained
    backbone's on standardised images, so the same k-NN accuracy."""
    from ssl_ema.core.pretraining import Pretrainer
    cfg, method = tiny_pretraining('byol', train_steps=2)
    trainer = Pretrainer(cfg, method, digits_data, str(tmp_path))
    trainer.train(log=quiet)
    path = trainer.export_backbone()
    with zipfile.ZipFile(path) as archive:   # a .keras file: config.json + weights
        assert 'ssl_ema' not in archive.read('config.json').decode()
    loaded = keras.saving.load_model(path)
    pixels = digits_data.arrays.x_test.astype(np.float32)
    features = loaded.predict(pixels, verbose=0)
    expected = trainer.backbone(digits_data.normalize(pixels), training=False)   # BYOL: online
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
    assert loaded.output.shape[-1] == 128
    memory = digits_data.arrays.x_train[digits_data.split.labeled].astype(np.float32)
    labels = digits_data.arrays.y_train[digits_data.split.labeled]
    got = knn.accuracy(loaded, memory, labels, pixels, digits_data.arrays.y_test, 10)
    assert got == pytest.approx(trainer.history[-1]['raw']['test'])
    trainer.exported = 'ema'   # --export_model=ema: the teacher's backbone instead
    teacher = keras.saving.load_model(trainer.export_backbone(str(tmp_path / 'teacher.keras')))
    np.testing.assert_allclose(teacher.predict(pixels, verbose=0),
                               trainer.teacher_backbone(digits_data.normalize(pixels)),
                               rtol=1e-4, atol=1e-4)


def test_written_backbone_fine_tunes_with_fixmatch(digits_data, tmp_path):
    """--arch=keras:DIR/backbone.keras (nn/custom_backbones.py, issue 21) starts from the
    pretrained weights (same pooled features) and fixmatch trains it."""
    custom_backbones = pytest.importorskip('ssl_ema.nn.custom_backbones')
    from conftest import tiny_config
    from ssl_ema import algorithms
    from ssl_ema.core.loop import Trainer
    from ssl_ema.core.pretraining import Pretrainer
    cfg, method = tiny_pretraining('byol', train_steps=2)
    pretrained = Pretrainer(cfg, method, digits_data, str(tmp_path / 'pretrain'))
    pretrained.train(log=quiet)
    path = pretrained.export_backbone()
    fine_tuning = tiny_config(algorithm='fixmatch', arch=f'keras:{path}', train_steps=30)
    trainer = Trainer(fine_tuning, algorithms.create('fixmatch'), digits_data,
                      str(tmp_path / 'fixmatch'))
    features = keras.Model(trainer.student.input,
                           trainer.student.get_layer(custom_backbones.HEAD).input)
    x = digits_data.eval_arrays()['test'][0]
    np.testing.assert_allclose(features(x), pretrained.backbone(x), rtol=1e-3, atol=1e-3)
    summary = trainer.train(log=quiet)
    assert summary['raw']['test']['last'] > 30   # chance: 10


def test_dino_multi_crop_trains_the_student_on_local_crops(digits_data, tmp_path):
    """--local_crops: 3x3 crops of the 8x8 digits (96/224 of the side) go through the student
    only; the backbone takes any size, and the written one still takes the full images."""
    from ssl_ema.core.pretraining import Pretrainer
    assert views.local_side(28) == 12 and views.local_side(8) == 3 and views.local_side(224) == 96
    cfg, method = tiny_pretraining('dino', train_steps=4)
    method = dataclasses.replace(method, local_crops=2)
    assert method.views == ('dino_global_1', 'dino_global_2', 'dino_local', 'dino_local')
    trainer = Pretrainer(cfg, method, digits_data, str(tmp_path))
    batch = next(iter(digits_data.unlabeled(cfg.batch, method.views)))
    assert [tuple(v.shape) for v in batch] == [(16, 8, 8, 1)] * 2 + [(16, 3, 3, 1)] * 2
    before = weights_of(trainer.teacher.model)
    trainer.train(log=quiet)
    assert all(np.isfinite(h['raw']['test']) for h in trainer.history)
    assert any(not np.array_equal(a, b) for a, b in zip(before, weights_of(trainer.teacher.model)))
    backbone = keras.saving.load_model(trainer.export_backbone(), compile=False)
    x = digits_data.eval_arrays()['test'][0][:4] * 0 + 128   # pixels, full size
    assert backbone(x).shape == (4, trainer.backbone.output.shape[-1])
