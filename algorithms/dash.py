"""Dash (Xu, Shang, Ye, Qian, Li, Sun, Li and Jin, "Dash: Semi-Supervised Learning with Dynamic
Thresholding", ICML 2021, arXiv:2109.00650; the authors' TensorFlow code idstcv/Dash, dash.py on
FixMatch's codebase): FixMatch with a dynamic loss threshold.

Two stages, as USB runs them (algorithms/dash/dash.py: warmup(), then train_step; the paper's
equation and algorithm numbers are not cited: its text past the abstract could not be read when
this was checked). A warm-up on the labeled images only (the first `supervised_fraction` of
training: USB's num_wu_iter 2048 of its 2^20 iterations, 1/512), which fixes rho_hat; then
FixMatch's training (weak view -> target -> strong view, lambda_u = 1, the loss averaged over
every unlabeled image), in which an unlabeled image counts when its loss on the weak view is at
most rho = max(C gamma^-k rho_hat, rho_min), k the number of `threshold_every_fraction`s of
training since the warm-up (losses.dash_threshold; USB's DashThresholdingHook.update:
rho = C * gamma ** -rho_update_cnt * rho_init, every 10 epochs, floored at rho_min). An image's
loss is the cross-entropy of its weak-view prediction against its target: softmax(z / T),
T = 0.5, while rho > rho_min, the one-hot argmax once rho reaches rho_min; the same target trains
the strong view (USB's DashThresholdingHook.masking and PseudoLabelingHook).

Defaults: USB's (algorithms/dash/dash.py get_argument and config/classic_cv/dash, e.g.
dash_cifar10_40_0.yaml): C = 1.0001, gamma = 1.27, rho_min = 0.05, T = 0.5, lambda_u = 1
(ulb_loss_ratio), num_wu_iter 2048 and one decay per 10 epochs of 1024 iterations (10/1024 of
training). The authors' script (start_train.sh, SVHN at 40 labels) shares gamma 1.27, T 0.5 and
rho_min 0.05 (--xeu_select_gamma, --temperature, --min_select_th).

rho_hat is the labeled training loss at the end of the warm-up: a moving average (momentum
`state_momentum` = 0.9, about the last ten batches: our choice) of the labeled batches'
cross-entropy, starting at ln C (an untrained model's), frozen once the warm-up ends; it is the
algorithm's state, checkpointed with the run. Deliberate difference: USB takes rho_hat from its
evaluation loss, which is the test set's: training must not see the test set, and a model
trained on a few labels has a test loss far above its labeled one, so USB's threshold starts
high. With --teacher=ema the targets (and the images' losses) come from the EMA model.

The authors' own code differs from USB's (and so from ours) beyond the constants: its warm-up
(--dt_start_epoch epochs of 1024 steps) trains on every unlabeled image (threshold 500), not on
the labeled ones only; rho_hat is the mean of the last n_u (the unlabeled set's size)
strong-view cross-entropies to the soft targets recorded in the warm-up's last epoch
(xeu_losses_in); there is no C; the threshold is divided by gamma once per --drop_step epochs
(9 in the script); an image's weak loss is always the hard label's, -ln max_c p; and the
selected images' loss is averaged over the selected ones (divide_no_nan by sum(mask)) and
scaled by 0.9. Ours follows USB, whose published results issue 28 compares against.
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
        # Stage 1, the warm-up: only the labeled loss trains; rho_hat follows its running
        # average (USB: rho_init from the evaluation loss after warmup(); here the training one)
        warming = batch.progress < self.supervised_fraction
        rho_hat = tf.where(warming, losses.moving_average(
            batch.state['labeled_loss'], replica_mean(tf.stop_gradient(xe)), self.state_momentum),
            batch.state['labeled_loss'])
        # Stage 2: rho = max(C gamma^-k rho_hat, rho_min), k the threshold updates so far (USB's
        # rho_update_cnt, one per 10 epochs)
        stage = tf.floor((batch.progress - self.supervised_fraction)
                         / self.threshold_every_fraction)
        rho = losses.dash_threshold(rho_hat, stage, self.threshold_scale, self.threshold_decay,
                                    self.min_threshold)
        # Targets: softmax(z / T) while rho > rho_min, the one-hot argmax once rho = rho_min
        # (USB's use_hard_label when self.rho == self.rho_min)
        hard = tf.one_hot(tf.argmax(probs, -1), tf.shape(probs)[-1])
        target = tf.where(rho <= self.min_threshold, hard,
                          losses.sharpen(probs, self.temperature))
        # An image counts when its weak-view loss H(target, p) <= rho (USB: loss_w.le(self.rho))
        weak_loss = -tf.reduce_sum(target * tf.math.log(tf.maximum(probs, 1e-12)), -1)
        mask = tf.cast(weak_loss <= rho, tf.float32) * (1. - tf.cast(warming, tf.float32))
        # l_u: the same target trains the strong view, averaged over every unlabeled image
        pseudo = losses.soft_cross_entropy(target, strong_logits, mask)
        return Losses(xe, self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask), 'threshold': rho},
                      {'labeled_loss': rho_hat})
