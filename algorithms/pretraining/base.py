"""What a self-supervised pretraining method is: a dataclass of its hyperparameters, its heads and
its loss on the views of one batch of unlabeled images.

The shared loop (ssl_ema/core/pretraining.py) builds the student as backbone + the method's
`head` (the network whose weights the EMA averages into the teacher), adds the method's
`online_heads` (trained with the student, never averaged: BYOL's predictor), feeds the views the
method names (ssl_ema/data/views.py), and after each optimizer step moves the teacher towards the
student with the cosine schedule of the method's `teacher_momentum` (ssl_ema/core/ema.py
CosineEMA). A method receives the student, the teacher (an EMA: `teacher(x, training=True)` runs
the averaged weights on the batch's statistics without touching them) and the views, and returns
its loss, the metrics it wants logged and the new values of its declared state (DINO's centre).
Register with `@register('name')`; the fields become flags of `python -m ssl_ema.pretrain`.
"""
import dataclasses
from typing import Dict, Tuple

import keras
import tensorflow as tf

from ssl_ema.algorithms import base as algorithms_base
from ssl_ema.algorithms.base import (ConfigError, State, check_hyperparameters,  # noqa: F401
                                     define_algorithm_flags, from_flags, hparam, initial_state,
                                     replica_mean)

METHODS: Dict[str, type] = {}

SHARED_HELP = {
    'teacher_momentum': 'Base EMA decay tau_base of the teacher; it rises to 1 along '
                        'tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (BYOL Sec. 3.2; DINO '
                        'main_dino.py cosine_scheduler).',
    'hidden_dim': 'Hidden units of the head\'s MLP layers.',
}

# Valid values of hyperparameters, checked whenever a method is built: name -> (test, rule).
VALID = {
    'teacher_momentum': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'hidden_dim': (lambda v: v > 0, '> 0'),
    'projection_dim': (lambda v: v > 0, '> 0'),
    'out_dim': (lambda v: v > 0, '> 0'),
    'bottleneck_dim': (lambda v: v > 0, '> 0'),
    'student_temperature': (lambda v: v > 0, '> 0'),
    'teacher_temperature': (lambda v: v > 0, '> 0'),
    'warmup_teacher_temperature': (lambda v: v > 0, '> 0'),
    'teacher_temperature_warmup': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'center_momentum': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'local_crops': (lambda v: v >= 0, '>= 0'),
}


@dataclasses.dataclass
class Losses:
    loss: tf.Tensor
    metrics: Dict[str, tf.Tensor] = dataclasses.field(default_factory=dict)
    state: Dict[str, tf.Tensor] = dataclasses.field(default_factory=dict)   # new state values


class Method:
    views: Tuple[str, ...] = ()   # names in ssl_ema.data.views.VIEWS, one per augmented view
    exported = 'ema'              # the backbone written at the end: 'ema' (teacher) or 'raw'
    teacher_momentum: float = 0.996

    def state(self, num_classes: int, pool_size: int) -> Dict[str, State]:
        """The method's state (name -> State), checkpointed, handed in as `state` and updated
        from `Losses.state` exactly as an algorithm's (ssl_ema.algorithms.base.Algorithm.state,
        whose `initial_state` makes its initial values)."""
        return {}

    def head(self, feature_dim: int) -> keras.Model:
        """The head on the backbone's pooled features; the teacher averages it with the backbone."""
        raise NotImplementedError

    def online_heads(self, output_dim: int) -> Dict[str, keras.Model]:
        """Heads on the head's output that only the student has (name -> model)."""
        return {}

    def __post_init__(self):
        check_hyperparameters(self, VALID, 'method')

    def __call__(self, student, teacher, online, views, progress, state) -> Losses:
        """`student`: backbone + head (Keras model); `teacher`: its EMA; `online`: the
        online heads; `views`: one batch per name of `views`; `progress`: step / total steps."""
        raise NotImplementedError


def mlp(input_dim, hidden_dim, output_dim, name, layers=2, activation='relu', batch_norm=True,
        **dense):
    """Dense -> [batch norm] -> activation, (layers - 1) times, then a Dense output layer. Batch
    norm over the global batch under tf.distribute, as the backbones' (ssl_ema.nn.backbones)."""
    synchronized = tf.distribute.get_strategy().num_replicas_in_sync > 1
    inputs = keras.Input((input_dim,))
    x = inputs
    for _ in range(layers - 1):
        x = keras.layers.Dense(hidden_dim, **dense)(x)
        if batch_norm:   # BYOL's bn_config: decay 0.9, eps 1e-5 (byol/configs/byol.py)
            x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5,
                                                synchronized=synchronized)(x)
        x = keras.layers.Activation(activation)(x)
    return keras.Model(inputs, keras.layers.Dense(output_dim, **dense)(x), name=name)


def register(name: str):
    """Class decorator: a dataclass named `name` in METHODS (the --method flag's values)."""
    return algorithms_base.register(name, METHODS)


def define_method_flags():
    """One flag per hyperparameter name across the registered methods."""
    define_algorithm_flags(METHODS, SHARED_HELP, __name__)


def create(name: str, **overrides) -> Method:
    """The method `name` with hyperparameters from the parsed flags (and `overrides`)."""
    if name not in METHODS:
        raise ConfigError(f'--method={name} is unknown; valid: {", ".join(sorted(METHODS))}')
    return from_flags(METHODS[name], **overrides)
