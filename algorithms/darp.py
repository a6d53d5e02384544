"""DARP (Kim et al., NeurIPS 2020, arXiv 2007.08844): distribution aligning refinery of
pseudo-labels, plugged on a base algorithm (--base_algorithm: FixMatch or ReMixMatch, USB's
classic_cv_imb fixmatch_darp and remixmatch_darp).

Under class imbalance the pseudo-labels of the pool pile onto the head classes. DARP refines them
all at once: the pool's label distributions Q are projected onto the matrices X whose rows are
distributions and whose columns sum to the target class counts m (the labeled prior times the
pool size, USB's target_disb), minimising KL(X || Q) weighted per image by 1 / H(q_i) (Eq. 3),
solved on the dual by coordinate ascent (Eq. 5-7): X_ij = q_ij/e * exp(-lambda_i / w_i)
* exp(-nu_j / w_i), the row step in closed form and each column's nu_j by Newton's method. Before
the projection, alpha * m_j images most confident in class j keep class j's mass rescaled to m_j
(the initialisation of the authors' estimate_pseudo; USB's DARPPseudoLabelingHook).

Ours: the pool's distributions come from a pass of the EMA model over the whole pool (core/
pool.py) every 10 steps but at most once an epoch of the pool (`refine_every_steps` 0; given, as
given) from `start_fraction` of training on, not from each image's last training-batch prediction (USB); between passes each image's
refined distribution is looked up by its pool index. USB's refinement every 10 steps re-solves
the projection on stored predictions each refreshed once an epoch of the pool, as the image
passes; a pass as often would cost a pool's inference every 10 steps (on a CPU-sized run, several
times the training itself). On FixMatch the hard pseudo-label is the refined distribution's arg-max and
the confidence mask is taken on the refined distribution too (the authors' train_fix: max_p,
p_hat = max(targets_u) after the refinement; USB masks on the unrefined prediction), so an image
whose label the projection moved trains only if the move is confident. Defaults: alpha 2, T = 10
iterations (USB's fixmatch_darp_cifar10_lb1500_100_ulb3000_100_0.yaml: darp_alpha, darp_iter_T;
the authors' --alpha, --iter_T), from
40% of training on (the authors' run.sh and README: --warm 200 of --epoch 500; USB keeps 200
epochs of its 256).

The target is the labeled prior (the authors' Table 1, where the pool follows the labels; USB
always). For a pool whose distribution differs (the reversed pool), the authors' Table 2 target
is an estimate of the pool's distribution by black-box shift estimation (their
train_base_estim.py: a supervised model's confusion matrix on images held out of the labeled
set, inverted against its predicted pool distribution); that is not built here, so on such a
pool DARP projects towards the labels' distribution, as USB's does.

On ReMixMatch (the authors' train_remix in training_functions.py) DARP refines ReMixMatch's
guess: the pool's distributions are aligned by the run's p(y) and p~(y) and sharpened
(ReMixMatchParts.aligned_guess) before the projection, and the refined distribution, a soft
target, replaces the guess wherever ReMixMatch uses it: the mixup targets of the weak and strong
views and the pre-mixup term's target. (USB's ReMixMatch never asks its pseudo-labelling hook, so
its remixmatch_darp trains ReMixMatch unrefined.) w_match 1.5 (remixmatch.py BASE_DEFAULTS).
"""
import numpy as np
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (LABELED_PRIOR, ConfigError, Losses, State, hparam, register,
                                     teacher_field)
from ssl_ema.algorithms.remixmatch import Plugged


def darp_projection(probs, target, alpha: float = 2., iterations: int = 10, newton_steps=30):
    """The refined label distributions [N, K] of `probs` [N, K] whose class sums approach
    `target` [K] (counts summing to N): the alpha-initialisation, then `iterations` rounds of the
    row step and the Newton column step of DARP's dual (Eq. 5-7); the last step is a row step,
    so every row is a distribution."""
    q = np.asarray(probs, np.float64)
    n, k = q.shape
    target = np.asarray(target, np.float64)
    # Initialisation: the alpha * m_j images most confident in class j (tail classes first, as
    # the authors) get class j's probability scaled so those images' mass is m_j; the rest ~0.
    keep, mass = np.zeros_like(q), np.zeros(k)
    for j in reversed(range(k)):
        top = np.argsort(-q[:, j], kind='stable')[:int(alpha * target[j])]
        keep[top, j], mass[j] = 1., q[top, j].sum()
    q = q * keep * ((target + 1e-6) / (mass + 1e-6)) + 1e-6
    q /= q.sum(1, keepdims=True)
    w = 1. / (-(q * np.log(q + 1e-6)).sum(1))   # per-image weight 1 / entropy
    a = q / np.e
    nu = np.zeros(k)
    for _ in range(iterations):
        x = 1. / (a * np.exp(-nu[None] / w[:, None])).sum(1)   # rows sum to 1
        for _ in range(newton_steps):   # sum_i a_ij x_i exp(-nu_j / w_i) = m_j, all j at once
            terms = a * x[:, None] * np.exp(-nu[None] / w[:, None])
            f, df = terms.sum(0) - target, -(terms / w[:, None]).sum(0)
            nu = nu - f / np.where(df == 0, -1e-12, df)
    y = np.exp(-nu[None] / w[:, None])
    x = 1. / (a * y).sum(1)
    return (a * x[:, None] * y).astype(np.float32)


@register('darp')
class DARP(Plugged):
    plugged_as = 'refines'
    needs_indices = True
    base_algorithm: str = hparam('fixmatch', 'Algorithm whose pseudo-labels DARP refines '
                                 '(USB\'s classic_cv_imb: fixmatch, remixmatch).')
    consistency_weight: float = hparam(None, 'Weight lambda_u of the base\'s unlabeled loss '
                                       '(None: the base\'s).')
    confidence_threshold: float = hparam(0.95, 'The base\'s confidence threshold tau (fixmatch).')
    teacher: str = teacher_field()
    darp_alpha: float = hparam(2., 'DARP\'s alpha: alpha * m_j images start as class j\'s '
                               'candidates (USB darp_alpha 2.0).')
    darp_iterations: int = hparam(10, 'Coordinate-ascent rounds T of the projection (USB '
                                  'darp_iter_T 10).')
    refine_every_steps: int = hparam(0, 'Steps between two refinements, each a pass of the EMA '
                                     'model over the pool; 0: every 10 steps (USB\'s '
                                     'darp_num_refine_iter, on predictions refreshed as the '
                                     'images pass) but at most once an epoch of the pool.')
    start_fraction: float = hparam(0.4, 'Fraction of training before the first refinement '
                                   '(the authors\' run.sh: --warm 200 of --epoch 500).')

    def __post_init__(self):
        super().__post_init__()
        if self.darp_alpha <= 0 or self.darp_iterations < 1 or self.refine_every_steps < 0 \
                or not 0 <= self.start_fraction <= 1:
            raise ConfigError('--darp_alpha must be > 0, --darp_iterations >= 1, '
                              '--refine_every_steps >= 0, --start_fraction in [0, 1]')

    @property
    def pool_pass_every_steps(self):
        return self.refine_every_steps or 10   # USB darp_num_refine_iter

    @property
    def pool_pass_every_pool_epochs(self):
        return 0. if self.refine_every_steps else 1.

    @property
    def pool_pass_start(self):
        return self.start_fraction

    def state(self, num_classes, pool_size):
        # refined: each pool image's refined distribution, all zeros until the first refinement.
        return {'refined': State((pool_size, num_classes), 0.),
                LABELED_PRIOR: State((num_classes,), 1. / num_classes),
                **self.base_state(num_classes)}

    def from_pool(self, probabilities, state, progress, unknown=None):
        if self.on_remixmatch:   # the guess ReMixMatch would make of each pool image
            probabilities = np.asarray(self.aligned_guess(probabilities, state))
        target = state[LABELED_PRIOR] * len(probabilities)
        return {'refined': darp_projection(probabilities, target, self.darp_alpha,
                                           self.darp_iterations)}

    def refined(self, batch, probs):
        """(the batch's refined distributions, `probs` where the pool is not refined yet; 1. where
        that moved the arg-max, else 0.)"""
        refined = tf.gather(batch.state['refined'], batch.unlabeled_index)
        ready = tf.reduce_sum(refined, -1, keepdims=True) > 0
        target = tf.where(ready, refined, probs)
        return target, tf.cast(tf.argmax(target, -1) != tf.argmax(probs, -1), tf.float32)

    def __call__(self, student, teacher, batch):
        if self.on_remixmatch:
            guess, state = self.student_guess(student, teacher, batch)
            target, changed = self.refined(batch, guess)
            xe, unlabeled, metrics = self.anchored(student, batch, target)
            return Losses(xe, unlabeled, dict(metrics, refined_changed=tf.reduce_mean(changed)),
                          state)
        xe, probs, strong_logits = self.weak_strong(student, teacher, batch)
        target, changed = self.refined(batch, probs)
        mask = losses.confidence_mask(target, self.confidence_threshold)
        hard = tf.one_hot(tf.argmax(target, -1), tf.shape(probs)[-1])
        pseudo = losses.soft_cross_entropy(hard, tf.cast(strong_logits, tf.float32), mask)
        return Losses(xe, self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask),
                       'refined_changed': tf.reduce_mean(changed)})
