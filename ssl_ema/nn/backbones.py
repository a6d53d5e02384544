"""Backbone classifiers shared by every algorithm (`--arch`). Keras 3, channels-last, logits out.

- `wrnD_K` (e.g. `wrn28_2`): Wide ResNet-D-K as in the SSL literature (Oliver et al. 2018; the
  FixMatch code base): pre-activation residual blocks, leaky ReLU 0.1, batch norm momentum 0.999.
- `cnn13`: the 13-layer "conv-large" of Laine & Aila 2017, used by Mean Teacher and VAT.
- `small_cnn`: a few-thousand-image CNN for tiny inputs such as the 8x8 digits;
  `small_cnn_wW` the same with W channels in its first block instead of 32; `small_cnn_lite`
  the same with one convolution at full resolution instead of two (0.67x the FLOPs).
- `auto`: `small_cnn` below 32 pixels, `wrn28_2` from 32 pixels up.
- `keras:PATH.keras`, `keras_hub:HANDLE_OR_DIR`, or a keras.Model given from Python: a backbone
  the user brings, pretrained or not, with what a classifier needs added (nn/custom_backbones.py).

Batch norm is `ssl_ema.nn.batch_norm.BatchNorm` (TensorFlow's fused kernel, same weights as the stock
layer); `build(..., portable=True)` uses stock Keras layers only, in float32, for models that
must load without this package. `precision` is a Keras mixed-precision policy: the layers compute
in bfloat16 or float16, the weights, batch-norm statistics and the logits stay float32.
"""
import contextlib
import functools
import math
import re
import weakref

import keras
import tensorflow as tf
from keras import layers

from ssl_ema.nn import batch_norm, custom_backbones
from ssl_ema.base.errors import ConfigError
from ssl_ema.base.machine import resolve_precision
from ssl_ema.base.hparams import parse_floats

LEAK = 0.1
PRECISIONS = ('float32', 'mixed_bfloat16', 'mixed_float16', 'auto')
_BATCH_NORM = {'layer': batch_norm.BatchNorm}   # what _bn_act builds; build() may swap it
FEATURES = custom_backbones.FEATURES   # the layer whose output the classification head reads


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
    x = _BATCH_NORM['layer'](momentum=momentum, epsilon=1e-3, synchronized=synchronized)(x)
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
    x = layers.GlobalAveragePooling2D(name=FEATURES)(x)
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
    x = layers.GlobalAveragePooling2D(name=FEATURES)(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name='cnn13')


def small_cnn(input_shape, num_classes, bn_momentum=0.9, width=32, lite=False):
    """Two blocks of two 3x3 convolutions (width, 2 width channels; 2x2 max-pool after each),
    a 3x3 convolution of 4 width channels, global average pooling. `width` 32 is `small_cnn`;
    `small_cnn_wW` sets it (the compute of a step grows as width^2). `lite` (`small_cnn_lite`)
    keeps one convolution of the first block: the second, width to width channels at full
    resolution, is a third of the FLOPs (at 28x28: 14.6 of 21.8 M multiply-adds are left)."""
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (width, 2 * width):
        x = _conv_bn_act(x, filters, 3, bn_momentum=bn_momentum)
        if not (lite and filters == width):
            x = _conv_bn_act(x, filters, 3, bn_momentum=bn_momentum)
        x = layers.MaxPooling2D(2, 2, padding='same')(x)
    x = _conv_bn_act(x, 4 * width, 3, bn_momentum=bn_momentum)
    x = layers.GlobalAveragePooling2D(name=FEATURES)(x)
    outputs = layers.Dense(num_classes)(x)
    name = 'small_cnn_lite' if lite else 'small_cnn' if width == 32 else f'small_cnn_w{width}'
    return keras.Model(inputs, outputs, name=name)


def call_keeping_statistics(model, x):
    """`model(x, training=True)` (batch statistics, dropout) that leaves the batch-norm moving
    averages as they were. For the extra passes whose inputs should not shape the statistics the
    model is evaluated with: VAT's perturbed images, MixMatch's label guessing, and the EMA
    teacher run in training mode (only `EMA.update()` may change the EMA). The anchors
    (google-research/fixmatch) likewise keep only the batch-norm updates of the main pass.
    `BatchNorm` layers skip their update; any other layer's statistics (stock Keras batch norm)
    are saved and restored around the call."""
    ours = {id(v) for layer in _layers(model) if isinstance(layer, batch_norm.BatchNorm)
            for v in layer.non_trainable_weights}
    stats = [v for v in model.non_trainable_weights if id(v) not in ours]
    saved = [tf.identity(v.value) for v in stats]
    with batch_norm.keeping_statistics():
        logits = model(x, training=True)
    # Ops on one variable run in program order, so the restore follows the call's own update.
    with tf.control_dependencies(tf.nest.flatten(logits)):   # (a list for a multi-head model)
        for v, value in zip(stats, saved):
            v.assign(value)
    return logits


def features(model):
    """The [N, C] features `model`'s classification head reads: the output of its layer named
    'features' (the global average pooling in our backbones and in the classifier around a
    backbone the user brings). Found by name, never by position: under --precision=mixed_* a
    float32 'logits' layer follows the head, and a user's backbone adds layers of its own."""
    try:
        return model.get_layer(FEATURES).output
    except ValueError:
        raise ConfigError(f'the model {model.name} has no layer named {FEATURES!r} (the pooled '
                          'features under its classification head): a backbone that keeps its '
                          'own head has none; give it without its head') from None


def logits_and_features(model):
    """A Keras model sharing every layer of `model` that returns [its logits, its pooled
    features] (`features`) from one pass, and the model of its classification head alone, from
    the pooled features to the logits (DASO's prototypes, CoSSL's classifier trained on mixed
    features). Built once per model."""
    if model not in _LOGITS_AND_FEATURES:
        pooled = features(model)
        _LOGITS_AND_FEATURES[model] = (
            keras.Model(model.inputs, [model.outputs[0], pooled], name=f'{model.name}_features'),
            keras.Model(pooled, model.outputs[0], name=f'{model.name}_classifier'))
    return _LOGITS_AND_FEATURES[model]


_LOGITS_AND_FEATURES = weakref.WeakKeyDictionary()   # model -> logits_and_features(model)


def feature_map(model):
    """What `model`'s pooling reads: the input of its layer named 'features' (found by name, as
    `features`), e.g. the [N, H, W, C] map of the last convolution (CRMatch's feature-distance
    head). A backbone that returns pooled features has [N, C] here: its features themselves."""
    features(model)   # the same refusal for a model without the layer
    return model.get_layer(FEATURES).input


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, 'layers'):
            yield from _layers(layer)


ARCHS = {'small_cnn': small_cnn, 'small_cnn_lite': functools.partial(small_cnn, lite=True),
         'cnn13': cnn13}   # plus wrnD_K and small_cnn_wW, parsed


def resolve(arch: str, input_shape, model=None) -> str:
    """The architecture's name as the run records it: --arch with `auto` decided by the image
    size, a keras:/keras_hub: path made absolute, or `model:<name>` for a keras.Model given from
    Python."""
    if model is not None:
        custom_backbones.check_supported(model, 'backbone')
        return f'model:{model.name}'
    if arch == 'auto':
        return 'small_cnn' if min(input_shape[:2]) < 32 else 'wrn28_2'
    if custom_backbones.is_custom(arch):
        return custom_backbones.resolve(arch)
    return arch


def build(arch: str, input_shape, num_classes: int, conv_bias: bool = False,
          precision: str = 'float32', portable: bool = False, model=None, normalization=None,
          freeze_bn: bool = False, scale=None, offset=None) -> keras.Model:
    """The backbone `arch` (see the module doc); `conv_bias` (--wrn_conv_bias) applies to wrnD_K
    only; `portable`: stock Keras layers, float32. A backbone the user brings: `model` (a
    keras.Model from Python) or --arch=keras:PATH / keras_hub:HANDLE_OR_DIR, built by
    nn/custom_backbones.py with `normalization` (the run's (mean, std)) and --backbone_scale,
    --backbone_offset (`scale`, `offset`). `freeze_bn` (--freeze_bn): every batch-norm layer
    keeps its statistics, scale and offset (custom_backbones.freeze_batch_norm)."""
    if precision not in PRECISIONS:
        raise ConfigError(f'--precision={precision} is unknown; valid: {", ".join(PRECISIONS)}')
    precision = resolve_precision(precision)
    if model is not None or custom_backbones.is_custom(arch):
        return custom_backbones.build(arch, input_shape, num_classes, model, normalization,
                                      'float32' if portable else precision, freeze_bn, scale,
                                      offset, fused=not portable)
    model = _build(arch, input_shape, num_classes, conv_bias, precision, portable)
    if freeze_bn:
        custom_backbones.freeze_batch_norm(model)
    return model


def for_run(cfg, input_shape, num_classes: int, normalization, portable: bool = False,
            model=None) -> keras.Model:
    """`build` with a run's TrainConfig flags (--arch, --wrn_conv_bias, --precision, --freeze_bn,
    --backbone_scale, --backbone_offset); `normalization`: the run's (mean, std)."""
    return build(cfg.arch, input_shape, num_classes, conv_bias=cfg.wrn_conv_bias,
                 precision=cfg.precision, portable=portable, model=model,
                 normalization=normalization, freeze_bn=cfg.freeze_bn,
                 scale=parse_floats(cfg.backbone_scale), offset=parse_floats(cfg.backbone_offset))


def _build(arch, input_shape, num_classes, conv_bias, precision, portable):
    arch = resolve(arch, input_shape)
    if portable:
        precision = 'float32'
    wrn = re.fullmatch(r'wrn(\d+)_(\d+)', arch)
    narrow = re.fullmatch(r'small_cnn_w([1-9]\d*)', arch)
    if not wrn and not narrow and arch not in ARCHS:
        raise ConfigError(f'--arch={arch} is unknown; valid: auto, small_cnn, small_cnn_wW '
                          '(e.g. small_cnn_w24), small_cnn_lite, cnn13, wrnD_K (e.g. wrn28_2), '
                          'keras:PATH.keras, keras_hub:HANDLE_OR_DIR')
    with _building(precision, layers.BatchNormalization if portable else batch_norm.BatchNorm):
        if wrn:
            model = wide_resnet(input_shape, num_classes, int(wrn[1]), int(wrn[2]),
                                conv_bias=conv_bias)
        elif narrow:
            model = small_cnn(input_shape, num_classes, width=int(narrow[1]))
        else:
            model = ARCHS[arch](input_shape, num_classes)
        if precision == 'float32':
            return model
        # Logits (and so every loss) in float32, as the Keras mixed-precision guide advises.
        logits = layers.Activation('linear', dtype='float32', name='logits')(model.outputs[0])
        return keras.Model(model.inputs[0], logits, name=model.name)


@contextlib.contextmanager
def _building(precision, batch_norm_layer):
    """Layers made inside take `precision` as dtype policy and `batch_norm_layer` as batch norm."""
    policy, layer = keras.config.dtype_policy(), _BATCH_NORM['layer']
    keras.config.set_dtype_policy(precision)
    _BATCH_NORM['layer'] = batch_norm_layer
    try:
        yield
    finally:
        keras.config.set_dtype_policy(policy)
        _BATCH_NORM['layer'] = layer
