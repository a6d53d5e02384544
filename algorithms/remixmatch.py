"""ReMixMatch (Berthelot et al., ICLR 2020, arXiv:1911.09785), without CTAugment.

MixMatch with (Sec. 3): distribution alignment (Sec. 3.2): the weak-view prediction is multiplied
by p(y) / p~(y), renormalised, then sharpened with T = 0.5, where p~ is the mean of the unlabeled
weak-view predictions over the last 128 batches (the paper's; the anchors' PMovingAverage,
dbuf=128) and p(y) the running average of the labeled one-hot labels (momentum 0.999; the
anchors' PData when the unlabeled distribution is not given), both starting uniform;
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
import tensorflow as tf

from ssl_ema.nn import draws, losses
from ssl_ema.algorithms.base import (Algorithm, Losses, State, concat_forward, hparam, register,
                                     replica_mean, target_logits, teacher_field)
from ssl_ema.nn.backbones import call_keeping_statistics


@register('remixmatch')
class ReMixMatch(Algorithm):
    heads = {'rotation': 4}
    consistency_weight: float = hparam(1.5, 'Weight of the mixed unlabeled cross-entropy (w_match, '
                                       'ramped up).')
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
    ramp_up: str = hparam('linear', 'Ramp-up shape of w_match and w_kl (linear: the anchors\').')
    teacher: str = teacher_field()

    @property
    def views(self):
        return ('weak',) + ('strong',) * self.strong_views

    def state(self, num_classes, pool_size):
        window = (self.prediction_window,) if self.prediction_window else ()
        return {'p_data': State((num_classes,), 1. / num_classes),
                'p_model': State(window + (num_classes,), 1. / num_classes)}

    def __call__(self, student, teacher, batch):
        weak, strong = batch.unlabeled[0], batch.unlabeled[1:]
        num_classes = batch.state['p_model'].shape[-1]
        logits = (call_keeping_statistics(student, weak) if self.teacher == 'student' else None)
        probs = tf.nn.softmax(target_logits(self, teacher, weak, logits))
        m, old = self.state_momentum, batch.state
        labels = tf.one_hot(batch.labels, num_classes)
        mean_probs = replica_mean(tf.reduce_mean(probs, 0))
        if self.prediction_window:   # the window of batch means, oldest first
            p_model = tf.reduce_mean(old['p_model'], 0)
            new_p_model = tf.concat([old['p_model'][1:], mean_probs[None]], 0)
        else:
            p_model = old['p_model']
            new_p_model = losses.moving_average(p_model, mean_probs, m)
        state = {'p_data': losses.moving_average(
                     old['p_data'], replica_mean(tf.reduce_mean(labels, 0)), m),
                 'p_model': new_p_model}
        # The guess uses the distributions before this batch, as the anchors' update runs after.
        guess = losses.sharpen(losses.align_distribution(probs, old['p_data'], p_model),
                               self.temperature)
        images = tf.concat((batch.labeled_x, weak) + strong, 0)
        targets = tf.concat([labels] + [guess] * (1 + len(strong)), 0)
        images, targets = losses.mixup(batch.rng, self.mixup_alpha, images, targets)
        n = tf.shape(batch.labeled_x)[0]
        labeled_logits, unlabeled_logits = concat_forward(student, images[:n], images[n:])
        xe = losses.soft_cross_entropy(targets[:n], labeled_logits)
        mixed = losses.soft_cross_entropy(targets[n:], unlabeled_logits)
        pre_mixup = losses.soft_cross_entropy(guess, call_keeping_statistics(student, strong[0]))
        turns = draws.integers(batch.rng, [tf.shape(weak)[0]], 4)
        _, rotation_logits = call_keeping_statistics(batch.heads, losses.rotate(strong[0], turns))
        rotation = losses.cross_entropy(turns, rotation_logits)
        ramped = self.consistency_weight * mixed + self.pre_mixup_weight * pre_mixup
        unlabeled = batch.ramp * ramped + self.rotation_weight * rotation
        return Losses(xe, unlabeled, {'mixed': mixed, 'pre_mixup': pre_mixup,
                                      'rotation': rotation}, state)
