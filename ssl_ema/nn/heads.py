"""Extra heads beside a classifier's logits, on its pooled features found by name
(backbones.features): a Dense head (ReMixMatch's rotation head), a normalised projection head
(SimMatch's and CoMatch's embeddings) or an MLP (CRMatch's rotation head, ShrinkMatch's auxiliary
classifier), which may read the feature map before the pooling instead (CRMatch's
feature-distance head: backbones.feature_map). Only the algorithms that declare heads get them
(algorithms/base.Algorithm.heads; the trainer builds and checkpoints them)."""
import dataclasses
from typing import Dict, Union

import keras
import tensorflow as tf

from ssl_ema.nn import batch_norm
from ssl_ema.nn.backbones import feature_map, features


@dataclasses.dataclass(frozen=True)
class Projection:
    """A normalised projection head: Dense(width of the features) - ReLU - Dense(units), its
    output L2-normalised (SimCLR's MLP; SimMatch's and CoMatch's, USB's SimMatch_Net/CoMatch_Net
    without use_epass's three averaged copies)."""
    units: int


@dataclasses.dataclass(frozen=True)
class MLP:
    """`hidden_layers` Dense layers of `width_fraction` times the features' width, each followed
    by batch norm (if `batch_norm`: synchronised across replicas, as the backbones') and a leaky
    ReLU of slope `negative_slope` (0: ReLU), then Dense(units) in float32 (its loss is computed
    in float32 under --precision=mixed_*). `units`: a number, 'classes' (the logits' width) or
    'features' (the pooled features' width). `feature_map`: read the flattened feature map under
    the pooling (the input of the layer named 'features') instead of the pooled features."""
    units: Union[int, str]
    hidden_layers: int = 0
    width_fraction: float = 1.
    batch_norm: bool = False
    negative_slope: float = 0.
    feature_map: bool = False


def _mlp(name, head: MLP, pooled, inputs, num_classes):
    width = {'classes': num_classes, 'features': pooled.shape[-1]}
    x = keras.layers.Flatten(name=f'head_{name}_flatten')(inputs) if head.feature_map else pooled
    synchronized = tf.distribute.get_strategy().num_replicas_in_sync > 1
    for i in range(head.hidden_layers):
        x = keras.layers.Dense(max(1, int(pooled.shape[-1] * head.width_fraction)),
                               name=f'head_{name}_hidden{i}')(x)
        if head.batch_norm:   # torch's BatchNorm1d defaults: momentum 0.1, eps 1e-5
            x = batch_norm.BatchNorm(momentum=0.9, epsilon=1e-5, synchronized=synchronized,
                                     name=f'head_{name}_bn{i}')(x)
        x = keras.layers.LeakyReLU(head.negative_slope, name=f'head_{name}_act{i}')(x)
    return keras.layers.Dense(width.get(head.units, head.units), dtype='float32',
                              name=f'head_{name}')(x)


def with_heads(student, heads: Dict[str, object]):
    """A model sharing every layer of `student` that returns [logits, *one output per head], each
    head new layers on the student's pooled features (its layer named 'features', found by name:
    nn/backbones.features; a backbone that keeps its own head has none and is refused with a
    ConfigError). A head is `units` (one Dense layer named head_<name>: ReMixMatch's rotation
    head), Projection(units) (layers head_<name>_hidden and head_<name>, unit-length output) or
    MLP(...) (head_<name>_hidden<i>, ..., head_<name>).
    Only the algorithms that declare heads get this model: every other one's student, its
    checkpoint and its export are the classifier alone."""
    pooled = features(student)
    outputs = [student.outputs[0]]
    classes = student.outputs[0].shape[-1]
    for name, head in heads.items():
        if isinstance(head, Projection):
            hidden = keras.layers.Dense(pooled.shape[-1], activation='relu',
                                        name=f'head_{name}_hidden')(pooled)
            projected = keras.layers.Dense(head.units, name=f'head_{name}')(hidden)
            outputs.append(keras.layers.UnitNormalization(name=f'head_{name}_normalized')(
                projected))
        elif isinstance(head, MLP):
            outputs.append(_mlp(name, head, pooled,
                                feature_map(student) if head.feature_map else None,
                                student.outputs[0].shape[-1]))
        else:
            outputs.append(keras.layers.Dense(head or classes, name=f'head_{name}')(pooled))
    return keras.Model(student.inputs, outputs, name=f'{student.name}_heads')
