"""Backbone classifiers shared by every algorithm (`--arch`). Keras 3, channels-last, logits out.

- `wrnD_K` (e.g. `wrn28_2`): Wide ResNet-D-K as in the SSL literature (Oliver et al. 2018; the
  FixMatch code base): pre-activation residual blocks, leaky ReLU 0.1, batch norm momentum 0.999.
- `cnn13`: the 13-layer "conv-large" of Laine & Aila 2017, used by Mean Teacher and VAT.
- `small_cnn`: a few-thousand-image CNN for tiny inputs such as the 8x8 digits.
- `auto`: `small_cnn` below 32 pixels, `wrn28_2` from 32 pixels up.
"""
import functools
import math
import re

import keras
import tensorflow as tf
from keras import layers

from ssl_ema.config import ConfigError

LEAK = 0.1


def _conv(filters, kernel, strides=1, padding='same', use_bias=False):
    # He-normal fan-out initialisation, as the WRN papers use.
    std = math.sqrt(2. / (kernel * kernel * filters))
    return layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=use_bias,
                         kernel_initializer=keras.initializers.RandomNormal(stddev=std))


def _bn_act(x, momentum):
    # Built under a multi-replica tf.distribute strategy, batch norm uses the global batch's
    # statistics (all-reduced): every replica then moves its copy of the moving averages the
    # same way, and training matches one device on the same global batch.
    synchronized = tf.distribute.get_strategy().num_replicas_in_sync > 1
    x = layers.BatchNormalization(momentum=momentum, epsilon=1e-3, synchronized=synchronized)(x)
    return layers.LeakyReLU(LEAK)(x)


def wide_resnet(input_shape, num_classes, depth=28, width=2, bn_momentum=0.999, conv_bias=False):
    """`conv_bias`: every convolution gets a (zero-initialised) bias, as the anchors'
    tf.layers.conv2d defaults (libml/models.py ResNet); the WRN papers have none."""
    if (depth - 4) % 6:
        raise ConfigError(f'--arch=wrn{depth}_{width}: depth must be 6n+4 (e.g. 16, 22, 28)')
    blocks = (depth - 4) // 6
    conv = functools.partial(_conv, use_bias=conv_bias)

    def residual(x, filters, stride, activate_before_residual=False):
        y = _bn_act(x, bn_momentum)
        if activate_before_residual:
            x = y
        y = conv(filters, 3, stride)(y)
        y = _bn_act(y, bn_momentum)
        y = conv(filters, 3)(y)
        if x.shape[-1] != filters or stride != 1:
            x = conv(filters, 1, stride)(x)
        return layers.Add()([x, y])

    inputs = keras.Input(input_shape)
    x = conv(16, 3)(inputs)
    for scale in range(3):
        filters = 16 * width << scale
        x = residual(x, filters, 2 if scale else 1, activate_before_residual=scale == 0)
        for _ in range(blocks - 1):
            x = residual(x, filters, 1)
    x = _bn_act(x, bn_momentum)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, kernel_initializer='glorot_normal')(x)
    return keras.Model(inputs, outputs, name=f'wrn{depth}_{width}')


def _conv_bn_act(x, filters, kernel, padding='same', bn_momentum=0.99):
    x = layers.Conv2D(filters, kernel, padding=padding)(x)
    return _bn_act(x, bn_momentum)


def cnn13(input_shape, num_classes, dropout=0.5, bn_momentum=0.99):
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (128, 256):
        for _ in range(3):
            x = _conv_bn_act(x, filters, 3, bn_momentum=bn_momentum)
        x = layers.MaxPooling2D(2, 2, padding='same')(x)
        x = layers.Dropout(dropout)(x)
    # The 3x3 'valid' convolution needs at least 3x3 maps; on tiny inputs it pads instead.
    x = _conv_bn_act(x, 512, 3, 'valid' if min(x.shape[1:3]) >= 3 else 'same', bn_momentum)
    x = _conv_bn_act(x, 256, 1, bn_momentum=bn_momentum)
    x = _conv_bn_act(x, 128, 1, bn_momentum=bn_momentum)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name='cnn13')


def small_cnn(input_shape, num_classes, bn_momentum=0.9):
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (32, 64):
        x = _conv_bn_act(x, filters, 3, bn_momentum=bn_momentum)
        x = _conv_bn_act(x, filters, 3, bn_momentum=bn_momentum)
        x = layers.MaxPooling2D(2, 2, padding='same')(x)
    x = _conv_bn_act(x, 128, 3, bn_momentum=bn_momentum)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name='small_cnn')


def call_keeping_statistics(model, x):
    """`model(x, training=True)` (batch statistics, dropout) that leaves the batch-norm moving
    averages as they were. For the extra passes whose inputs should not shape the statistics the
    model is evaluated with: VAT's perturbed images, MixMatch's label guessing, and the EMA
    teacher run in training mode (only `EMA.update()` may change the EMA). The anchors
    (google-research/fixmatch) likewise keep only the batch-norm updates of the main pass."""
    stats = model.non_trainable_weights   # the moving means and variances
    saved = [tf.identity(v.value) for v in stats]
    logits = model(x, training=True)
    # Ops on one variable run in program order, so the restore follows the call's own update.
    with tf.control_dependencies(tf.nest.flatten(logits)):   # (a list for a multi-head model)
        for v, value in zip(stats, saved):
            v.assign(value)
    return logits


ARCHS = {'small_cnn': small_cnn, 'cnn13': cnn13}   # plus wrnD_K, parsed from the name


def resolve(arch: str, input_shape) -> str:
    if arch == 'auto':
        return 'small_cnn' if min(input_shape[:2]) < 32 else 'wrn28_2'
    return arch


def build(arch: str, input_shape, num_classes: int, conv_bias: bool = False) -> keras.Model:
    """`conv_bias` (--wrn_conv_bias) applies to wrnD_K only."""
    arch = resolve(arch, input_shape)
    wrn = re.fullmatch(r'wrn(\d+)_(\d+)', arch)
    if wrn:
        return wide_resnet(input_shape, num_classes, int(wrn[1]), int(wrn[2]),
                           conv_bias=conv_bias)
    if arch in ARCHS:
        return ARCHS[arch](input_shape, num_classes)
    raise ConfigError(f'--arch={arch} is unknown; valid: auto, small_cnn, cnn13, '
                      f'wrnD_K (e.g. wrn28_2)')
