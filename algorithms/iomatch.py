"""IOMatch (Li et al., ICCV 2023, arXiv 2308.13168; the authors' nukezil/IOMatch, on USB:
semilearn/algorithms/iomatch/iomatch.py): every unlabeled image is used, as an inlier for the
closed-set classifier where it looks like one and as an (K+1)-way open-set target always.

Heads (nn/heads.OpenSetProjection): a projection of the pooled features, and on it K one-vs-all
(OVA) classifiers and a (K+1)-way open-set classifier whose last class is "unknown". On labeled
images: cross-entropy and the hard-negative OVA loss (OpenMatch's Eq. 1, nn/open_set.ova_loss).
On the weak view of each unlabeled image, gradient stopped: the closed-set probabilities p and
each class's OVA pair (outlier o_k, inlier 1 - o_k). The open-set target over K+1 classes
(open_set_targets): q_k = p_k (1 - o_k) for the K known classes and q_{K+1} = sum_k p_k o_k.
Closed-set loss: soft cross-entropy of the strong view to p where max p reaches
`confidence_threshold` and the image's outlier score sum_k p_k o_k is below 0.5; open-set loss:
soft cross-entropy of the strong view's (K+1)-way prediction to q where max q reaches
`open_set_threshold`, off during the first `open_set_start_fraction` of training (theirs: the
first epoch). Both are batch means, as USB's consistency_loss. The unknown score evaluated and
exported is q_{K+1} / (q_{K+1} + max_k q_k) of the open-set classifier's probabilities, above 0.5
exactly where "unknown" is its arg-max (the authors' evaluate_io; nn/heads.unknown_score).

Defaults (the authors' config/openset_cv/iomatch/iomatch_cifar10_*.yaml and the algorithm's
arguments): thresholds 0.95 (p_cutoff) and 0.5 (q_cutoff), lambda_u, the OVA and open-set weights
1 (ulb_loss_ratio, mb_loss_ratio, op_loss_ratio), projection width 128 (proj_size), no
distribution alignment (dist_align False), no rotation head (use_rot False); uratio 7 in
runs/algorithms/iomatch.flags. The open-set loss is off during epoch 0 of 256: 1/256 of training.
--teacher=ema takes p and the OVA pairs o_k from the EMA model with its averaged heads
(base.target_outputs), so q is one model's; the paper's targets are the student's own.
"""
import tensorflow as tf

from ssl_ema.nn import losses, open_set
from ssl_ema.nn.heads import UNKNOWN_THRESHOLD, ova_probabilities, split_open_set
from ssl_ema.algorithms.base import (Algorithm, ConfigError, Losses, OpenSetProjection,
                                     concat_forward_heads, hparam, register, target_outputs,
                                     teacher_field)


@register('iomatch')
class IOMatch(Algorithm):
    views = ('weak', 'strong')
    ramp_up = 'none'
    heads = {'open_set': OpenSetProjection(128)}
    unknown_head = 'open_set'
    targets_read_heads = True   # the OVA pairs of the weak view
    teacher: str = teacher_field()   # the paper's targets are the student's own
    consistency_weight: float = hparam(1., 'Weight lambda_u of the closed-set loss on unlabeled '
                                       'images (IOMatch ulb_loss_ratio 1.0).')
    confidence_threshold: float = hparam(0.95, 'Largest closed-set probability an unlabeled '
                                         'image needs to be a closed-set target (IOMatch '
                                         'p_cutoff 0.95).')
    open_set_threshold: float = hparam(0.5, 'Largest (K+1)-way target probability an unlabeled '
                                       'image needs to be an open-set target (IOMatch q_cutoff '
                                       '0.5).')
    ova_weight: float = hparam(1., 'Weight of the one-vs-all loss on labeled images (IOMatch '
                               'mb_loss_ratio 1.0).')
    open_set_weight: float = hparam(1., 'Weight of the (K+1)-way open-set loss (IOMatch '
                                    'op_loss_ratio 1.0).')
    open_set_start_fraction: float = hparam(1 / 256, 'Fraction of training without the '
                                            'open-set loss (IOMatch: its first epoch of 256).')

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.open_set_threshold <= 1 or self.ova_weight < 0 \
                or self.open_set_weight < 0 or not 0 <= self.open_set_start_fraction <= 1:
            raise ConfigError('--open_set_threshold and --open_set_start_fraction must be in '
                              '[0, 1], --ova_weight and --open_set_weight >= 0')

    def __call__(self, student, teacher, batch):
        weak, strong = batch.unlabeled
        logits, heads = concat_forward_heads(batch.heads, batch.labeled_x, weak, strong)
        logits = [tf.cast(x, tf.float32) for x in logits]
        k = logits[0].shape[-1]
        (ova_labeled, _), _, (_, open_strong) = (split_open_set(h, k) for h in heads)
        labeled = (losses.cross_entropy(batch.labels, logits[0])
                   + self.ova_weight * open_set.ova_loss(ova_labeled, batch.labels))
        # p and the OVA pairs from --teacher (IOMatch: the student), gradient stopped
        (weak_logits,), (weak_heads,) = target_outputs(self, teacher, (weak,),
                                                       ((logits[1],), (heads[1],)))
        p = tf.nn.softmax(tf.cast(weak_logits, tf.float32))
        ova_weak, _ = split_open_set(tf.cast(weak_heads, tf.float32), k)
        outlier = ova_probabilities(ova_weak)[:, 0, :]
        q = open_set_targets(p, outlier)
        inlier = tf.cast(tf.reduce_sum(p * outlier, -1) < UNKNOWN_THRESHOLD, tf.float32)
        closed_mask = inlier * losses.confidence_mask(p, self.confidence_threshold)
        open_mask = losses.confidence_mask(q, self.open_set_threshold)
        closed = losses.soft_cross_entropy(p, logits[2], closed_mask)
        started = tf.cast(tf.cast(batch.progress, tf.float32) >= self.open_set_start_fraction,
                          tf.float32)
        opened = started * losses.soft_cross_entropy(q, tf.cast(open_strong, tf.float32),
                                                      open_mask)
        return Losses(labeled, self.consistency_weight * closed + self.open_set_weight * opened,
                      {'closed_set': closed, 'open_set': opened, 'mask': tf.reduce_mean(closed_mask),
                       'inliers': tf.reduce_mean(inlier), 'open_mask': tf.reduce_mean(open_mask)})


def open_set_targets(p, outlier):
    """IOMatch's (K+1)-way open-set targets [N, K+1] from the closed-set probabilities `p`
    [N, K] and each class's OVA outlier probability `outlier` [N, K]: p_k (1 - o_k) for class
    k <= K, and sum_k p_k o_k for class K+1 (unknown); each row sums to 1."""
    return tf.concat([p * (1. - outlier), tf.reduce_sum(p * outlier, -1, keepdims=True)], -1)
