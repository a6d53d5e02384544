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

from ssl_ema.nn import losses
from ssl_ema.nn.backbones import call_keeping_statistics
from ssl_ema.nn.heads import (MLP, OneVsAll, OpenSetProjection, Projection,  # noqa: F401
                              with_heads)
from ssl_ema.base.errors import ConfigError  # noqa: F401
from ssl_ema.base.hparams import define_flags, from_flags, hparam
# An algorithm's state, its replicas, banks and queues (algorithms/state.py), here for imports.
from ssl_ema.algorithms.state import (LABELED_PRIOR, State, declared_state, enqueue,  # noqa: F401
                                      initial_state, replica_concat, replica_mean,
                                      replica_offset, scatter_last, starts_at_prior)

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
               'linear (the anchors\' for every algorithm that ramps; their fixmatch.py and '
               'uda.py keep a constant weight), sigmoid (exp(-5(1-t)^2), the Pi-model, Mean '
               'Teacher and ICT papers), cosine (1/2 - cos(pi t)/2, AdaMatch\'s mu(t)) or none.',
    'bn_passes': 'joint: labeled and unlabeled images go through one training-mode pass (batch '
                 'norm normalises over all of them and its moving statistics follow all of them, '
                 'as FixMatch); separate: one pass per batch, and only the labeled pass moves '
                 'the statistics (the anchors\' pi_model.py, pseudo_label.py, mean_teacher.py, '
                 'ict.py). joint is the default: our CPU results (runs/RESULTS.md) were '
                 'measured with it.',
    'teacher': 'Model whose predictions become the targets or pseudo-labels: student (the model '
               'being trained) or ema (the EMA of its weights, in inference mode).',
    'state_momentum': 'Momentum of the algorithm\'s running averages of its predictions.',
    'similarity_temperature': 'Temperature t of the softmax over cosine similarities of the '
                              'projection head\'s embeddings (softmax(z . m / t)).',
    'smoothing_alpha': 'Weight alpha of the model\'s own prediction in a pseudo-label smoothed by '
                       'its memory neighbours\' labels (alpha p + (1 - alpha) neighbours).',
    'projection_units': 'Width of the normalised projection head\'s embeddings.',
    'start_fraction': 'Fraction of training before the first pass of the EMA model over the '
                      'pool (darp: its first refinement; openmatch: its first inlier selection, '
                      'from which FixMatch trains).',
    'threshold_warmup': 'FlexMatch\'s threshold warm-up: unused images count in the '
                        'normalisation of the learning effect (Sec. 3.3).',
    'prediction_window': 'Distribution alignment\'s estimate of the unlabeled predictions\' '
                         'class distribution is the mean of the last this many batches\' mean '
                         'predictions; 0: a moving average with --state_momentum instead '
                         '(adamatch, remixmatch; simmatch and comatch need >= 1; shrinkmatch: '
                         'no alignment).',
}

TEACHERS = ('student', 'ema')   # --teacher: who makes the targets (see target_logits)

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
    'teacher': (lambda v: v in TEACHERS, ' or '.join(TEACHERS)),
    'state_momentum': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'fairness_weight': (lambda v: v >= 0, '>= 0'),
    'pre_mixup_weight': (lambda v: v >= 0, '>= 0'),
    'rotation_weight': (lambda v: v >= 0, '>= 0'),
    'n_sigma': (lambda v: v > 0, '> 0'),
    'strong_views': (lambda v: v >= 1, '>= 1'),
    'prediction_window': (lambda v: v >= 0, '>= 0'),
    'threshold_scale': (lambda v: v > 0, '> 0'),
    'threshold_decay': (lambda v: v >= 1, '>= 1'),
    'min_threshold': (lambda v: v >= 0, '>= 0'),
    'supervised_fraction': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'threshold_every_fraction': (lambda v: v > 0, '> 0'),
    'similarity_temperature': (lambda v: v > 0, '> 0'),
    'smoothing_alpha': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'projection_units': (lambda v: v >= 1, '>= 1'),
    'instance_weight': (lambda v: v >= 0, '>= 0'),
    'contrast_weight': (lambda v: v >= 0, '>= 0'),
    'contrast_threshold': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'bank_momentum': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'queue_size': (lambda v: v >= 1, '>= 1'),
    'distance_weight': (lambda v: v >= 0, '>= 0'),
    'shrink_weight': (lambda v: v >= 0, '>= 0'),
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
    state: Dict[str, tf.Tensor] = dataclasses.field(default_factory=dict)   # see Algorithm.state
    unlabeled_index: tf.Tensor = None  # each unlabeled image's index in the pool (needs_indices)
    heads: object = None               # the student with the algorithm's `heads` (see with_heads)
    # Each labeled image's index in the labeled set (needs_labeled_indices), and its views named
    # by the algorithm's `labeled_views` (labeled_x is the run's --augment view).
    labeled_index: tf.Tensor = None
    labeled_views: Tuple[tf.Tensor, ...] = ()


@dataclasses.dataclass
class Losses:
    labeled: tf.Tensor                 # supervised term
    unlabeled: tf.Tensor               # everything else, weights and ramp-up already applied
    metrics: Dict[str, tf.Tensor] = dataclasses.field(default_factory=dict)
    state: Dict[str, tf.Tensor] = dataclasses.field(default_factory=dict)   # new state values


class Algorithm:
    views: Tuple[str, ...] = ('weak',)  # augmentations of each unlabeled image it needs
    consistency_weight: float = 0.
    # Shape of batch.ramp over the first warmup_fraction of training (losses.RAMPUPS). The
    # algorithms that ramp declare it as a field (the shared --ramp_up flag, each with its
    # paper's default); FixMatch and UDA keep 'none'.
    ramp_up: str = 'linear'
    needs_indices = False   # True: batch.unlabeled_index holds the images' indices in the pool
    # True: batch.labeled_index holds the labeled images' indices in the labeled set, and
    # `state` takes the labeled set's size as a third argument (a per-labeled-image bank).
    needs_labeled_indices = False
    # Augmentations of each labeled image besides labeled_x's (e.g. ('strong',)), in
    # batch.labeled_views; each draws its own seed, and labeled_x stays as without them.
    labeled_views: Tuple[str, ...] = ()
    # Extra heads on the pooled features: name -> units (a Dense head) or Projection(units).
    # (0 units: one per class)
    heads: Dict[str, object] = {}
    # The head (a name in `heads`: nn/heads.OneVsAll or OpenSetProjection) whose "unknown"
    # score an open-set algorithm is evaluated (the AUROC of known vs unknown), exported and
    # predicted with; every average then carries the heads (core/ema.Average.carry_heads).
    # None: a closed-set algorithm, scored by 1 - max softmax.
    unknown_head = None
    # True: the targets read a head's output (SimMatch's and CoMatch's embeddings, IOMatch's
    # outlier scores). With --teacher=ema every average then carries the heads, and the
    # targets' head outputs are the averaged heads' on the EMA features (target_outputs), as
    # the EMA teacher of USB, the CoMatch authors' ImageNet code and SimMatch's is the whole
    # model with its projection head. (averages_carry_heads)
    targets_read_heads = False
    # A pass of the EMA model over the whole unlabeled pool (core/pool.py) every this many steps
    # (0: never), or every this fraction of training (pool_pass_every_fraction, when the steps
    # are 0), but no more often than once every pool_pass_every_pool_epochs epochs of the pool
    # (the steps in which the run reads as many unlabeled images as the pool holds; alone, that
    # often): the trainer hands its class probabilities to `from_pool` (DARP, OpenMatch). Never
    # at step 0 (core/pool.pass_due).
    pool_pass_every_steps = 0
    pool_pass_every_fraction = 0.
    pool_pass_every_pool_epochs = 0.
    pool_pass_start = 0.   # ... from this fraction of training on (0: after one interval)

    def from_pool(self, probabilities, state: Dict[str, 'np.ndarray'], progress: float,
                  unknown=None) -> dict:
        """New state values (name -> array) from the EMA model's class probabilities [pool
        size, K] on every pool image, in pool-index order, at training `progress` in [0, 1];
        `unknown`: each pool image's unknown score [pool size] (an open-set algorithm's)."""
        return {}

    def state(self, num_classes: int, pool_size: int) -> Dict[str, 'State']:
        """The algorithm's state (running averages, thresholds, banks, queues): name -> State.
        The trainer makes one variable of each, checkpoints it and hands its value in
        `batch.state`; the algorithm returns the new values in `Losses.state`. Under
        tf.distribute the new values must be the same on every replica: compute them from
        statistics reduced with `replica_mean` or `replica_concat` (the trainer keeps the first
        replica's). A per-image bank is a State of [images, ...] updated by `scatter_last`; a FIFO
        queue a State of [rows, ...] and an int32 pointer updated by `enqueue`. With
        `needs_labeled_indices` the trainer calls state(num_classes, pool_size, labeled_size)."""
        return {}

    def __post_init__(self):
        check_hyperparameters(self, VALID, 'algorithm')

    def __call__(self, student, teacher, batch: Batch) -> Losses:
        """`student` is the Keras model being trained; `teacher` the `ssl_ema.core.ema.EMA`:
        `teacher(x)` is the averaged classifier, `teacher(x, training=True)` the same weights
        with batch statistics and dropout (Mean Teacher's noisy teacher)."""
        raise NotImplementedError


def check_hyperparameters(obj, valid: dict, flag: str) -> None:
    """ConfigError naming the first field of dataclass `obj` whose value fails its test in
    `valid` (name -> (test, rule)), as --name=value is invalid for --<flag>=<obj.name>."""
    for f in dataclasses.fields(obj):
        test, rule = valid.get(f.name, (None, None))
        if test and not test(getattr(obj, f.name)):
            raise ConfigError(f'--{f.name}={getattr(obj, f.name)} is invalid for '
                              f'--{flag}={obj.name}: it must be {rule}')


def align_to_uniform(probs, window):
    """Distribution alignment to a uniform target over a window of batch means (USB's
    DistAlignQueueHook with p_target 'uniform': SimMatch's and CoMatch's): the window [W, C] of
    the last batches' mean predictions, oldest first, takes this batch's (every replica's), and
    probs * (1/C) / mean(window) is renormalised. Returns (aligned probs, the new window)."""
    window = tf.concat([window[1:], replica_mean(tf.reduce_mean(probs, 0))[None]], 0)
    uniform = tf.fill(tf.shape(probs)[-1:], 1. / probs.shape[-1])
    return losses.align_distribution(probs, uniform, tf.reduce_mean(window, 0)), window


def check_base(plugged, bases: Tuple[str, ...], what: str) -> None:
    """ConfigError unless the --base_algorithm of a method plugged on one (ABC, DARP) is among
    the `bases` it is written for (names, or a dict keyed by them); `what` says what the method
    does with it."""
    if plugged.base_algorithm not in bases:
        raise ConfigError(f'--base_algorithm={plugged.base_algorithm} is not one {plugged.name} '
                          f'{what}; valid: {", ".join(bases)}')


def target_logits(algorithm, teacher, x, student_logits):
    """The logits that targets or pseudo-labels come from, gradient stopped: the student's own
    (`student_logits`, already computed on `x`) with --teacher=student; with --teacher=ema the
    EMA model's on `x` in inference mode (moving batch-norm statistics, no dropout): the averaged
    classifier that is evaluated, so a pseudo-label is exactly the EMA model's prediction and its
    confidence is not shaken by the batch's own statistics (Mean Teacher's noisy training-mode
    teacher feeds a soft squared-error cost; thresholded pseudo-labels want the calibrated one)."""
    if algorithm.teacher == 'ema':
        return tf.stop_gradient(teacher(x))
    return tf.stop_gradient(student_logits)


def target_outputs(algorithm, teacher, parts, student_outputs):
    """target_logits for an algorithm whose targets read its heads (`targets_read_heads`): the
    outputs targets come from, gradient stopped, as concat_forward_heads returns them (for each
    output, the logits then each head's, its value on each of `parts`). --teacher=student: the
    student's own `student_outputs`, already computed on `parts`; --teacher=ema: the EMA model
    with its averaged heads (teacher.heads, core/ema.Average.carry_heads) on `parts`, one
    inference-mode pass, so the heads read the EMA features through the averaged head weights,
    never the student's."""
    if algorithm.teacher == 'ema':
        if teacher.heads is None:
            raise ValueError(f'{algorithm.name} with --teacher=ema needs an EMA teacher that '
                             'carries its heads (core/ema.Average.carry_heads)')
        outputs = teacher.heads(tf.concat(parts, 0), training=False)
        sizes = [tf.shape(p)[0] for p in parts]
        return [[tf.stop_gradient(v) for v in tf.split(out, sizes, 0)] for out in outputs]
    return [[tf.stop_gradient(v) for v in out] for out in student_outputs]


def averages_carry_heads(algorithm) -> bool:
    """Whether every average carries the algorithm's heads (core/ema.Average.carry_heads, under
    run_dir.AVERAGE_HEADS in the checkpoint): an open-set algorithm's, whose evaluation, pool
    pass and export read a head, and with --teacher=ema the heads its targets read
    (`targets_read_heads`). The others' averages, and their checkpoints, are the classifier
    alone."""
    if not algorithm.heads:
        return False
    return bool(algorithm.unknown_head) or (algorithm.targets_read_heads
                                            and getattr(algorithm, 'teacher', None) == 'ema')


def teacher_field(default='student'):
    """The --teacher field of an algorithm that makes targets from a model's prediction."""
    return hparam(default, 'Model whose predictions become the targets: student or ema.')


class WeakStrong(Algorithm):
    """FixMatch's family (FlexMatch, FreeMatch, SoftMatch): targets from a weak view of each
    unlabeled image train the prediction on a strong view, with a constant unlabeled weight."""
    views = ('weak', 'strong')
    ramp_up = 'none'

    def weak_strong(self, student, teacher, batch: Batch):
        """One training pass over labeled, weak and strong images (shared batch norm). Returns
        (labeled cross-entropy, the targets' class probabilities on the weak view, gradient
        stopped and from --teacher, strong-view logits)."""
        labeled, weak_logits, strong_logits = self.weak_strong_logits(student, teacher, batch)
        return (losses.cross_entropy(batch.labels, labeled), tf.nn.softmax(weak_logits),
                strong_logits)

    def weak_strong_logits(self, student, teacher, batch: Batch):
        """weak_strong's pass, in logits: (labeled logits, the targets' weak-view logits,
        gradient stopped and from --teacher, strong-view logits), for the methods that reweigh
        the labeled loss or shift the logits (SAW, DebiasPL)."""
        weak, strong = batch.unlabeled
        labeled, weak_logits, strong_logits = concat_forward(student, batch.labeled_x, weak,
                                                             strong)
        return labeled, target_logits(self, teacher, weak, weak_logits), strong_logits


class EmbeddingMemory(Algorithm):
    """SimMatch's and CoMatch's shared frame: a normalised projection head of the field
    `projection_units` (Projection), and distribution alignment to uniform over the last
    `prediction_window` (>= 1) batches (align_to_uniform), whose window is the state 'p_model'.
    The targets read the projection head: with --teacher=ema the EMA's averaged one."""
    targets_read_heads = True

    def __post_init__(self):
        super().__post_init__()
        if self.prediction_window < 1:
            raise ConfigError(f'--prediction_window={self.prediction_window} is invalid for '
                              f'--algorithm={self.name}: it must be >= 1')

    @property
    def heads(self):
        return {'projection': Projection(self.projection_units)}

    def alignment_state(self, num_classes):
        return {'p_model': State((self.prediction_window, num_classes), 1. / num_classes)}


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


def concat_forward_heads(model, *parts):
    """concat_forward for a model with heads (batch.heads): one training-mode pass over all of
    `parts`; returns, for each output (logits, then each head's), its value on each part."""
    outputs = model(tf.concat(parts, 0), training=True)
    sizes = [tf.shape(p)[0] for p in parts]
    return [tf.split(out, sizes, 0) for out in outputs]


def register(name: str, registry=None):
    """Class decorator: a dataclass named `name` in ALGORITHMS (or `registry`)."""
    def wrap(cls):
        cls = dataclasses.dataclass(cls)
        cls.name = name
        (ALGORITHMS if registry is None else registry)[name] = cls
        return cls
    return wrap


def define_algorithm_flags(registry=None, shared_help=None, module_name=__name__):
    """One flag per hyperparameter name across all registered algorithms (or the classes of
    `registry`, e.g. the pretraining methods; a shared flag's help from `shared_help`, listed
    under `module_name`)."""
    registry = ALGORITHMS if registry is None else registry
    shared_help = SHARED_HELP if shared_help is None else shared_help
    owners: Dict[str, list] = {}
    for name, cls in sorted(registry.items()):
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append((name, f))
    define = {float: flags.DEFINE_float, int: flags.DEFINE_integer, str: flags.DEFINE_string,
              bool: flags.DEFINE_boolean}
    for field, owned in owners.items():
        if len(owned) > 1 and field not in flags.FLAGS:
            help_text = shared_help.get(field, owned[0][1].metadata['help'])
            # (None: a plugged method's default that follows its base, remixmatch.BASE_DEFAULTS)
            defaults = ', '.join(f'{name} ' + ("its base's" if f.default is None else
                                               str(f.default)) for name, f in owned)
            kind = next(type(f.default) for _, f in owned if f.default is not None)
            define[kind](field, None, f'{help_text} Default: {defaults}.', module_name=module_name)
    for cls in registry.values():
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
