"""What an algorithm is: a dataclass of its hyperparameters and a loss on one batch.

An algorithm receives the student, the EMA teacher and a `Batch`, and returns `Losses`. Everything
else (loop, optimizer, schedules, EMA update, distribution, checkpoints, logging) is shared.
Register with `@register('name')`; its dataclass fields become flags (`--helpfull` shows them
under the algorithm's module). A field declared by several algorithms (e.g. `consistency_weight`)
is one flag, listed under this module with every algorithm's default; its default (None) means
"this algorithm's own default".
"""
import dataclasses
from typing import Dict, Tuple

import tensorflow as tf
from absl import flags

from ssl_ema import losses
from ssl_ema.backbones import call_keeping_statistics
from ssl_ema.config import ConfigError, define_flags, from_flags, hparam  # noqa: F401

ALGORITHMS: Dict[str, type] = {}

# Help of the flags that several algorithms declare (each algorithm's own help is about itself).
SHARED_HELP = {
    'consistency_weight': 'Weight of the unlabeled loss (its value after the ramp-up, for the '
                          'algorithms that ramp it up).',
    'confidence_threshold': 'Largest class probability a prediction needs for its image to count '
                            '(as a pseudo-label or as a consistency target).',
    'mixup_alpha': 'alpha of the Beta(alpha, alpha) distribution of mixup coefficients.',
    'temperature': 'Temperature T sharpening the unlabeled targets (p^(1/T), normalised).',
    'ramp_up': 'Shape of the consistency weight\'s ramp-up over --warmup_fraction of training: '
               'linear (the anchors\', every algorithm), sigmoid (exp(-5(1-t)^2), the Pi-model, '
               'Mean Teacher and ICT papers) or none.',
    'bn_passes': 'joint: labeled and unlabeled images go through one training-mode pass (batch '
                 'norm normalises over all of them and its moving statistics follow all of them, '
                 'as FixMatch); separate: one pass per batch, and only the labeled pass moves '
                 'the statistics (the anchors\' pi_model.py, pseudo_label.py, mean_teacher.py, '
                 'ict.py). joint is the default: our CPU results (runs/RESULTS.md) were '
                 'measured with it.',
}

# Valid values of hyperparameters, checked whenever an algorithm is built: name -> (test, rule).
VALID = {
    'consistency_weight': (lambda v: v >= 0, '>= 0'),
    'entmin_weight': (lambda v: v >= 0, '>= 0'),
    'input_noise': (lambda v: v >= 0, '>= 0'),
    'confidence_threshold': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'mixup_alpha': (lambda v: v > 0, '> 0'),
    'temperature': (lambda v: v > 0, '> 0'),
    'label_guess_views': (lambda v: v >= 1, '>= 1'),
    'vat_eps': (lambda v: v > 0, '> 0'),
    'vat_xi': (lambda v: v > 0, '> 0'),
    'ramp_up': (lambda v: v in losses.RAMPUPS, 'one of ' + ', '.join(losses.RAMPUPS)),
    'bn_passes': (lambda v: v in ('joint', 'separate'), 'joint or separate'),
}


@dataclasses.dataclass
class Batch:
    labeled_x: tf.Tensor
    labels: tf.Tensor
    unlabeled: Tuple[tf.Tensor, ...]   # the views named by the algorithm's `views`, same images
    ramp: tf.Tensor                    # consistency ramp-up in [0, 1] (the algorithm's `ramp_up`)
    rng: tf.random.Generator           # checkpointed, so a resumed run draws the same noise
    progress: tf.Tensor = 0.           # step / total steps, in [0, 1] (UDA's TSA schedule)
    # Model-input units per unit of the anchors' [-1, 1] pixel scale, per channel (127.5 / std
    # with standardised inputs): input noise and VAT's epsilon are defined in pixel units.
    pixel_scale: tf.Tensor = 1.


@dataclasses.dataclass
class Losses:
    labeled: tf.Tensor                 # supervised term
    unlabeled: tf.Tensor               # everything else, weights and ramp-up already applied
    metrics: Dict[str, tf.Tensor] = dataclasses.field(default_factory=dict)


class Algorithm:
    views: Tuple[str, ...] = ('weak',)  # augmentations of each unlabeled image it needs
    consistency_weight: float = 0.
    # Shape of batch.ramp over the first warmup_fraction of training (losses.RAMPUPS). The
    # algorithms that ramp declare it as a field (the shared --ramp_up flag, each with its
    # paper's default); FixMatch and UDA keep 'none'.
    ramp_up: str = 'linear'

    def __post_init__(self):
        for f in dataclasses.fields(self):
            test, rule = VALID.get(f.name, (None, None))
            if test and not test(getattr(self, f.name)):
                raise ConfigError(f'--{f.name}={getattr(self, f.name)} is invalid for '
                                  f'--algorithm={self.name}: it must be {rule}')

    def __call__(self, student, teacher, batch: Batch) -> Losses:
        """`student` is the Keras model being trained; `teacher` the `ssl_ema.ema.EMA`:
        `teacher(x)` is the averaged classifier, `teacher(x, training=True)` the same weights
        with batch statistics and dropout (Mean Teacher's noisy teacher)."""
        raise NotImplementedError


def forward(model, batch: Batch, *unlabeled, passes='joint'):
    """Run `model` in training mode on the labeled images and the `unlabeled` batches.

    passes='joint': one concatenated pass, so batch norm normalises and updates its statistics
    over the labeled and unlabeled images alike (as FixMatch does). 'separate': one pass per
    batch, each normalised by its own statistics, and only the labeled pass moves the moving
    averages (the anchors' pi_model.py, mean_teacher.py, ...: "Take only first call to update
    batch norm"). Returns (labeled cross-entropy, [logits of each unlabeled batch]).
    """
    if passes == 'separate':
        logits = [model(batch.labeled_x, training=True)]
        logits += [call_keeping_statistics(model, u) for u in unlabeled]
    else:
        logits = concat_forward(model, batch.labeled_x, *unlabeled)
    return losses.cross_entropy(batch.labels, logits[0]), logits[1:]


def concat_forward(model, *parts):
    """The logits of each of `parts`, from one training-mode forward pass over all of them (for
    algorithms that feed transformed labeled images, like MixMatch's mixup, or no labeled ones)."""
    logits = model(tf.concat(parts, 0), training=True)
    return tf.split(logits, [tf.shape(p)[0] for p in parts], 0)


def register(name: str):
    def wrap(cls):
        cls = dataclasses.dataclass(cls)
        cls.name = name
        ALGORITHMS[name] = cls
        return cls
    return wrap


def define_algorithm_flags():
    """One flag per hyperparameter name across all registered algorithms."""
    owners: Dict[str, list] = {}
    for name, cls in sorted(ALGORITHMS.items()):
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append((name, f))
    define = {float: flags.DEFINE_float, int: flags.DEFINE_integer, str: flags.DEFINE_string}
    for field, owned in owners.items():
        if len(owned) > 1 and field not in flags.FLAGS:
            help_text = SHARED_HELP.get(field, owned[0][1].metadata['help'])
            defaults = ', '.join(f'{name} {f.default}' for name, f in owned)
            define[type(owned[0][1].default)](field, None, f'{help_text} Default: {defaults}.',
                                              module_name=__name__)
    for cls in ALGORITHMS.values():
        define_flags(cls, cls.__module__)   # skips the shared flags defined above


def ignored_flags(algorithm: Algorithm) -> list:
    """Algorithm flags given on the command line (or in a flagfile) that `algorithm` does not
    declare, so would silently do nothing, e.g. --vat_eps with --algorithm=fixmatch."""
    own = {f.name for f in dataclasses.fields(algorithm)}
    every = {f.name for cls in ALGORITHMS.values() for f in dataclasses.fields(cls)}
    return sorted(name for name in every - own if flags.FLAGS[name].present)


def create(name: str, **overrides) -> Algorithm:
    """The algorithm `name` with hyperparameters from the parsed flags (and `overrides`)."""
    if name not in ALGORITHMS:
        raise ConfigError(f'--algorithm={name} is unknown; valid: {", ".join(sorted(ALGORITHMS))}')
    return from_flags(ALGORITHMS[name], **overrides)
