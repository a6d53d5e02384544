"""SoftMatch (Chen et al., ICLR 2023, arXiv:2301.10921): soft sample weights instead of a mask.

Each unlabeled image's pseudo-label loss is weighted by a truncated Gaussian of its confidence
(Sec. 3.2): weight 1 at or above mu_t, exp(-(max p - mu_t)^2 / (2 sigma_t^2 / n^2)) below, where
mu_t and sigma_t^2 are running averages (momentum m = 0.999) of the unlabeled batches' mean and
unbiased variance of the confidence, updated with the batch before it is weighted, starting at
1/C and 1 (USB's SoftMatchWeightingHook, microsoft/Semi-supervised-learning; n = 2). Before that,
uniform alignment (Sec. 3.3) rescales the weak-view probabilities by u / p~_t, with p~_t the
running average of the predictions (USB's DistAlignEMAHook with a uniform target). The loss is
cross-entropy of the aligned hard pseudo-labels on the strong view, lambda_u = 1.

Deliberate difference: p~_t starts at 1/C (the anchors' distribution alignment starts uniform);
USB starts it at the first batch's mean. With --teacher=ema the pseudo-labels and the running
averages come from the EMA model's predictions.
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (Losses, State, WeakStrong, hparam, register, replica_mean,
                                     teacher_field)


@register('softmatch')
class SoftMatch(WeakStrong):
    consistency_weight: float = hparam(1., 'Weight lambda_u of the unlabeled loss (not ramped).')
    n_sigma: float = hparam(2., 'n: the Gaussian\'s standard deviation is sigma_t / n.')
    state_momentum: float = hparam(0.999, 'm: momentum of the running mean and variance of the '
                                   'confidence and of the prediction average p~_t.')
    teacher: str = teacher_field()

    def state(self, num_classes, pool_size):
        return {'mean': State((), 1. / num_classes), 'variance': State((), 1.),
                'p_model': State((num_classes,), 1. / num_classes)}

    def __call__(self, student, teacher, batch):
        xe, raw, strong_logits = self.weak_strong(student, teacher, batch)
        num_classes = raw.shape[-1]
        m, old = self.state_momentum, batch.state
        p_model = losses.moving_average(old['p_model'], replica_mean(tf.reduce_mean(raw, 0)), m)
        probs = losses.align_distribution(raw, 1. / num_classes, p_model)
        max_probs = tf.reduce_max(probs, -1)
        # Mean and unbiased variance of the confidence over the whole batch (every replica's).
        n = tf.cast(tf.shape(max_probs)[0], tf.float32) * (
            tf.distribute.get_replica_context().num_replicas_in_sync)
        mean, square = replica_mean(tf.reduce_mean(max_probs)), replica_mean(
            tf.reduce_mean(tf.square(max_probs)))
        variance = tf.maximum(square - mean ** 2, 0.) * n / (n - 1.)
        state = {'p_model': p_model, 'mean': losses.moving_average(old['mean'], mean, m),
                 'variance': losses.moving_average(old['variance'], variance, m)}
        weight = losses.truncated_gaussian_weight(max_probs, state['mean'], state['variance'],
                                                  self.n_sigma)
        hard = tf.one_hot(tf.argmax(probs, -1), num_classes)
        pseudo = losses.soft_cross_entropy(hard, strong_logits, weight)
        return Losses(xe, self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'weight': tf.reduce_mean(weight),
                       'confidence_mean': state['mean']}, state)
