"""Extra heads beside a classifier's logits, on its pooled features found by name
(backbones.features): a Dense head (ReMixMatch's rotation head) or a normalised projection head
(SimMatch's and CoMatch's embeddings). Only the algorithms that declare heads get them
(algorithms/base.Algorithm.heads; the trainer builds and checkpoints them)."""
import dataclasses
from typing import Dict

import keras

from ssl_ema.nn.backbones import features


@dataclasses.dataclass(frozen=True)
class Projection:
    """A normalised projection head: Dense(width of the features) - ReLU - Dense(units), its
    output L2-normalised (SimCLR's MLP; SimMatch's and CoMatch's, USB's SimMatch_Net/CoMatch_Net
    without use_epass's three averaged copies)."""
    units: int


def with_heads(student, heads: Dict[str, object]):
    """A model sharing every layer of `student` that returns [logits, *one output per head], each
    head new layers on the student's pooled features (its layer named 'features', found by name:
    nn/backbones.features; a backbone that keeps its own head has none and is refused with a
    ConfigError). A head is `units` (one Dense layer named head_<name>: ReMixMatch's rotation
    head) or Projection(units) (layers head_<name>_hidden and head_<name>, unit-length output).
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
        else:
            outputs.append(keras.layers.Dense(head or classes, name=f'head_{name}')(pooled))
    return keras.Model(student.inputs, outputs, name=f'{student.name}_heads')
