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
