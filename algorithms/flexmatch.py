"""FlexMatch (Zhang et al., NeurIPS 2021, arXiv:2110.08263): FixMatch with curriculum
pseudo-labelling.

FixMatch's fixed threshold tau becomes one per class, T_t(c) = M(beta_t(c)) tau, where beta_t(c)
is the class's learning effect: how many unlabeled images are currently predicted as c with
confidence >= tau, over the largest such count (with the threshold warm-up, the never-selected
images count as a candidate for that largest count, so the thresholds start low and rise), and
M(x) = x / (2 - x) is the convex mapping (Sec. 3.2-3.3). The unlabeled loss is FixMatch's
cross-entropy of hard pseudo-labels on the strong view, masked by max p >= T_t(argmax p).

The per-image predictions live in the algorithm state `selected` (one class or -1 per image of
the unlabeled pool, hence `needs_indices`) and the class rates in `beta`, updated after the loss
as USB's FlexMatchThresholdingHook (microsoft/Semi-supervised-learning) does. Defaults: tau =
0.95, lambda_u = 1, hard labels, warm-up on (USB's and the paper's). With --teacher=ema the
pseudo-labels (and the state) come from the EMA model's predictions on the weak view.
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (Losses, State, WeakStrong, hparam, register, replica_concat,
                                     scatter_last, teacher_field)


@register('flexmatch')
class FlexMatch(WeakStrong):
    needs_indices = True
    consistency_weight: float = hparam(1., 'Weight lambda_u of the unlabeled loss (not ramped).')
    confidence_threshold: float = hparam(0.95, 'tau: the threshold of a fully learnt class.')
    threshold_warmup: bool = hparam(True, 'FlexMatch\'s threshold warm-up: unused images count '
                                    'in the normalisation of the learning effect (Sec. 3.3).')
    teacher: str = teacher_field()

    def state(self, num_classes, pool_size):
        return {'selected': State((pool_size,), -1, tf.int32), 'beta': State((num_classes,), 0.)}

    def __call__(self, student, teacher, batch):
        xe, probs, strong_logits = self.weak_strong(student, teacher, batch)
        mask, hard, threshold, state = self.curriculum(probs, batch)
        pseudo = losses.soft_cross_entropy(hard, strong_logits, mask)
        return Losses(xe, self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask),
                       'mean_threshold': tf.reduce_mean(threshold)}, state)

    def curriculum(self, probs, batch):
        """The mask of the weak-view predictions `probs` under this batch's class thresholds,
        their hard pseudo-labels, the thresholds, and the state's update (SequenceMatch uses
        the same curriculum). Returns (mask, hard labels, thresholds, new state)."""
        max_probs, classes = tf.reduce_max(probs, -1), tf.argmax(probs, -1, output_type=tf.int32)
        threshold = losses.flexmatch_threshold(batch.state['beta'], self.confidence_threshold)
        mask = tf.cast(max_probs >= tf.gather(threshold, classes), tf.float32)
        hard = tf.one_hot(classes, tf.shape(probs)[-1])
        # The whole batch's confident predictions (every replica's) enter the per-image record;
        # an image twice in the batch (two epochs) keeps its last confident copy's class.
        confident = replica_concat(tf.cast(max_probs >= self.confidence_threshold, tf.int32)) > 0
        index = replica_concat(tf.cast(batch.unlabeled_index, tf.int32))
        label = replica_concat(classes)
        selected = scatter_last(batch.state['selected'], index, label, confident)
        beta, update = losses.flexmatch_learning_effect(
            selected, probs.shape[-1], self.threshold_warmup)
        beta = tf.where(update, beta, batch.state['beta'])
        return mask, hard, threshold, {'selected': selected, 'beta': beta}
