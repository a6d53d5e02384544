"""Extra heads beside a classifier's logits, on its pooled features found by name
(backbones.features): a Dense head (ReMixMatch's rotation head), a normalised projection head
(SimMatch's and CoMatch's embeddings) or an MLP (CRMatch's rotation head, ShrinkMatch's auxiliary
classifier), which may read the feature map before the pooling instead (CRMatch's
feature-distance head: backbones.feature_map), and the open-set heads whose "unknown" score an
open-set algorithm is evaluated and exported with: K one-vs-all classifiers (OpenMatch's) or
IOMatch's projection with its one-vs-all and (K+1)-way classifiers. Only the algorithms that
declare heads get them (algorithms/base.Algorithm.heads; the trainer builds and checkpoints
them, and the averages carry an open-set algorithm's heads, and with --teacher=ema those the
targets read: core/ema.Average.carry_heads, algorithms/base.averages_carry_heads)."""
import dataclasses
from typing import Dict, Union

import keras
import tensorflow as tf
from keras import ops

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


# An image is called unknown when its unknown score exceeds this: OpenMatch's one-vs-all rule
# (arXiv 2105.14148, Sec. 3.3: the outlier probability of the predicted class above 0.5; OP_Match
# utils/misc.py, exclude_dataset and test), also for the evaluation's (K+1)-way prediction.
UNKNOWN_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class OneVsAll:
    """K one-vs-all classifiers on the pooled features: Dense(2K) without bias (OpenMatch's
    fc_open, VisionLearningGroup/OP_Match models/wideresnet.py), read as [N, 2, K] (the authors'
    view(N, 2, K)): row 0 the logits of "not class k" (outlier), row 1 of "class k" (inlier);
    each pair is a softmax (ova_probabilities). Unknown score: the outlier probability of the
    class the classifier predicts (unknown_score)."""


@dataclasses.dataclass(frozen=True)
class OpenSetProjection:
    """IOMatch's heads (nukezil/IOMatch semilearn/algorithms/iomatch/iomatch.py, IOMatchNet): a
    projection Dense(width of the features) - ReLU - Dense(units), and on it K one-vs-all
    classifiers Dense(2K) without bias (laid out as OneVsAll's) and a (K+1)-way open-set
    classifier Dense(K+1), its last class "unknown". Output: [N, 2K + K + 1], the one-vs-all
    logits then the open-set logits (split_open_set). Unknown score: see unknown_score."""
    units: int = 128


def ova_probabilities(ova_logits):
    """[N, 2, K] pairs (outlier, inlier) of probabilities from one-vs-all logits [N, 2K]."""
    k = ova_logits.shape[-1] // 2
    return ops.softmax(ops.reshape(ops.cast(ova_logits, 'float32'), (-1, 2, k)), axis=1)


def split_open_set(output, num_classes: int):
    """(one-vs-all logits [N, 2K], (K+1)-way logits [N, K+1]) of an OpenSetProjection's output."""
    return output[:, :2 * num_classes], output[:, 2 * num_classes:]


def unknown_score(head, logits, output):
    """The "unknown" score [N] in [0, 1] of an open-set head's `output` beside the classifier's
    `logits` (above 0.5: called unknown, accuracy.UNKNOWN_THRESHOLD): OneVsAll, the outlier
    probability of the predicted class (OpenMatch, Sec. 3.3, OP_Match utils/misc.py test's
    unk_score); OpenSetProjection, q_{K+1} / (q_{K+1} + max_k q_k) over the (K+1)-way
    classifier's probabilities q, above 0.5 exactly where class K+1 is its arg-max (IOMatch's
    open-set prediction, the authors' evaluate.ipynb evaluate_io: pred_q = argmax q). Keras ops:
    it serialises inside an exported model."""
    k = logits.shape[-1]
    if isinstance(head, OneVsAll):
        predicted = ops.one_hot(ops.argmax(logits, axis=-1), k)
        return ops.sum(ova_probabilities(output)[:, 0, :] * predicted, axis=-1)
    if isinstance(head, OpenSetProjection):
        q = ops.softmax(ops.cast(split_open_set(output, k)[1], 'float32'), axis=-1)
        return q[:, k] / (q[:, k] + ops.max(q[:, :k], axis=-1))
    raise ValueError(f'{type(head).__name__} heads give no unknown score')


def scoring_model(heads_model, heads: Dict[str, object], unknown_head: str):
    """A model of the same input returning [logits, unknown score [N]] from a model with heads
    (with_heads): the score of the head named `unknown_head`."""
    outputs = dict(zip(heads, heads_model.outputs[1:]))
    logits = heads_model.outputs[0]
    return keras.Model(heads_model.inputs,
                       [logits, unknown_score(heads[unknown_head], logits, outputs[unknown_head])],
                       name=f'{heads_model.name}_scores')


def _open_set_projection(name, head: OpenSetProjection, pooled, num_classes):
    hidden = keras.layers.Dense(pooled.shape[-1], activation='relu',
                                name=f'head_{name}_hidden')(pooled)
    projected = keras.layers.Dense(head.units, name=f'head_{name}_projection')(hidden)
    ova = keras.layers.Dense(2 * num_classes, use_bias=False, dtype='float32',
                             name=f'head_{name}_ova')(projected)
    open_set = keras.layers.Dense(num_classes + 1, dtype='float32',
                                  name=f'head_{name}_open')(projected)
    return keras.layers.Concatenate(dtype='float32', name=f'head_{name}')([ova, open_set])


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
    MLP(...) (head_<name>_hidden<i>, ..., head_<name>), OneVsAll() (head_<name>, 2K units) or
    OpenSetProjection(units) (head_<name>_hidden, _projection, _ova, _open, and head_<name>).
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
        elif isinstance(head, OneVsAll):
            outputs.append(keras.layers.Dense(2 * classes, use_bias=False, dtype='float32',
                                              name=f'head_{name}')(pooled))
        elif isinstance(head, OpenSetProjection):
            outputs.append(_open_set_projection(name, head, pooled, classes))
        elif isinstance(head, MLP):
            outputs.append(_mlp(name, head, pooled,
                                feature_map(student) if head.feature_map else None,
                                student.outputs[0].shape[-1]))
        else:
            outputs.append(keras.layers.Dense(head or classes, name=f'head_{name}')(pooled))
    return keras.Model(student.inputs, outputs, name=f'{student.name}_heads')
