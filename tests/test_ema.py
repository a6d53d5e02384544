"""The EMA against its formula, computed by hand over several steps."""
import os

import keras
import numpy as np
import pytest

from ssl_ema.core.ema import EMA


def scalar_model():
    inputs = keras.Input((1,))
    x = keras.layers.Dense(1, use_bias=False, kernel_initializer='zeros')(inputs)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(inputs, x)


def set_all(model, value):
    for w in model.weights:
        w.assign(np.full(w.shape, value, np.float32))


def test_ema_follows_its_formula():
    student = scalar_model()
    set_all(student, 0.)
    ema = EMA(student, decay=0.9)
    expected = []
    for value, by_hand in ((1., 0.1), (2., 0.29), (3., 0.561)):   # 0.9 * prev + 0.1 * value
        set_all(student, value)
        ema.update()
        expected.append(by_hand)
        for shadow in ema.model.weights:   # kernel, gamma, beta and BN moving mean/variance alike
            np.testing.assert_allclose(np.array(shadow), by_hand, rtol=1e-6)
    assert int(ema.updates.numpy()) == 3


def test_ema_warmup_uses_num_updates_decay():
    student = scalar_model()
    set_all(student, 0.)
    ema = EMA(student, decay=0.9, warmup=True)
    # decay_t = min(0.9, (1 + t) / (10 + t)): t=0 -> .1, t=1 -> 2/11, t=2 -> .25
    for value, by_hand in ((1., 0.9), (2., 1.8), (3., 2.7)):
        set_all(student, value)
        ema.update()
        np.testing.assert_allclose(np.array(ema.model.weights[0]), by_hand, rtol=1e-5)


def test_ema_model_is_independent_and_starts_equal():
    student = scalar_model()
    set_all(student, 0.5)
    ema = EMA(student, decay=0.99)
    assert ema.model is not student
    for a, b in zip(ema.model.weights, student.weights):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    set_all(student, 1.)
    assert np.array(ema.model.weights[0]).item() == 0.5   # only update() moves the shadow


@pytest.mark.parametrize('decay', [-0.1, 1.0, 1.5])
def test_ema_rejects_decay_outside_unit_interval(decay):
    with pytest.raises(ValueError, match='ema_decay'):
        EMA(scalar_model(), decay=decay)


def test_noisy_teacher_call_leaves_the_average_untouched():
    """ema(x, training=True): batch statistics (Mean Teacher's teacher), shadow stats unchanged."""
    import tensorflow as tf
    inputs = keras.Input((3,))
    student = keras.Model(inputs, keras.layers.BatchNormalization()(keras.layers.Dense(2)(inputs)))
    ema = EMA(student, decay=0.9)
    x = np.random.RandomState(0).normal(5., 3., (16, 3)).astype(np.float32)
    before = [np.array(w) for w in ema.model.weights]
    noisy = tf.function(lambda v: ema(v, training=True))(x)
    after = [np.array(w) for w in ema.model.weights]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    # batch statistics: each output unit is standardised over the batch (gamma 1, beta 0)
    np.testing.assert_allclose(np.mean(noisy, 0), 0., atol=1e-4)
    assert not np.allclose(noisy, ema(x))   # inference mode uses the moving averages instead


def test_ema_bn_student_averages_weights_and_copies_statistics():
    """--ema_bn=student (the anchors'): kernel, gamma and beta follow the EMA formula, the moving
    mean and variance are the student's own after every update."""
    student = scalar_model()
    set_all(student, 0.)
    ema = EMA(student, decay=0.9, bn='student')
    for value, by_hand in ((1., 0.1), (2., 0.29), (3., 0.561)):
        set_all(student, value)
        ema.update()
        for shadow, weight in zip(ema.model.weights, student.weights):
            expected = by_hand if weight.trainable else value
            np.testing.assert_allclose(np.array(shadow), expected, rtol=1e-6)


def test_ema_bn_recompute_reestimates_statistics_for_evaluation_only():
    """--ema_bn=recompute: inside the evaluation block, the mean over batches of the batch
    statistics of the averaged weights (kernel 2: batches [1, 3] and [5, 9] become [2, 6] and
    [10, 18], means 4 and 14, biased variances 4 and 16: mean 9, variance 10); after it, the
    student's statistics again."""
    import tensorflow as tf
    student = scalar_model()
    set_all(student, 2.)   # kernel 2; gamma, beta, moving mean and variance 2 too
    ema = EMA(student, decay=0.9, bn='recompute')
    ema.update()
    batches = [tf.constant([[1.], [3.]]), tf.constant([[5.], [9.]])]
    bn = ema.model.layers[-1]
    with ema.statistics_for_evaluation(batches):
        np.testing.assert_allclose(np.array(bn.moving_mean), [9.], rtol=1e-6)
        np.testing.assert_allclose(np.array(bn.moving_variance), [10.], rtol=1e-5)
    np.testing.assert_allclose(np.array(bn.moving_mean), [2.])
    np.testing.assert_allclose(np.array(bn.moving_variance), [2.])
    assert bn.momentum == 0.99   # the layer's own momentum is back
    np.testing.assert_allclose(np.array(ema.model.weights[0]), [[2.]])   # weights untouched


def test_polyak_is_the_uniform_average_from_its_start():
    from ssl_ema.core.ema import Polyak
    student = scalar_model()
    set_all(student, 0.)
    polyak = Polyak(student, start_step=1)
    # follows the student through update 2 (weights after step 2), then averages steps 2, 3, 4
    for value, by_hand in ((1., 1.), (2., 2.), (3., 2.5), (4., 3.)):
        set_all(student, value)
        polyak.update()
        np.testing.assert_allclose(np.array(polyak.model.weights[0]), by_hand, rtol=1e-6)


def test_power_ema_weighs_each_step_by_its_profile_mass():
    """Karras et al. 2024, Algorithm 2: after T updates with beta_t = (1 - 1/t)^(gamma + 1) the
    weights after step tau carry (tau^(gamma+1) - (tau-1)^(gamma+1)) / T^(gamma+1)."""
    from ssl_ema.core.ema import PowerEMA
    student = scalar_model()
    power = PowerEMA(student, sigma_rel=0.1)
    g = power.gamma
    values = [3., -1., 4., 1., 5.]
    for value in values:
        set_all(student, value)
        power.update()
    t = len(values)
    by_hand = sum((tau ** (g + 1) - (tau - 1) ** (g + 1)) / t ** (g + 1) * v
                  for tau, v in enumerate(values, 1))
    np.testing.assert_allclose(np.array(power.model.weights[0]), by_hand, rtol=1e-5)


def test_ema_scaling_rule(digits_data, tmp_path):
    """Busbridge et al. 2023: batch 64 = 4 x --ema_reference_batch=16 -> every decay d^4; logged."""
    from conftest import tiny_config
    from ssl_ema import algorithms
    from ssl_ema.core.ema import describe_averages, scaled_decay
    from ssl_ema.core.loop import Trainer
    assert scaled_decay(0.999, 64, 32) == pytest.approx(0.998001)
    cfg = tiny_config(algorithm='supervised', batch=64, ema_reference_batch=16, ema_decay=0.99,
                      ema_decays='0.9', polyak_start_fraction=0.5)
    trainer = Trainer(cfg, algorithms.ALGORITHMS['supervised'](), digits_data, str(tmp_path))
    assert trainer.ema.decay == pytest.approx(0.99 ** 4)
    assert trainer.averages['ema_0.9'].decay == pytest.approx(0.9 ** 4)
    text = describe_averages(trainer.averages, trainer.profiles, cfg, str(tmp_path))
    assert 'EMA scaling rule' in text and '--ema_reference_batch=16' in text
    unscaled = Trainer(dict_replace(cfg, ema_reference_batch=0), algorithms.ALGORITHMS['supervised'](),
                       digits_data, str(tmp_path / 'off'))
    assert unscaled.ema.decay == 0.99


def dict_replace(cfg, **changes):
    import dataclasses
    return dataclasses.replace(cfg, **changes)


def test_every_horizon_is_evaluated_and_recorded(tmp_path):
    """--ema_decays and --polyak_start_fraction: each average in evaluations.jsonl,
    accuracy.json and TensorBoard under its own key; the teacher stays 'ema'."""
    import json
    import tensorflow as tf
    from conftest import tiny_config
    from ssl_ema import algorithms
    from conftest import run
    cfg = tiny_config(algorithm='supervised', train_steps=20, ema_decays='0.9,0.999,0.99',
                      polyak_start_fraction=0.5, train_dir=str(tmp_path))
    summary = run(cfg, algorithms.ALGORITHMS['supervised'](), log=lambda *a: None)
    models = {'raw', 'ema', 'ema_0.9', 'ema_0.99', 'polyak'}   # 0.999 is the teacher's
    assert models <= set(summary) and 'ema_0.999' not in summary
    history = [json.loads(l) for l in (tmp_path / 'evaluations.jsonl').open()]
    assert all(models <= set(h) for h in history)
    tags = set()
    for name in os.listdir(tmp_path / 'tensorboard'):
        for event in tf.compat.v1.train.summary_iterator(str(tmp_path / 'tensorboard' / name)):
            tags.update(v.tag for v in event.summary.value)
    assert {f'accuracy/{m}/test' for m in models} <= tags
