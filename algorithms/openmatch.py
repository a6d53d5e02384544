"""OpenMatch (Saito et al., NeurIPS 2021, arXiv 2105.14148; the authors' VisionLearningGroup/OP_Match
trainer.py): FixMatch on the inliers of an unlabeled pool that holds images of unknown classes,
chosen by one-vs-all (OVA) classifiers beside the classifier (nn/heads.OneVsAll).

Loss = L_x + L_ova + lambda_oem L_oem + lambda_socr L_socr + lambda_u L_fix. On two weak views of
each labeled image: cross-entropy L_x and the hard-negative OVA loss L_ova (Eq. 1,
nn/open_set.ova_loss). On two weak views of each unlabeled image: OVA entropy minimisation
L_oem (their mean) and soft open-set consistency L_socr between the views' OVA probabilities
(Eq. 3). L_fix: FixMatch (hard pseudo-labels of the first weak view above `confidence_threshold`
train the strong view) on the selected inliers only. Every 1/512 of training but at most once an
epoch of the pool (or every `select_every_fraction` given) from `start_fraction` on, a pass of the EMA model (with its averaged OVA head) over the whole pool
(core/pool.py) selects the images whose unknown score, the outlier probability of their
predicted class, is below 0.5 (OP_Match utils/misc.py exclude_dataset, run on their EMA model);
before the first selection L_fix is 0.

Ours against theirs: FixMatch's images are this batch's unlabeled images, masked to the selected
ones and averaged over them (the authors draw a second batch from the selected images only, in
a second forward pass); one joint forward pass over all views. Defaults: lambda_oem 0.1,
lambda_socr 0.5 (CIFAR-10), threshold 0 and lambda_u 1 (OP_Match run_cifar10.sh and
utils/parser.py: --threshold 0.0, L_fix unweighted); uratio 2 (their mu) in
runs/algorithms/openmatch.flags. Their schedule, 512 epochs of 1024 steps, starts FixMatch and
the selections at epoch 10 (start_fix): as a fraction of training, 10/512 whatever our
--train_kimg. They re-select every epoch, 1/512 of training; ours too, but at most once an epoch of
the pool (theirs: 131,072 unlabeled images an epoch, ~2.6 epochs of CIFAR-10's pool), where
1/512 of a 32-kimg run would pass over the whole pool every 2 steps, many times the training's
cost.
"""
import tensorflow as tf

from ssl_ema.nn import losses, open_set
from ssl_ema.nn.heads import UNKNOWN_THRESHOLD
from ssl_ema.algorithms.base import (Algorithm, ConfigError, Losses, OneVsAll, State,
                                     concat_forward_heads, hparam, register, target_logits,
                                     teacher_field)


@register('openmatch')
class OpenMatch(Algorithm):
    views = ('weak', 'weak', 'strong')   # two weak views (OVA terms, pseudo-labels), one strong
    labeled_views = ('weak',)            # the second weak view of each labeled image
    ramp_up = 'none'
    needs_indices = True
    heads = {'ova': OneVsAll()}
    unknown_head = 'ova'
    teacher: str = teacher_field()   # the paper's pseudo-labels are the student's own
    consistency_weight: float = hparam(1., 'Weight lambda_u of FixMatch\'s loss on the selected '
                                       'inliers (OP_Match: 1).')
    confidence_threshold: float = hparam(0., 'FixMatch\'s threshold on the selected inliers '
                                         '(OP_Match utils/parser.py --threshold 0.0).')
    oem_weight: float = hparam(0.1, 'Weight lambda_oem of OVA entropy minimisation on unlabeled '
                               'images (OP_Match --lambda_oem 0.1).')
    socr_weight: float = hparam(0.5, 'Weight lambda_socr of soft open-set consistency (OP_Match '
                                '--lambda_socr: 0.5 for CIFAR-10, 1.0 for CIFAR-100).')
    start_fraction: float = hparam(10 / 512, 'Fraction of training before the first inlier '
                                   'selection, from which FixMatch trains (OP_Match start_fix '
                                   '10 of 512 epochs).')
    select_every_fraction: float = hparam(0., 'Fraction of training between two inlier '
                                          'selections, each a pass of the EMA model over the '
                                          'pool; 0: every 1/512 of training (OP_Match: every '
                                          'epoch of 512) but at most once an epoch of the pool.')

    def __post_init__(self):
        super().__post_init__()
        if self.oem_weight < 0 or self.socr_weight < 0 or not 0 <= self.start_fraction <= 1 \
                or not 0 <= self.select_every_fraction <= 1:
            raise ConfigError('--oem_weight and --socr_weight must be >= 0, --start_fraction in '
                              '[0, 1], --select_every_fraction in [0, 1]')

    @property
    def pool_pass_every_fraction(self):
        return self.select_every_fraction or 1 / 512   # OP_Match: every epoch of 512

    @property
    def pool_pass_every_pool_epochs(self):
        return 0. if self.select_every_fraction else 1.

    @property
    def pool_pass_start(self):
        return self.start_fraction

    def state(self, num_classes, pool_size):
        # inlier: 1 for each pool image of the last selection, all 0 before the first.
        return {'inlier': State((pool_size,), 0.)}

    def from_pool(self, probabilities, state, progress, unknown=None):
        return {'inlier': select_inliers(unknown)}

    def __call__(self, student, teacher, batch):
        weak1, weak2, strong = batch.unlabeled
        logits, ova = concat_forward_heads(batch.heads, batch.labeled_x, batch.labeled_views[0],
                                           weak1, weak2, strong)
        logits = [tf.cast(x, tf.float32) for x in logits]
        labels = tf.concat([batch.labels, batch.labels], 0)
        xe = losses.cross_entropy(labels, tf.concat(logits[:2], 0))
        ova_labeled = open_set.ova_loss(tf.concat(ova[:2], 0), labels)
        oem = (open_set.ova_entropy(ova[2]) + open_set.ova_entropy(ova[3])) / 2.
        socr = open_set.soft_open_set_consistency(ova[2], ova[3])
        inlier = tf.gather(batch.state['inlier'], batch.unlabeled_index)
        # the EMA model selects the inliers; their pseudo-labels are --teacher's (OP_Match: student)
        fix, mask = inlier_fixmatch(target_logits(self, teacher, weak1, logits[2]), logits[4],
                                    inlier, self.confidence_threshold)
        return Losses(xe + ova_labeled,
                      self.oem_weight * oem + self.socr_weight * socr
                      + self.consistency_weight * fix,
                      {'ova_labeled': ova_labeled, 'oem': oem, 'socr': socr, 'pseudo_label': fix,
                       'mask': tf.reduce_mean(mask), 'inliers': tf.reduce_mean(inlier)})


def select_inliers(unknown):
    """1. for each pool image whose unknown score is below 0.5 (an inlier), else 0."""
    return (unknown < UNKNOWN_THRESHOLD).astype('float32')


def inlier_fixmatch(weak_logits, strong_logits, inlier, threshold):
    """(FixMatch's loss on the inliers, its mask): hard pseudo-labels of the weak view where
    confident and selected, trained on the strong view, summed over the batch and divided by
    the number of selected images (the mean over the authors' batch of selected images)."""
    probs = tf.stop_gradient(tf.nn.softmax(weak_logits))
    mask = losses.confidence_mask(probs, threshold) * inlier
    hard = tf.one_hot(tf.argmax(probs, -1), tf.shape(probs)[-1])
    per_image = -tf.reduce_sum(hard * tf.nn.log_softmax(strong_logits), -1) * mask
    return tf.reduce_sum(per_image) / tf.maximum(1., tf.reduce_sum(inlier)), mask
