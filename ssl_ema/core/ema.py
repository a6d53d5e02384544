"""Running averages of a model's weights: the EMA teacher and final classifier, extra horizons,
Polyak's uniform average and the power-function EMA of post-hoc EMA.

Every average is an ordinary Keras model of the student's architecture (`.model`) whose
variables are the shadow weights, moved after every optimizer step by

    shadow = beta_t * shadow + (1 - beta_t) * weight        (t = updates so far)

and they differ only in beta_t:
- `EMA`: beta_t = decay, or min(decay, (1 + t) / (10 + t)) with the warm-up of
  `tf.train.ExponentialMovingAverage(num_updates=t)` (our default, --ema_warmup; the anchors
  pass no num_updates, so their decay is constant: --noema_warmup in runs/protocols).
- `Polyak`: the uniform average of the weights after steps start+1 ... t+1 (beta_t = n / (n + 1),
  n = t - start updates averaged so far); before `start` it follows the student.
- `PowerEMA`: Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion
  Models", Sec. 3, Eq. 3 / Algorithm 2): beta_t = (1 - 1/(t + 1))^(gamma + 1). The weights after
  step tau then carry exactly the mass of the profile (gamma + 1) s^gamma / T^(gamma + 1) on
  (tau - 1, tau], whose relative width is sigma_rel (`sigma_rel_to_gamma`); ssl_ema.posthoc
  rebuilds any other sigma_rel from snapshots of two of them.

Batch-norm moving statistics (`bn`, the flag --ema_bn):
- 'average': averaged exactly like the weights, so the average in inference mode is a
  self-contained classifier whose statistics followed its own weights (our default).
- 'student': the statistics are the student's own, copied at every update, and only trainable
  weights are averaged. This is what the anchors do: google-research/fixmatch's
  `tf.train.ExponentialMovingAverage` is applied to `utils.model_vars()`, the trainable variables
  only, and its EMA getter falls back to the student's variables for the statistics.
- 'recompute': as 'student' during training; at evaluation the statistics are re-estimated for
  the averaged weights by `recompute_statistics` (one pass over a fixed set of training batches in
  training mode, the mean of the batches' statistics, as PyTorch's `swa_utils.update_bn`).

As a teacher, `ema(x, training=True)` runs the averaged weights the way Mean Teacher's teacher
runs (Tarvainen & Valpola 2017, Sec. 2): batch norm on the batch's statistics and dropout active,
so the teacher is as noisy as the student; the shadow statistics are left untouched, so only
`update()` ever changes an average. `ema(x)` is the inference-mode classifier.
"""
import contextlib

import keras
import numpy as np
import tensorflow as tf

from ssl_ema.base.hparams import parse_floats
from ssl_ema.core.cluster import update_every_copy
from ssl_ema.nn import backbones

BN_MODES = ('average', 'student', 'recompute')


class Average:
    """A model whose variables follow a running average of `model`'s (subclasses set beta_t)."""

    def __init__(self, model: keras.Model, bn: str = 'average', name: str = 'ema'):
        if bn not in BN_MODES:
            raise ValueError(f'--ema_bn={bn} is unknown; valid: {", ".join(BN_MODES)}')
        self.bn, self.name = bn, name
        self.model = keras.models.clone_model(model)
        self.model.set_weights(model.get_weights())
        self._student_weights = list(model.weights)
        self.heads, self.head_variables, self._head_pairs = None, [], []   # carry_heads
        self.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name=f'{name}_updates')
        pairs = list(zip(self.model.weights, model.weights))
        self._averaged = [(s, w) for s, w in pairs if bn == 'average' or w.trainable]
        self._copied = [(s, w) for s, w in pairs if not (bn == 'average' or w.trainable)]

    def carry_heads(self, student_heads, heads) -> None:
        """Average the algorithm's extra heads too: `self.heads` becomes the averaged model with
        `heads` (nn/heads.with_heads on self.model), its head weights starting at, and moved
        towards, those of `student_heads` (the student's with_heads model, built the same way,
        so the head layers pair up in order) by the same beta_t as the rest. The trainer asks
        it when algorithms/base.averages_carry_heads: for an open-set algorithm, whose
        evaluation, pool pass and export read a head, and with --teacher=ema for an algorithm
        whose targets read a head (SimMatch's and CoMatch's embeddings)."""
        from ssl_ema.nn.heads import with_heads
        self.heads = with_heads(self.model, heads)
        own = {id(v) for v in self.model.weights}
        student_base = {id(v) for v in self._student_weights}
        shadow = [v for v in self.heads.weights if id(v) not in own]
        weight = [v for v in student_heads.weights if id(v) not in student_base]
        if [tuple(v.shape) for v in shadow] != [tuple(v.shape) for v in weight]:
            raise ValueError('the averaged heads do not pair up with the student\'s')
        self.head_variables = shadow
        self._head_pairs = list(zip(shadow, weight))
        self.restart_heads()
        pairs = self._head_pairs
        self._averaged += [(s, w) for s, w in pairs if self.bn == 'average' or w.trainable]
        self._copied += [(s, w) for s, w in pairs if not (self.bn == 'average' or w.trainable)]

    def restart_heads(self) -> None:
        """The averaged heads set to the student's current head weights (their start in
        carry_heads; a run resumed from a checkpoint without them restarts them so)."""
        for shadow, weight in self._head_pairs:
            shadow.assign(weight)

    def __call__(self, x, training=False):
        if not training:
            return self.model(x, training=False)
        return backbones.call_keeping_statistics(self.model, x)

    def current_decay(self):
        """beta_t of the next update, a float32 scalar tensor."""
        raise NotImplementedError

    def update(self, strategy=None):
        """One step towards the student's current weights (call after each optimizer step, in
        cross-replica context): under a tf.distribute `strategy` every replica moves its own copy
        of each shadow weight from its own copy of the student's (cluster.update_every_copy)."""
        strategy = strategy or tf.distribute.get_strategy()
        keep = self.current_decay()
        for shadow, weight in self._averaged:
            update_every_copy(strategy, shadow, _move, weight, keep)
        for shadow, weight in self._copied:
            update_every_copy(strategy, shadow, _copy, weight)
        self.updates.assign_add(1)

    @contextlib.contextmanager
    def statistics_for_evaluation(self, batches):
        """With bn='recompute': re-estimated statistics inside the block, the student's after it
        (the teacher between evaluations runs as in 'student'). Otherwise nothing changes."""
        if self.bn != 'recompute':
            yield
            return
        saved = [tf.identity(v) for v in self.model.non_trainable_weights]
        recompute_statistics(self.model, batches)
        try:
            yield
        finally:
            for v, value in zip(self.model.non_trainable_weights, saved):
                v.assign(value)


def _move(shadow, weight, keep):
    shadow.assign_sub((1. - keep) * (shadow - weight))   # = keep*shadow + (1-keep)*weight


def _copy(shadow, weight):
    shadow.assign(weight)


class EMA(Average):
    def __init__(self, model, decay: float = 0.999, warmup: bool = False, bn: str = 'average',
                 name: str = 'ema'):
        if not 0. <= decay < 1.:
            raise ValueError(f'--ema_decay={decay} must be in [0, 1)')
        self.decay, self.warmup = decay, warmup
        super().__init__(model, bn, name)

    def current_decay(self):
        if not self.warmup:
            return tf.constant(self.decay, tf.float32)
        t = tf.cast(self.updates, tf.float32)
        return tf.minimum(self.decay, (1. + t) / (10. + t))


class Polyak(Average):
    """Uniform average of the weights after steps start_step+1, start_step+2, ... (Polyak &
    Juditsky 1992); equal to the student until then."""

    def __init__(self, model, start_step: int, bn: str = 'average', name: str = 'polyak'):
        self.start_step = start_step
        super().__init__(model, bn, name)

    def current_decay(self):
        n = tf.cast(tf.maximum(self.updates - self.start_step, 0), tf.float32)
        return n / (n + 1.)


class PowerEMA(Average):
    """Karras et al. 2024's power-function EMA of relative width sigma_rel (Eq. 3, Algorithm 2)."""

    def __init__(self, model, sigma_rel: float, bn: str = 'average', name: str = 'power'):
        self.sigma_rel, self.gamma = sigma_rel, sigma_rel_to_gamma(sigma_rel)
        super().__init__(model, bn, name)

    def current_decay(self):
        t = tf.cast(self.updates + 1, tf.float32)   # 1-based index of the step being averaged in
        return (1. - 1. / t) ** (self.gamma + 1.)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function profile whose relative standard deviation is
    sigma_rel: sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) (Karras et al. 2024,
    Eq. 3), i.e. the largest real root of g^3 + 7 g^2 + (16 - s) g + (12 - s), s = sigma_rel^-2."""
    if not 0. < sigma_rel < 12 ** -0.5:   # gamma > -1 needs sigma_rel < sqrt(1/12) (uniform)
        raise ValueError(f'sigma_rel={sigma_rel} must be in (0, {12 ** -0.5:.4f})')
    s = sigma_rel ** -2
    roots = np.roots([1., 7., 16. - s, 12. - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def scaled_decay(decay: float, batch: int, reference_batch: int) -> float:
    """The EMA scaling rule (Busbridge et al. 2023, "How to Scale Your EMA", Def. 1.2): a batch
    kappa = batch / reference_batch times larger takes kappa steps in one, so the decay that
    keeps the same horizon in images is decay^kappa."""
    return decay ** (batch / reference_batch)


def recompute_statistics(model: keras.Model, batches) -> None:
    """Re-estimate the moving mean and variance of every batch-norm layer of `model` for its
    current weights: one pass over `batches` in training mode, each layer's statistics set to the
    mean over batches of the batch statistics (PyTorch's swa_utils.update_bn with momentum=None;
    variances are Keras' biased batch variances). Weights other than the statistics are unchanged."""
    layers = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    momenta = [l.momentum for l in layers]
    try:
        for k, x in enumerate(batches):
            for layer in layers:   # moving = k/(k+1) moving + 1/(k+1) batch: a running mean
                layer.momentum = k / (k + 1.)
            model(x, training=True)   # eager: momentum is read at every call
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


class CosineEMA(EMA):
    """The teacher of BYOL (Grill et al. 2020, Sec. 3.2) and DINO (Caron et al. 2021, main_dino.py
    cosine_scheduler): beta_k = 1 - (1 - decay)(cos(pi k / K) + 1) / 2, rising from `decay` at
    the first update to 1 at update K = `total_steps`."""

    def __init__(self, model, decay: float, total_steps: int, bn: str = 'average',
                 name: str = 'ema'):
        self.total_steps = total_steps
        super().__init__(model, decay, warmup=False, bn=bn, name=name)

    def current_decay(self):
        progress = tf.minimum(tf.cast(self.updates, tf.float32) / self.total_steps, 1.)
        return 1. - (1. - self.decay) * (tf.cos(np.pi * progress) + 1.) / 2.


# ---- the averages a run tracks, from its config -----------------------------------------------
def _scaled(decay: float, cfg) -> float:
    """The EMA scaling rule, if on (--ema_reference_batch)."""
    if not cfg.ema_reference_batch:
        return decay
    return scaled_decay(decay, cfg.batch, cfg.ema_reference_batch)


def averages_of(student, cfg) -> dict:
    """name -> average of every average a TrainConfig asks for: 'ema' (the teacher, --ema_decay),
    'ema_<decay>' (--ema_decays), 'polyak' (--polyak_start_fraction)."""
    averages = {'ema': EMA(student, _scaled(cfg.ema_decay, cfg), cfg.ema_warmup, cfg.ema_bn)}
    for decay in cfg.extra_ema_decays:
        name = f'ema_{decay:g}'
        averages[name] = EMA(student, _scaled(decay, cfg), cfg.ema_warmup, cfg.ema_bn, name)
    if cfg.polyak_start_fraction >= 0:
        start = round(cfg.polyak_start_fraction * cfg.total_steps)
        averages['polyak'] = Polyak(student, start, cfg.ema_bn)
    return averages


def posthoc_profiles(student, cfg) -> list:
    """The power-function EMAs of --posthoc_sigma_rels, if post-hoc EMA is on."""
    if not cfg.posthoc_snapshot_every_kimg:
        return []
    return [PowerEMA(student, s, cfg.ema_bn, f'power_{s:g}')
            for s in parse_floats(cfg.posthoc_sigma_rels)]


def describe_averages(averages: dict, profiles: list, cfg, snapshot_dir: str) -> str:
    """The line a run logs at its start about what it averages."""
    parts = [f'{n} (decay {a.decay:.6g})' if isinstance(a, EMA) else
             f'{n} (from step {a.start_step})' for n, a in averages.items()]
    text = 'averages: ' + ', '.join(parts) + f'; batch-norm statistics: {cfg.ema_bn}'
    if cfg.ema_reference_batch:
        text += (f'; EMA scaling rule: decays d -> d^{cfg.batch / cfg.ema_reference_batch:g}'
                 f' (--batch={cfg.batch}, --ema_reference_batch={cfg.ema_reference_batch})')
    if profiles:
        text += ('; post-hoc EMA profiles sigma_rel ' + ', '.join(
            f'{p.sigma_rel:g}' for p in profiles) + f' snapshotted into {snapshot_dir}')
    return text


def statistics_batches(data, cfg, unlabeled: bool) -> list:
    """The fixed training batches over which --ema_bn=recompute re-estimates batch-norm
    statistics: the first --ema_bn_batches of the unlabeled stream (weak view), or of the labeled
    one for an algorithm that never reads the unlabeled pool."""
    if unlabeled:
        ds = data.unlabeled(cfg.batch * cfg.uratio, ('weak',)).map(lambda *views: views[0])
    else:
        ds = data.labeled(cfg.batch).map(lambda x, y: x)
    return list(ds.take(cfg.ema_bn_batches))
