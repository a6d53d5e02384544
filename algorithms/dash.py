"""Dash (Xu et al., ICML 2021, arXiv:2109.00650): FixMatch with a dynamic loss threshold.

Two stages (Algorithm 1). A warm-up on the labeled images only (the first `supervised_fraction`
of training: USB's num_wu_iter 2048 of its 2^20 iterations, 1/512), which fixes rho_hat; then
FixMatch's training (weak view -> target -> strong view, lambda_u = 1, the loss averaged over
every unlabeled image), in which an unlabeled image counts when its loss on the weak view is at
most rho = max(C gamma^-k rho_hat, rho_min), k the number of `threshold_every_fraction`s of
training since the warm-up (losses.dash_threshold). C = 1.0001, gamma = 1.27, rho_min = 0.05 and
one decay per 10 epochs of 1024 iterations (10/1024 of training) are USB's (algorithms/dash and
config/classic_cv/dash, e.g. dash_cifar10_40_0.yaml). An image's loss is the cross-entropy of its
weak-view prediction against its target: softmax(z / T), T = 0.5, while rho > rho_min, the
one-hot argmax once rho reaches rho_min; the same target trains the strong view (USB's
DashThresholdingHook).

rho_hat is the labeled training loss at the end of the warm-up: a moving average (momentum
`state_momentum` = 0.9, about the last ten batches: our choice) of the labeled batches'
cross-entropy, starting at ln C (an untrained model's), frozen once the warm-up ends; it is the
algorithm's state, checkpointed with the run. Deliberate difference: USB takes rho_hat from its
evaluation loss, which is the test set's: training must not see the test set, and a model
trained on a few labels has a test loss far above its labeled one, so USB's threshold starts
high. With --teacher=ema the targets (and the images' losses) come from the EMA model.
"""
import math

import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (Losses, State, WeakStrong, hparam, register, replica_mean,
                                     teacher_field)


@register('dash')
class Dash(WeakStrong):
    consistency_weight: float = hparam(1., 'Weight lambda_u of the unlabeled loss (not ramped).')
    temperature: float = hparam(0.5, 'T of the soft targets softmax(z / T) used while the '
                                'threshold is above --min_threshold.')
    threshold_scale: float = hparam(1.0001, 'C: the first threshold is C times rho_hat (USB).')
    threshold_decay: float = hparam(1.27, 'gamma: each update divides the threshold by it (USB).')
    min_threshold: float = hparam(0.05, 'rho_min: the threshold\'s floor; reaching it makes the '
                                  'targets hard (USB).')
    supervised_fraction: float = hparam(1 / 512, 'Fraction of training on the labeled images '
                                        'only, which fixes rho_hat (USB\'s 2048 of 2^20 steps).')
    threshold_every_fraction: float = hparam(
        10 / 1024, 'Fraction of training between two updates of the threshold (USB\'s 10 epochs '
        'of 1024 steps of 2^20).')
    state_momentum: float = hparam(0.9, 'Momentum of the running labeled loss that becomes '
                                   'rho_hat at the end of the warm-up.')
    teacher: str = teacher_field()

    def state(self, num_classes, pool_size):
        return {'labeled_loss': State((), math.log(num_classes))}

    def __call__(self, student, teacher, batch):
        xe, probs, strong_logits = self.weak_strong(student, teacher, batch)
        warming = batch.progress < self.supervised_fraction
        rho_hat = tf.where(warming, losses.moving_average(
            batch.state['labeled_loss'], replica_mean(tf.stop_gradient(xe)), self.state_momentum),
            batch.state['labeled_loss'])
        stage = tf.floor((batch.progress - self.supervised_fraction)
                         / self.threshold_every_fraction)
        rho = losses.dash_threshold(rho_hat, stage, self.threshold_scale, self.threshold_decay,
                                    self.min_threshold)
        hard = tf.one_hot(tf.argmax(probs, -1), tf.shape(probs)[-1])
        target = tf.where(rho <= self.min_threshold, hard,
                          losses.sharpen(probs, self.temperature))
        weak_loss = -tf.reduce_sum(target * tf.math.log(tf.maximum(probs, 1e-12)), -1)
        mask = tf.cast(weak_loss <= rho, tf.float32) * (1. - tf.cast(warming, tf.float32))
        pseudo = losses.soft_cross_entropy(target, strong_logits, mask)
        return Losses(xe, self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask), 'threshold': rho},
                      {'labeled_loss': rho_hat})
