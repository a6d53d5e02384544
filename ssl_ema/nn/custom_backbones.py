"""Backbones the user brings: `--arch=keras:PATH.keras`, `--arch=keras_hub:HANDLE_OR_DIR`, or, from
Python, a `keras.Model` (`fit(backbone=model)`), pretrained or not, fine-tuned by every algorithm.

The toolkit adds what a classifier needs and nothing else, as stock Keras layers around the
backbone (`classifier`):

  standardised images (what the data pipeline feeds every backbone, --input_norm)
  -> `pixels`:     the standardisation undone: float32 pixels, 0..255
  -> `to_rgb`:     a grey image's channel repeated three times, if the backbone wants three
  -> `resize`:     to the backbone's input size, if it has a fixed one (e.g. a ViT) that differs
                   from the images' (--image_size resizes the images themselves, in the data)
  -> `backbone_preprocessing`: pixels * scale + offset, per channel: a keras-hub preset's image
                   converter's (ImageConverter.scale and .offset); for a Keras file or object
                   --backbone_scale and --backbone_offset (default 1 and 0: 0..255 pixels, the
                   convention of self-contained Keras models such as keras.applications'
                   EfficientNet and ssl_ema.pretrain's backbone.keras)
  -> the backbone
  -> `features`:   global average pooling of a feature map [N, H, W, C] or of a token
                   sequence [N, T, C] (timm's 'avg' pool); a [N, C] output is kept as it is
                   (an identity layer of that name: extra heads find the features by name)
  -> `head`:       a new Dense layer sized to the dataset's classes, in float32.

A backbone whose own output already has the dataset's number of classes keeps it (no pooling, no
new head). The preprocessing is part of the model, so training, evaluation, export and predict all
apply it identically, and an exported model needs nothing but Keras (and keras_hub, to load a
keras-hub backbone). Every model the toolkit makes of it (the EMA and the other averages, the
exported classifier) is a clone of this graph.

Supported backbones: functional and Sequential models, keras-hub backbones (functional), and
subclassed models whose get_config()/from_config() rebuild them (the EMA clones the model, and
export and evaluation rebuild it). Each must have one image input [N, H, W, C] (channels last) and
one output. Anything else is refused with one line naming what is missing.

Limits: a backbone that keeps its own head has no `features` layer, so an algorithm with extra
heads on the features (ReMixMatch's rotation head, SimMatch's and CoMatch's projection head:
algorithms/base.with_heads) refuses it; a [N, C] output with C equal to the number of classes is
taken for logits. Under a multi-replica
strategy batch norm is synchronised (as the toolkit's own backbones): two mirrored replicas train a
.keras backbone as one device does (tests/test_distribute.py). --precision edits the layers' dtype
policies in the serialised config, so a custom layer that hard-codes float32 computes in float32.
For training and evaluation the stock
batch-norm layers a functional or Sequential backbone's config lists run on TensorFlow's fused
kernel (`nn/batch_norm.BatchNorm`: same weights, same formulas; a keras-hub backbone builds its own
layers and keeps them); the export rebuilds the backbone with its stock layers.
"""
import os
import re

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from ssl_ema.base.errors import ConfigError, one_line
from ssl_ema.nn import batch_norm

KERAS, KERAS_HUB = 'keras:', 'keras_hub:'
HEAD = 'head'   # the new classification head's layer name (its own learning rate: --head_lr)
FEATURES = 'features'   # the layer whose output the head reads (the extra heads' input too)
# keras-hub requires tensorflow-text, which requires the full `tensorflow` wheel (572 MB, and it
# overwrites tensorflow-cpu's files); keras_hub imports and runs without it (measured: 0.32.0).
INSTALL_HUB = ('pip install "ssl_ema[keras_hub]" (with tensorflow-cpu: pip install --no-deps '
               'keras-hub && pip install kagglehub kagglesdk==0.1.28 regex rich packaging '
               'tokenizers sentencepiece)')


def is_custom(arch: str) -> bool:
    return arch.startswith((KERAS, KERAS_HUB))


def resolve(arch: str) -> str:
    """--arch with a file or local preset directory made absolute: the run records it, and
    export, evaluation and resumed runs (from any directory) rebuild the model from it."""
    kind, source = arch.split(':', 1)
    if kind + ':' == KERAS or os.path.isdir(source):
        source = os.path.abspath(source)
    return f'{kind}:{source}'


def build(arch: str, input_shape, num_classes: int, model=None, normalization=None,
          precision: str = 'float32', freeze_bn: bool = False, scale=None, offset=None,
          fused: bool = True):
    """The classifier on the backbone that --arch names (keras:/keras_hub:) or on `model` (a
    keras.Model given from Python, copied: the caller's model is never trained in place).
    `scale`/`offset` (--backbone_scale/--backbone_offset, lists of floats; empty or None: 1 and
    0, or a keras-hub preset's own). `fused`: the stock batch-norm layers that the backbone's
    config lists (functional and sequential models) become `batch_norm.BatchNorm`, the same
    weights on TensorFlow's fused kernel (1.37x faster FixMatch steps from a BYOL small_cnn,
    runs/SPEED.md); False (export): stock layers only."""
    # Under a multi-replica tf.distribute strategy batch norm uses the global batch's statistics,
    # as the toolkit's own backbones (backbones._bn_act): every replica's copy moves alike.
    synchronized = tf.distribute.get_strategy().num_replicas_in_sync > 1
    if model is not None:
        what, preprocessing = f'backbone {getattr(model, "name", "")}'.strip(), None
        check_supported(model, what)
        backbone, weights = _copy(model, precision, synchronized, what, fused)
    else:
        what = f'--arch={arch}'
        backbone, preprocessing = load(arch)
        check_supported(backbone, what)
        weights = None
        if precision != 'float32' or synchronized or (fused and _has_batch_norm(backbone)):
            backbone, weights = _copy(backbone, precision, synchronized, what, fused)
    if scale or offset:   # the flags win over a preset's converter
        preprocessing = (scale or 1., offset or 0.)
    return classifier(backbone, input_shape, num_classes, normalization, preprocessing,
                      freeze_bn=freeze_bn, what=what, weights=weights)


def load(arch: str):
    """(backbone, its preprocessing as (scale, offset) or None) for --arch=keras:/keras_hub:."""
    if arch.startswith(KERAS):
        path = _source(arch)
        if not os.path.isfile(path):
            raise ConfigError(f'--arch={arch}: no such file; give a Keras 3 model file '
                              '(model.save("PATH.keras"))')
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as e:   # noqa: BLE001 (Keras raises anything from a user's file)
            raise ConfigError(f'--arch={arch}: cannot load {path} ({one_line(e)}); custom layers '
                              'must be registered (keras.saving.register_keras_serializable) '
                              'and imported') from None
        return model, None
    if not arch.startswith(KERAS_HUB):
        raise ConfigError(f'--arch={arch} is neither keras:PATH nor keras_hub:HANDLE_OR_DIR')
    return _load_preset(_source(arch))


def _source(arch):
    return arch.split(':', 1)[1]


def _load_preset(handle):
    arch = KERAS_HUB + handle
    try:
        import keras_hub
    except ImportError:
        raise ConfigError(f'--arch={arch} needs keras-hub, which is not installed: '
                          f'{INSTALL_HUB}') from None
    try:
        backbone = keras_hub.models.Backbone.from_preset(handle)
    except (OSError, ConnectionError) as e:   # requests' and kagglehub's network errors
        raise ConfigError(f'--arch={arch}: cannot download the preset (offline?): '
                          f'{one_line(e)}; give a local preset directory (Backbone.save_to_preset)'
                          ) from None
    except ValueError as e:
        raise ConfigError(f'--arch={arch}: not a keras-hub preset ({one_line(e)}); give a '
                          'Kaggle or Hugging Face handle or a directory written by '
                          'save_to_preset') from None
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(handle)
    except (ValueError, OSError):
        converter = None   # a backbone saved without its preprocessor: no scale or offset
    if converter is None or (converter.scale is None and converter.offset is None):
        return backbone, None
    return backbone, (converter.scale, converter.offset)


def check_supported(model, what: str) -> None:
    """One line naming what is missing if the toolkit cannot use `model` as a backbone."""
    if not isinstance(model, keras.Model):
        raise ConfigError(f'{what} is a {type(model).__name__}, not a keras.Model (functional, '
                          'Sequential, a keras-hub backbone, or subclassed with get_config)')
    if not model.built:
        raise ConfigError(f'{what}: the model {model.name} is not built; call it on a batch of '
                          'images (or model.build(input_shape)) first')
    if len(getattr(model, 'outputs', None) or [None]) != 1:
        raise ConfigError(f'{what}: the model needs exactly one output')


def _is_batch_norm(node) -> bool:
    return isinstance(node, dict) and node.get('class_name') == 'BatchNormalization' and \
        node.get('module') == 'keras.layers'


def _has_batch_norm(model) -> bool:
    """Whether `model`'s config lists a stock batch-norm layer (a keras-hub backbone's config
    holds its arguments, not its layers: False)."""
    def find(node):
        if _is_batch_norm(node):
            return True
        values = node.values() if isinstance(node, dict) else \
            node if isinstance(node, list) else ()
        return any(find(v) for v in values)
    return find(keras.saving.serialize_keras_object(model))


def _copy(model, precision, synchronized, what, fused=False):
    """(a new `model` of the same config, maybe unbuilt, with every float32 layer computing in
    `precision` (a mixed policy: weights stay float32), if `synchronized` every batch norm
    synchronised across replicas, if `fused` every stock batch norm our fused `BatchNorm`;
    `model`'s weights): `classifier` builds the copy and sets them (the layers swapped have the
    same weights in the same order). The serialised config is edited, so this works for every
    supported kind, and fails, naming what is missing, for a model that cannot be rebuilt from
    its config (which the EMA's copy and export's rebuilding need too)."""
    def edit(node):
        if isinstance(node, dict):
            if node.get('class_name') == 'DTypePolicy' and \
                    node.get('config', {}).get('name') == 'float32':
                return {**node, 'config': {**node['config'], 'name': precision}}
            swap = fused and _is_batch_norm(node)
            node = {k: edit(v) for k, v in node.items()}
            if synchronized and node.get('class_name') == 'BatchNormalization':
                node['config'] = {**node['config'], 'synchronized': True}
            if swap:
                node.update(module=batch_norm.BatchNorm.__module__, class_name='BatchNorm',
                            registered_name=keras.saving.get_registered_name(
                                batch_norm.BatchNorm))
            return node
        if isinstance(node, list):
            return [edit(v) for v in node]
        return node
    try:
        config = edit(keras.saving.serialize_keras_object(model))
        copy = keras.saving.deserialize_keras_object(config)
    except Exception as e:   # noqa: BLE001 (whatever the user's get_config/from_config raise)
        raise ConfigError(f'{what}: {type(model).__name__} cannot be rebuilt from its config '
                          '(a subclassed model needs get_config() and from_config(): the EMA '
                          f'copies the model and export rebuilds it): {one_line(e)}') from None
    return copy, model.get_weights()


def _vector(value, channels, what):
    """A scalar or per-channel list as `channels` float32 values."""
    v = np.asarray(value, np.float32).reshape(-1)
    if v.size == 1:
        v = np.repeat(v, channels)
    if v.size != channels:
        raise ConfigError(f'{what} has {v.size} values; the backbone takes {channels} channels')
    return v


def classifier(backbone, input_shape, num_classes: int, normalization=None, preprocessing=None,
               freeze_bn: bool = False, what: str = 'the backbone', weights=None) -> keras.Model:
    """The classifier around `backbone` described in the module doc. `normalization`: the run's
    (mean, std) (None: the inputs are pixels already); `preprocessing`: the backbone's (scale,
    offset) on 0..255 pixels, each a number or one per channel (None: 1 and 0); `weights`: set
    on the backbone once it is built (a copy made by `_copy`)."""
    if freeze_bn:
        freeze_batch_norm(backbone)
    wants = tuple(backbone.inputs[0].shape[1:]) if getattr(backbone, 'inputs', None) else \
        (None, None, None)
    if len(wants) != 3:
        raise ConfigError(f'{what}: takes inputs of shape {wants}, not images [H, W, C]')
    height, width, channels = input_shape
    inputs = keras.Input(tuple(input_shape), name='images')
    x = inputs
    if normalization is not None:
        mean, std = (np.asarray(v, np.float32).reshape(-1) for v in normalization)
        x = layers.Normalization(mean=mean.tolist(), variance=np.square(std).tolist(),
                                 invert=True, name='pixels')(x)
    if wants[2] not in (None, channels):
        if not (channels == 1 and wants[2] == 3):
            raise ConfigError(f'{what} takes {wants[2]} channels; the dataset has {channels}')
        x = layers.Concatenate(name='to_rgb')([x, x, x])
        channels = 3
    if None not in wants[:2] and tuple(wants[:2]) != (height, width):
        x = layers.Resizing(*wants[:2], interpolation='bilinear', name='resize')(x)
    scale, offset = preprocessing or (None, None)
    if scale is not None or offset is not None:
        scale = _vector(1. if scale is None else scale, channels, 'the backbone\'s scale')
        offset = _vector(0. if offset is None else offset, channels, 'the backbone\'s offset')
        x = layers.Rescaling(scale.tolist(), offset.tolist(), name='backbone_preprocessing')(x)
    try:
        y = backbone(x)
    except Exception as e:   # noqa: BLE001 (any failure to trace the user's model on our images)
        raise ConfigError(f'{what} cannot take images of shape {tuple(x.shape[1:])} '
                          f'({one_line(e)})') from None
    if weights is not None:   # the copy is built now (by the call above)
        backbone.set_weights(weights)
    if isinstance(y, (list, tuple, dict)):
        raise ConfigError(f'{what} returns a {type(y).__name__}; it must return one tensor '
                          '(features, a feature map, a token sequence or logits)')
    rank = len(y.shape)
    if rank == 2 and y.shape[-1] == num_classes:
        outputs = y   # the backbone's own head already predicts the dataset's classes
    else:
        pools = {4: layers.GlobalAveragePooling2D, 3: layers.GlobalAveragePooling1D}
        if rank in pools:
            y = pools[rank](name=FEATURES)(y)
        elif rank == 2:   # features already: named so, as every backbone's (backbones.features)
            y = layers.Identity(name=FEATURES)(y)
        else:
            raise ConfigError(f'{what}: its output has shape {tuple(y.shape)}; a classifier '
                              'needs features [N, C], a feature map or a token sequence')
        outputs = layers.Dense(num_classes, dtype='float32', name=HEAD)(y)
    if outputs.dtype != 'float32':   # logits (and every loss) in float32 under mixed precision
        outputs = layers.Activation('linear', dtype='float32', name='logits')(outputs)
    return keras.Model(inputs, outputs, name=f'{backbone.name}_classifier')


def freeze_batch_norm(model) -> None:
    """--freeze_bn: every batch-norm layer of `model` runs in inference mode on its pretrained
    statistics, which never move, and its scale and offset stay as they are (Keras 3:
    BatchNormalization.trainable = False; the Keras transfer-learning guide's fine-tuning)."""
    for layer in model._flatten_layers():
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False


# ---- fine-tuning: per-variable learning rates ----------------------------------------------
_BLOCK = re.compile(r'^(.*?block_?\d+)')


def lr_multipliers(model, variables, layer_decay: float = 1., head_lr_scale: float = 1.):
    """One learning-rate multiplier per variable of `variables` (the model's trainable ones).

    Layer-wise decay (--layer_decay; BEiT, Bao et al. 2022, fine-tuning, and USB's
    param_groups_layer_decay with timm's ViT grouping): with B blocks (variables whose path names
    `...block<i>`, e.g. keras-hub's transformer_block_<i> or stack<s>_block<b>, counted in order),
    the variables before the first block (stem, embeddings) get layer_decay^B, block i
    layer_decay^(B - 1 - i), those after the last block and the head 1. A model without named
    blocks counts each layer with weights as a block. The head (layer `head`) gets
    head_lr_scale (--head_lr / --lr) on top."""
    head = set()
    try:
        head = {id(v) for v in model.get_layer(HEAD).trainable_variables}
    except ValueError:
        pass
    body = [v for v in variables if id(v) not in head]
    keys = [_BLOCK.match(v.path) for v in body]
    if not any(keys):   # no named blocks: every layer with weights is one
        keys = [v.path.rsplit('/', 1)[0] for v in body]
    else:
        keys = [m.group(1) if m else None for m in keys]
    order = list(dict.fromkeys(k for k in keys if k is not None))
    blocks = {k: i for i, k in enumerate(order)}
    first = keys.index(order[0]) if order else 0
    depth = {}
    for n, (v, k) in enumerate(zip(body, keys)):
        if k is not None:
            depth[id(v)] = len(order) - 1 - blocks[k]
        else:   # before the first block: the stem; after: the final norm
            depth[id(v)] = len(order) if n < first else 0
    return [head_lr_scale if id(v) in head else layer_decay ** depth[id(v)] for v in variables]


class PerVariableLearningRate:
    """Mixin for a Keras optimizer: each variable's update uses lr * its multiplier (Keras 3 has no
    parameter groups; update_step receives the learning rate of the step)."""

    def set_multipliers(self, multipliers):
        self._multipliers = [float(m) for m in multipliers]   # in the order of build(variables)

    def update_step(self, gradient, variable, learning_rate):
        m = self._multipliers[self._get_variable_index(variable)]
        if m != 1.:
            learning_rate = learning_rate * m
        return super().update_step(gradient, variable, learning_rate)


def with_multipliers(optimizer_class):
    """`optimizer_class` with PerVariableLearningRate mixed in."""
    return type(optimizer_class.__name__, (PerVariableLearningRate, optimizer_class), {})
