"""SAW (Lai et al., ICML 2022, "Smoothed Adaptive Weighting for Imbalanced Semi-Supervised
Learning"): class weights from the effective number of samples, plugged on a base algorithm
(--base_algorithm, FixMatch: USB's classic_cv_imb fixmatch_saw).

Each class's weight is the inverse of its effective number of samples (Cui et al., CVPR 2019,
arXiv 1901.05555, Eq. 3: E_n = (1 - beta^n) / (1 - beta)), smoothed by choosing beta = (N - 1) / N
with N the mean class count (USB's saw/utils.py; the authors' classWeights.getClassWeights
with --effective 1, as their jeff_remix_0.sh and jeff_stl_0.sh pass: their train_example.sh for
FixMatch on CIFAR-10 passes a fixed beta 0.99 instead), and normalised so that the K weights sum to K:
w_c = K * [(1 - beta) / (1 - beta^n_c)] / sum_j [(1 - beta) / (1 - beta^n_j)]. The labeled
loss weighs each image's cross-entropy by w(labeled counts)[y] (the authors' --distbl gt_l); the
unlabeled loss weighs each confident image by w(predicted counts)[pseudo-label] (--distbu
pseudo), the predicted counts being the arg-max classes of the whole pool, each at least 1. The
authors' SAW_SSL (classWeights.getClassWeights, type 'effective' with --normalize 1) and USB's
saw/utils.py (effective_weights) compute these weights; the paper's own numbering of them was not
available to us, so the equations are cited from the effective-number paper they build on.

Ours: the predicted counts come from a pass of the EMA model over the pool (core/pool.py) every
1/256 of training, as USB's re-evaluation after every one of its 256 epochs, but at most once an
epoch of the pool (1/256 of a CPU-sized run would be a pass every 4 steps; a
`reweight_every_fraction` given is kept as given), the first after one interval; until then the unlabeled weights are 1
(USB's: the weights of a uniform pool). One strong view an image, as USB's FixMatch (the authors'
FixMatch trains two, train_fix_cifar10.py). Defaults: lambda_u 1 and tau 0.95 (USB's fixmatch_saw_cifar10_lb1500_100_ulb3000
_100_0.yaml: ulb_loss_ratio, p_cutoff; the authors' scripts: --lambda_u 1 --tau 0.95).
"""
import numpy as np
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (LABELED_PRIOR, ConfigError, Losses, State, WeakStrong,
                                     check_base, hparam, register, teacher_field)

BASES = ('fixmatch',)   # the base algorithms whose losses SAW weighs


def effective_number_weights(counts):
    """SAW's class weights [K] from class counts [K] (each at least 1): the inverse effective
    number (1 - beta) / (1 - beta^n_c) with beta = (N - 1) / N, N the mean count, normalised to
    sum to K. A balanced count gives weight 1 for every class."""
    counts = tf.maximum(tf.cast(counts, tf.float32), 1.)
    n = tf.reduce_mean(counts)
    beta = (n - 1.) / n
    weights = (1. - beta) / (1. - tf.pow(beta, counts))
    return weights / tf.reduce_sum(weights) * tf.cast(tf.size(counts), tf.float32)


@register('saw')
class SAW(WeakStrong):
    # The labeled set's size makes its class counts from the labeled prior (the state below).
    needs_labeled_indices = True
    base_algorithm: str = hparam('fixmatch', 'Algorithm whose labeled and unlabeled losses SAW '
                                 'weighs (USB\'s classic_cv_imb: fixmatch).')
    consistency_weight: float = hparam(1., 'Weight lambda_u of the base\'s unlabeled loss.')
    confidence_threshold: float = hparam(0.95, 'The base\'s confidence threshold tau.')
    teacher: str = teacher_field()
    reweight_every_fraction: float = hparam(0., 'Fraction of training between two '
                                            're-countings of the pool\'s predicted classes, each '
                                            'a pass of the EMA model over the pool; 0: every '
                                            '1/256 of training (USB: after every one of 256 '
                                            'epochs) but at most once an epoch of the pool.')

    def __post_init__(self):
        super().__post_init__()
        check_base(self, BASES, 'weighs')
        if not 0 <= self.reweight_every_fraction <= 1:
            raise ConfigError('--reweight_every_fraction must be in [0, 1]')

    @property
    def pool_pass_every_fraction(self):
        return self.reweight_every_fraction or 1 / 256   # USB: after every one of 256 epochs

    @property
    def pool_pass_every_pool_epochs(self):
        return 0. if self.reweight_every_fraction else 1.

    def state(self, num_classes, pool_size, labeled_size=0):
        # unlabeled_weights: w(predicted counts), 1 until the first pass over the pool.
        return {LABELED_PRIOR: State((num_classes,), 1. / num_classes),
                'labeled_size': State((), float(labeled_size)),
                'unlabeled_weights': State((num_classes,), 1.)}

    def from_pool(self, probabilities, state, progress, unknown=None):
        counts = np.bincount(np.argmax(probabilities, 1), minlength=probabilities.shape[1])
        return {'unlabeled_weights': effective_number_weights(counts)}

    def __call__(self, student, teacher, batch):
        labeled_logits, weak_logits, strong_logits = (
            tf.cast(t, tf.float32) for t in self.weak_strong_logits(student, teacher, batch))
        probs = tf.nn.softmax(weak_logits)
        labeled_weights = effective_number_weights(
            tf.round(batch.state[LABELED_PRIOR] * batch.state['labeled_size']))
        per_image = tf.nn.sparse_softmax_cross_entropy_with_logits(batch.labels, labeled_logits)
        labeled = tf.reduce_mean(per_image * tf.gather(labeled_weights, batch.labels))
        classes = tf.argmax(probs, -1, output_type=tf.int32)
        mask = losses.confidence_mask(probs, self.confidence_threshold)
        weight = tf.gather(batch.state['unlabeled_weights'], classes)
        pseudo = losses.soft_cross_entropy(tf.one_hot(classes, tf.shape(probs)[-1]),
                                           strong_logits, mask * weight)
        return Losses(labeled, self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask),
                       'unlabeled_weight': tf.reduce_mean(weight * mask)})
