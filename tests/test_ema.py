"""The EMA against its formula, computed by hand over several steps."""
import keras
import numpy as np
import pytest

from ssl_ema.ema import EMA


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
