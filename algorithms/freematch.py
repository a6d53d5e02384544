"""FreeMatch (Wang et al., ICLR 2023, arXiv:2205.07246): self-adaptive thresholds and fairness.

Self-adaptive thresholding (Sec. 3.2): a global threshold tau_t, the running average of the
unlabeled batches' mean confidence, scaled per class by MaxNorm(p~_t), the running average of
the class probabilities: an image counts when max p >= MaxNorm(p~_t)(argmax p) tau_t. Both running
averages (momentum lambda = 0.999) are updated with the batch before it is masked, as in USB's
FreeMatchThresholingHook (microsoft/Semi-supervised-learning). The unlabeled loss is FixMatch's
cross-entropy of hard pseudo-labels on the strong view; the self-adaptive fairness term (Sec. 3.3,
weight w_f = `fairness_weight`, 0.001 as USB's CIFAR-10 configs) pulls the confident strong-view
predictions' mean, normalised by their histogram, towards p~_t normalised by the running
histogram h~_t.

Deliberate difference: the running averages start at 1/C as in the paper (tau_0 = p~_0 = h~_0 =
1/C); USB starts them at 1, which holds every image out for the first thousands of steps. With
--teacher=ema the pseudo-labels and the running averages come from the EMA model's predictions.
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (Losses, State, WeakStrong, hparam, register, replica_mean,
                                     teacher_field)


@register('freematch')
class FreeMatch(WeakStrong):
    consistency_weight: float = hparam(1., 'Weight w_u of the unlabeled loss (not ramped).')
    fairness_weight: float = hparam(0.001, 'Weight w_f of the self-adaptive fairness term (USB\'s '
                                    'CIFAR-10 configs, e.g. freematch_cifar10_40_0.yaml).')
    state_momentum: float = hparam(0.999, 'lambda: momentum of the running averages of the '
                                   'confidence, class probabilities and histogram.')
    teacher: str = teacher_field()

    def state(self, num_classes, pool_size):
        uniform = State((num_classes,), 1. / num_classes)
        return {'global_threshold': State((), 1. / num_classes), 'p_model': uniform,
                'label_hist': uniform}

    def __call__(self, student, teacher, batch):
        xe, probs, strong_logits = self.weak_strong(student, teacher, batch)
        num_classes = probs.shape[-1]
        max_probs, classes = tf.reduce_max(probs, -1), tf.argmax(probs, -1, output_type=tf.int32)
        hist = tf.reduce_mean(tf.one_hot(classes, num_classes), 0)
        m, old = self.state_momentum, batch.state
        state = {'global_threshold': losses.moving_average(
                     old['global_threshold'], replica_mean(tf.reduce_mean(max_probs)), m),
                 'p_model': losses.moving_average(old['p_model'],
                                                  replica_mean(tf.reduce_mean(probs, 0)), m),
                 'label_hist': losses.moving_average(old['label_hist'], replica_mean(hist), m)}
        mask = losses.freematch_mask(max_probs, classes, state['global_threshold'],
                                     state['p_model'])
        pseudo = losses.soft_cross_entropy(tf.one_hot(classes, num_classes), strong_logits, mask)
        # Fairness over the confident images of the whole batch (every replica's).
        strong_probs = tf.nn.softmax(strong_logits)
        strong_hist = tf.one_hot(tf.argmax(strong_probs, -1), num_classes) * mask[:, None]
        count = replica_mean(tf.reduce_sum(mask))
        mean_probs = replica_mean(tf.reduce_sum(strong_probs * mask[:, None], 0))
        fairness = tf.where(count > 0, losses.freematch_fairness(
            state['p_model'], state['label_hist'], mean_probs / tf.maximum(count, 1e-12),
            replica_mean(tf.reduce_sum(strong_hist, 0)) / tf.maximum(count, 1e-12)), 0.)
        return Losses(xe, self.consistency_weight * pseudo + self.fairness_weight * fairness,
                      {'pseudo_label': pseudo, 'fairness': fairness, 'mask': tf.reduce_mean(mask),
                       'global_threshold': state['global_threshold']}, state)
