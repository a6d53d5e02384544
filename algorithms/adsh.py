"""ADSH (Guo & Li, ICML 2022, "Class-Imbalanced Semi-Supervised Learning with Adaptive
Thresholding"): per-class thresholds chosen on the whole pool, plugged on a base algorithm
(--base_algorithm, FixMatch: USB's classic_cv_imb fixmatch_adsh).

A fixed threshold tau_1 passes many pseudo-labels of the head class and few of the tail classes,
whose predictions are less confident. ADSH keeps tau_1 for the head class and gives every other
class the threshold that passes the same share of its own predictions: on the pool, C_k holds
the confidences of the images predicted as class k, sorted high to low; rho = |{c in C_h :
c >= tau_1}| / |C_h| for the head class h; and class k's threshold is the confidence of its
ceil(rho |C_k|)-th most confident image (at least its first), so that a share rho of each class's
predictions counts (the paper's rank-based, closed-form thresholds relative to the majority
class; no copy of its text was at hand, so they are cited by that description rather than by
equation number). Training is the base's: FixMatch where each weak-view prediction of class k
needs confidence >= tau_k.

USB's adsh/utils.py takes class 0 as the head class and starts every threshold at
exp(-tau_1) = 0.39 (its scores are -log confidences initialised to tau_1), so until its first
pass nearly every pseudo-label counts; its rho is one rank short and, when no head-class image
reaches tau_1, 1 (every image passes). Ours: the head class is the one with the most labeled
images (the labeled prior's arg-max; among equals, the pool's most predicted), every threshold starts at tau_1 (FixMatch's, until the
first pass), and a pass in which no head-class image reaches tau_1 sets every threshold to
tau_1; a class the pool never predicts keeps its threshold. The confidences come from a pass of
the EMA model over the pool (core/pool.py) every 1/256 of training, as USB's re-evaluation
after every one of its 256 epochs, but at most once an epoch of the pool (1/256 of a CPU-sized
run would be a pass every 4 steps; an `adapt_every_fraction` given is kept as given), the first
after one interval. Defaults: tau_1 0.95 and
lambda_u 1 (USB's fixmatch_adsh_cifar10_lb1500_100_ulb3000_100_0.yaml: adsh_tau_1's default
0.95, p_cutoff, ulb_loss_ratio).
"""
import math

import numpy as np
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (LABELED_PRIOR, ConfigError, Losses, State, WeakStrong,
                                     check_base, hparam, register, teacher_field)

BASES = ('fixmatch',)   # the base algorithms whose thresholds ADSH adapts


def adaptive_thresholds(probs, head, tau, previous):
    """ADSH's per-class thresholds [K] from class probabilities [N, K] of the pool: the head
    class `head` keeps `tau`, each other class the confidence that passes the same share rho of
    its own predictions; `previous` [K] for the classes nothing is predicted as."""
    probs = np.asarray(probs, np.float64)
    confidence, predicted = probs.max(1), probs.argmax(1)
    thresholds = np.array(previous, np.float64)
    by_class = [np.sort(confidence[predicted == k])[::-1] for k in range(probs.shape[1])]
    if not len(by_class[head]):
        return thresholds.astype(np.float32)
    rho = np.mean(by_class[head] >= tau)
    if rho == 0:
        return np.full_like(thresholds, tau, np.float32)
    for k, scores in enumerate(by_class):
        if len(scores):
            thresholds[k] = scores[max(math.ceil(rho * len(scores) - 1e-9), 1) - 1]
    thresholds[head] = tau   # the pool's head-class images above tau are exactly those passing
    return thresholds.astype(np.float32)


def head_class(prior, probs):
    """The class with the most labeled images; among classes with equally many (a balanced
    labeled set), the one the pool is most often predicted as, then the first."""
    prior = np.asarray(prior, np.float64)
    tied = prior >= prior.max() * (1. - 1e-6)
    predicted = np.bincount(np.argmax(probs, 1), minlength=len(prior))
    return int(np.argmax(np.where(tied, predicted, -1)))


@register('adsh')
class ADSH(WeakStrong):
    base_algorithm: str = hparam('fixmatch', 'Algorithm whose thresholds ADSH adapts (USB\'s '
                                 'classic_cv_imb: fixmatch).')
    consistency_weight: float = hparam(1., 'Weight lambda_u of the base\'s unlabeled loss.')
    confidence_threshold: float = hparam(0.95, 'tau_1: the head class\'s threshold, which sets '
                                         'the share of every class\'s pseudo-labels (USB '
                                         'adsh_tau_1 0.95); every threshold starts at it.')
    teacher: str = teacher_field()
    adapt_every_fraction: float = hparam(0., 'Fraction of training between two choices of '
                                         'the thresholds, each a pass of the EMA model over the '
                                         'pool; 0: every 1/256 of training (USB: after every '
                                         'one of 256 epochs) but at most once an epoch of the '
                                         'pool.')

    def __post_init__(self):
        super().__post_init__()
        check_base(self, BASES, 'adapts the thresholds of')
        if not 0 <= self.adapt_every_fraction <= 1:
            raise ConfigError('--adapt_every_fraction must be in [0, 1]')

    @property
    def pool_pass_every_fraction(self):
        return self.adapt_every_fraction or 1 / 256   # USB: after every one of 256 epochs

    @property
    def pool_pass_every_pool_epochs(self):
        return 0. if self.adapt_every_fraction else 1.

    def state(self, num_classes, pool_size):
        return {LABELED_PRIOR: State((num_classes,), 1. / num_classes),
                'thresholds': State((num_classes,), self.confidence_threshold)}

    def from_pool(self, probabilities, state, progress, unknown=None):
        head = head_class(state[LABELED_PRIOR], probabilities)
        return {'thresholds': adaptive_thresholds(probabilities, head, self.confidence_threshold,
                                                  state['thresholds'])}

    def __call__(self, student, teacher, batch):
        xe, probs, strong_logits = self.weak_strong(student, teacher, batch)
        classes = tf.argmax(probs, -1, output_type=tf.int32)
        mask = tf.cast(tf.reduce_max(probs, -1) >= tf.gather(batch.state['thresholds'], classes),
                       tf.float32)
        pseudo = losses.soft_cross_entropy(tf.one_hot(classes, tf.shape(probs)[-1]),
                                           tf.cast(strong_logits, tf.float32), mask)
        return Losses(xe, self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask),
                       'lowest_threshold': tf.reduce_min(batch.state['thresholds'])})
