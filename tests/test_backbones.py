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


def test_small_cnn_width_from_the_name():
    """small_cnn_wW: W, 2W, 4W channels (the default's are 32, 64, 128); W=32 is small_cnn."""
    convs = lambda m: [layer.filters for layer in m.layers if hasattr(layer, 'filters')]
    assert convs(backbones.build('small_cnn', (8, 8, 1), 10)) == [32, 32, 64, 64, 128]
    narrow = backbones.build('small_cnn_w16', (8, 8, 1), 10)
    assert convs(narrow) == [16, 16, 32, 32, 64] and narrow.name == 'small_cnn_w16'
    assert convs(backbones.build('small_cnn_w32', (8, 8, 1), 10)) == [32, 32, 64, 64, 128]
    with pytest.raises(Exception, match='--arch=small_cnn_w0 is unknown; valid: .*small_cnn_wW'):
        backbones.build('small_cnn_w0', (8, 8, 1), 10)
    lite = backbones.build('small_cnn_lite', (28, 28, 1), 10)   # one convolution at 28x28
    assert convs(lite) == [32, 64, 64, 128] and lite.name == 'small_cnn_lite'
    assert [layer.output.shape[1] for layer in lite.layers if hasattr(layer, 'filters')] == \
        [28, 14, 14, 7]


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


@pytest.mark.parametrize('precision', ['float32', 'mixed_bfloat16'])
def test_extra_heads_read_the_pooled_features_found_by_name(precision):
    """ReMixMatch's rotation head (algorithms/base.with_heads) reads the pooled features, not the
    logits, whatever follows the classifier's Dense (mixed precision adds a float32 'logits'
    layer), for our backbones and for a keras.Model the user brings (a feature map, or features
    already); a backbone that keeps its own head has no pooled features and is refused."""
    import keras
    from ssl_ema.algorithms import base
    from ssl_ema.base.errors import ConfigError
    feature_map = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(6, 3)], name='map')
    flat = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten()], name='flat')
    for model, width in [(backbones.build('small_cnn', (8, 8, 1), 10, precision=precision), 128),
                         (backbones.build('wrn10_1', (8, 8, 1), 10, precision=precision), 64),
                         (backbones.build('auto', (8, 8, 1), 10, precision=precision,
                                          model=feature_map), 6),
                         (backbones.build('auto', (8, 8, 1), 10, precision=precision,
                                          model=flat), 64)]:
        heads = base.with_heads(model, {'rotation': 4})
        assert backbones.features(model).shape[-1] == width
        assert heads.get_layer('head_rotation').kernel.shape == (width, 4)
        assert [o.shape[-1] for o in heads(np.zeros((2, 8, 8, 1), np.float32))] == [10, 4]
    own_head = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                 keras.layers.Dense(10)], name='own')
    with pytest.raises(ConfigError, match="no layer named 'features'.*keeps its own head"):
        base.with_heads(backbones.build('auto', (8, 8, 1), 10, model=own_head), {'rotation': 4})
