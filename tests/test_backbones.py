import numpy as np
import pytest
import tensorflow as tf

from ssl_ema.nn import backbones


@pytest.mark.parametrize('arch, shape, params', [
    ('wrn28_2', (32, 32, 3), (1.45e6, 1.50e6)),   # WRN-28-2: ~1.47M parameters in the literature
    ('cnn13', (32, 32, 3), (3.0e6, 3.2e6)),       # conv-large: ~3.1M
    ('small_cnn', (8, 8, 1), (1e4, 2e5)),
])
def test_backbone_shapes_and_sizes(arch, shape, params):
    model = backbones.build(arch, shape, 10)
    assert params[0] < model.count_params() < params[1], model.count_params()
    out = model(np.zeros((2,) + shape, np.float32), training=False)
    assert out.shape == (2, 10)


def test_wrn_depth_and_width_from_the_name():
    small = backbones.build('wrn10_1', (16, 16, 3), 4)
    assert small.count_params() < backbones.build('wrn16_2', (16, 16, 3), 4).count_params()


def test_auto_picks_by_image_size():
    assert backbones.resolve('auto', (8, 8, 1)) == 'small_cnn'
    assert backbones.resolve('auto', (32, 32, 3)) == 'wrn28_2'


def test_call_keeping_statistics_is_a_training_pass_that_leaves_the_moving_averages():
    model = backbones.build('small_cnn', (8, 8, 1), 10)
    x = tf.random.stateless_normal((6, 8, 8, 1), [1, 2]) * 3. + 1.   # far from the init stats
    before = [np.array(v) for v in model.non_trainable_weights]
    with tf.GradientTape() as tape:
        logits = tf.function(backbones.call_keeping_statistics)(model, x)
        loss = tf.reduce_sum(tf.square(logits))
    assert all(g is not None for g in tape.gradient(loss, model.trainable_variables))
    for b, v in zip(before, model.non_trainable_weights):
        np.testing.assert_array_equal(b, np.array(v))
    # the same logits as an ordinary training pass (batch statistics), which does move them
    np.testing.assert_allclose(logits, model(x, training=True), rtol=1e-5, atol=1e-5)
    assert any(not np.allclose(b, np.array(v)) for b, v in zip(before, model.non_trainable_weights))
