"""ReMixMatch (Berthelot et al., ICLR 2020, arXiv:1911.09785), without CTAugment.

MixMatch with (Sec. 3): distribution alignment (Sec. 3.2): the weak-view prediction is multiplied
by p(y) / p~(y), renormalised, then sharpened with T = 0.5, where p~ is the mean of the unlabeled
weak-view predictions over the last 128 batches (the paper's; the anchors' PMovingAverage,
dbuf=128), starting uniform, and p(y) the running average of the labeled one-hot labels
(momentum 0.999; the anchors' PData when the unlabeled distribution is not given), starting at
the labeled images' class distribution (USB's remixmatch.py, p_target_type 'gt'; the anchors
start it uniform, which is the same on a class-balanced labeled set and on a long-tailed one
under-aligns for the first ~1/(1 - 0.999) steps);
augmentation anchoring (Sec. 3.1): that one guess is the target of K strongly augmented views
(RandAugment here; the paper uses CTAugment, as the anchors' cta/cta_remixmatch.py, whose
remixmatch_no_cta.py defaults to weak views only, 'd.d.d'); mixup of labeled, weak and
strong images with lambda' = max(lambda, 1 - lambda) (alpha = 0.75); the pre-mixup term
(Sec. 3.3): cross-entropy of the first strong view against the guess (w = 0.5); the rotation loss
(Sec. 3.3): a 4-way head on the penultimate features predicts by how many quarter turns the first
strong view was rotated (w = 0.5). Loss = xe + ramp * (1.5 * mixed-unlabeled cross-entropy +
0.5 * pre-mixup) + 0.5 * rotation (the anchors' weights; ReMixMatch's ramp is 1/64 of training:
runs/algorithms/remixmatch.flags). The guess comes from the student in training mode without
moving batch-norm statistics (the anchors' choice), or from the EMA model with --teacher=ema.

Deliberate differences: K = `strong_views` = 2 by default (USB's, whose CIFAR-10 numbers we
compare with; the paper's 8 is in runs/algorithms/remixmatch.flags); each image is rotated by its
own random quarter turn (USB), not one quarter of the batch per angle (anchors). The rotated,
pre-mixup and guessing passes leave batch-norm statistics to the mixed batch's pass (one joint
pass; the anchors' interleaved passes let only the last of them move the statistics).
"""
import dataclasses

import tensorflow as tf

from ssl_ema.nn import draws, losses
from ssl_ema.algorithms.base import (Algorithm, Losses, State, WeakStrong, check_base, hparam,
                                     register, replica_mean, target_logits, teacher_field)
from ssl_ema.nn.backbones import call_keeping_statistics


@dataclasses.dataclass
class ReMixMatchParts:
    """ReMixMatch's hyperparameters but its lambda_u (consistency_weight) and --teacher, and its
    loss in two parts: the guess (`guess`, with the alignment state) and the losses anchored to
    a guess (`anchored`). ReMixMatch is both on the student; ABC and DARP plug them on their own
    classifier or guess (--base_algorithm=remixmatch)."""
    pre_mixup_weight: float = hparam(0.5, 'Weight of the un-mixed strong view\'s cross-entropy '
                                     'to the guess (w_kl, ramped up).')
    rotation_weight: float = hparam(0.5, 'Weight of the rotation loss (w_rot, not ramped).')
    strong_views: int = hparam(2, 'K: strongly augmented views anchored to each guess.')
    temperature: float = hparam(0.5, 'Temperature T sharpening the aligned guess.')
    mixup_alpha: float = hparam(0.75, 'alpha of the Beta(alpha, alpha) mixup coefficients.')
    state_momentum: float = hparam(0.999, 'Momentum of the running label distribution p(y) of '
                                   'distribution alignment (the anchors\' PData), and of p~(y) '
                                   'when --prediction_window=0.')
    prediction_window: int = hparam(128, 'p~(y) is the mean prediction of the last this many '
                                    'batches (the paper\'s and the anchors\' 128); 0: a moving '
                                    'average with --state_momentum instead.')

    @property
    def remixmatch_views(self):
        return ('weak',) + ('strong',) * self.strong_views

    def remixmatch_state(self, num_classes):
        window = (self.prediction_window,) if self.prediction_window else ()
        return {'p_data': State((num_classes,), 1. / num_classes, from_prior=True),
                'p_model': State(window + (num_classes,), 1. / num_classes)}

    def aligned_guess(self, probs, state):
        """`probs` aligned by the distributions of `state` and sharpened: the guess."""
        p_model = state['p_model']
        if self.prediction_window:   # the window of batch means, oldest first
            p_model = tf.reduce_mean(p_model, 0)
        return losses.sharpen(losses.align_distribution(probs, state['p_data'], p_model),
                              self.temperature)

    def guess(self, teacher, batch, weak_logits):
        """(the guess on the weak view, the new alignment state): `weak_logits` the classifier's
        own on it in training mode keeping the statistics, None with --teacher=ema."""
        weak = batch.unlabeled[0]
        num_classes = batch.state['p_model'].shape[-1]
        probs = tf.nn.softmax(target_logits(self, teacher, weak, weak_logits))
        m, old = self.state_momentum, batch.state
        labels = tf.one_hot(batch.labels, num_classes)
        mean_probs = replica_mean(tf.reduce_mean(probs, 0))
        if self.prediction_window:
            new_p_model = tf.concat([old['p_model'][1:], mean_probs[None]], 0)
        else:
            new_p_model = losses.moving_average(old['p_model'], mean_probs, m)
        state = {'p_data': losses.moving_average(
                     old['p_data'], replica_mean(tf.reduce_mean(labels, 0)), m),
                 'p_model': new_p_model}
        # The guess uses the distributions before this batch, as the anchors' update runs after.
        return self.aligned_guess(probs, old), state

    def student_guess(self, student, teacher, batch):
        """`guess` from the student's weak-view logits (with --teacher=student)."""
        logits = (call_keeping_statistics(student, batch.unlabeled[0])
                  if self.teacher == 'student' else None)
        return self.guess(teacher, batch, logits)

    def anchored(self, model, batch, guess, output=None, strong_logits=None):
        """(labeled cross-entropy, unlabeled loss, metrics) of the classifier `model` (its output
        number `output` for a model with several) trained to `guess`: mixup, pre-mixup, and the
        rotation head (the last of batch.heads). `strong_logits`: the classifier's on the first
        strong view, keeping the statistics, when the caller has them."""
        weak, strong = batch.unlabeled[0], batch.unlabeled[1:]
        def pick(out):   # in float32, as a head's output under --precision=mixed_*
            return tf.cast(out if output is None else out[output], tf.float32)
        labels = tf.one_hot(batch.labels, tf.shape(guess)[-1])
        images = tf.concat((batch.labeled_x, weak) + strong, 0)
        targets = tf.concat([labels] + [guess] * (1 + len(strong)), 0)
        images, targets = losses.mixup(batch.rng, self.mixup_alpha, images, targets)
        n = tf.shape(batch.labeled_x)[0]
        logits = pick(model(images, training=True))   # one pass: batch norm sees them all
        xe = losses.soft_cross_entropy(targets[:n], logits[:n])
        mixed = losses.soft_cross_entropy(targets[n:], logits[n:])
        if strong_logits is None:
            strong_logits = pick(call_keeping_statistics(model, strong[0]))
        pre_mixup = losses.soft_cross_entropy(guess, strong_logits)
        turns = draws.integers(batch.rng, [tf.shape(weak)[0]], 4)
        rotation_logits = call_keeping_statistics(batch.heads, losses.rotate(strong[0], turns))
        rotation = losses.cross_entropy(turns, rotation_logits[-1])
        ramped = self.consistency_weight * mixed + self.pre_mixup_weight * pre_mixup
        unlabeled = batch.ramp * ramped + self.rotation_weight * rotation
        return xe, unlabeled, {'mixed': mixed, 'pre_mixup': pre_mixup, 'rotation': rotation}


# The bases a method plugged on one (ABC, DARP) runs on, and the defaults of its fields declared
# None, which follow the base: lambda_u, FixMatch's 1; on ReMixMatch w_match 1.5 (USB's
# classic_cv_imb remixmatch_abc and remixmatch_darp ulb_loss_ratio; the ABC and DARP authors'
# lambda_u for ReMixMatch, ABCremix.py and train.py).
BASE_DEFAULTS = {'fixmatch': {'consistency_weight': 1.}, 'remixmatch': {'consistency_weight': 1.5}}


class Plugged(WeakStrong, ReMixMatchParts):
    """A method plugged on a base algorithm, --base_algorithm (ABC, DARP); `plugged_as` says what
    it does with it. On FixMatch (WeakStrong) it writes the base's loss itself; on ReMixMatch it
    takes ReMixMatch's views, rotation head (after its own `own_heads`), alignment state and
    linear ramp-up, and its loss from ReMixMatchParts."""
    plugged_as = ''
    own_heads = {}
    teacher = 'student'   # the guesses of a method without --teacher: the student's own

    def __post_init__(self):
        check_base(self, BASE_DEFAULTS, self.plugged_as)
        for name, value in self.base_defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__()

    @property
    def base_defaults(self):
        """The defaults of the fields that follow the base (core/run_dir names a run by them)."""
        return BASE_DEFAULTS[self.base_algorithm]

    @property
    def on_remixmatch(self):
        return self.base_algorithm == 'remixmatch'

    @property
    def views(self):
        return self.remixmatch_views if self.on_remixmatch else WeakStrong.views

    @property
    def heads(self):
        return dict(self.own_heads, **(ReMixMatch.heads if self.on_remixmatch else {}))

    @property
    def ramp_up(self):
        return ReMixMatch.ramp_up if self.on_remixmatch else WeakStrong.ramp_up

    def base_state(self, num_classes):
        return self.remixmatch_state(num_classes) if self.on_remixmatch else {}


@register('remixmatch')
class ReMixMatch(ReMixMatchParts, Algorithm):
    heads = {'rotation': 4}
    consistency_weight: float = hparam(1.5, 'Weight of the mixed unlabeled cross-entropy (w_match, '
                                       'ramped up).')
    ramp_up: str = hparam('linear', 'Ramp-up shape of w_match and w_kl (linear: the anchors\').')
    teacher: str = teacher_field()

    @property
    def views(self):
        return self.remixmatch_views

    def state(self, num_classes, pool_size):
        return self.remixmatch_state(num_classes)

    def __call__(self, student, teacher, batch):
        guess, state = self.student_guess(student, teacher, batch)
        return Losses(*self.anchored(student, batch, guess), state)
