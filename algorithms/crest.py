"""CReST and CReST+ (Wei et al., CVPR 2021, arXiv 2102.09559): class-rebalancing self-training
on a base algorithm (--base_algorithm, FixMatch: USB's classic_cv_imb fixmatch_crest and
fixmatch_crest+; the authors' google-research/crest).

CReST trains the base in generations; after each one the pool's pseudo-labels expand the labeled
set, each class c keeping its share mu_c of the images predicted as it, the most confident ones:
mu_c = (N_{K+1-c} / N_1)^alpha with the classes ranked by labeled count N_1 >= ... >= N_K
(Sec. 3.2, Eq. 1 of the paper), so the rarest class keeps all its pseudo-labels and the most
frequent one (N_K / N_1)^alpha of them. CReST+ adds progressive distribution alignment
(Sec. 3.3): the base's weak-view probabilities q become Normalize(q * p_t / p~), p~ the mean
prediction of the last batches and p_t the labeled class distribution to the power t,
normalised, its temperature annealed linearly over the generations g = 0 .. G-1 from 1 to
t_min: t_g = (1 - g / (G-1)) + g / (G-1) * t_min (the authors' --how_dalign=adaptive); the
threshold applies to the aligned probabilities, as theirs.

Ours: the generations are stretches of one run, not G trainings from scratch (USB and the
authors re-initialise the model, optimizer and schedule each generation). Each boundary, every
1/G of training from 1/G on, is a pass of the EMA model over the whole pool (core/pool.py) that
makes the selection, held as state (a 0/1 per pool index and its pseudo-label, with the count of
generations done), so a resumed run redoes or keeps it exactly. A selection replaces the last
(the authors rebuild the labeled set from the original one each generation). The selected
images stay in the pool, as theirs, and are learnt as labeled where they are drawn: the labeled
loss is the mean cross-entropy over the labeled batch and the batch's selected pool images (their
weak view against their stored pseudo-label), so the added images are seen at the unlabeled
batches' rate, not drawn uniformly with the labeled ones. Classes are ranked by their labeled
counts, not by their index (USB and the authors take class 0 for the most frequent). The
alignment's p~ is the mean of the last `prediction_window` batches' mean predictions before this
batch's (the authors' PMovingAverage of 128). Defaults: G = 6 generations, alpha = 1/3 (USB
crest_num_gens 6, crest_alpha 3 as the exponent 1/alpha; the authors' --alpha 3), t_min = 0.5
(USB crest_dist_align_t, the authors' --dalign_t), the base's lambda_u = 1 and tau = 0.95.
"""
import numpy as np
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (LABELED_PRIOR, ConfigError, Losses, State, WeakStrong,
                                     check_base, forward, hparam, register, replica_mean,
                                     target_logits, teacher_field)

BASES = ('fixmatch',)   # the base algorithms CReST expands the labeled set of


def crest_sampling_rates(prior, alpha):
    """mu_c [K] of each class (Eq. 1): the class of rank r by labeled count (0: the most frequent;
    ties by class index) keeps (N_(K-1-r) / N_(0))^alpha of its pseudo-labels."""
    prior = np.asarray(prior, np.float64)
    ranked = np.argsort(-prior, kind='stable')   # ranked[r]: the class of rank r
    rates = np.empty(len(prior))
    rates[ranked] = (prior[ranked[::-1]] / prior[ranked[0]]) ** alpha
    return rates


def crest_selection(probs, rates):
    """(selected [N] 0/1, pseudo-label [N]) of a generation: of the pool images predicted as c,
    the int(n_c * mu_c) most confident ones (ties by index)."""
    probs = np.asarray(probs)
    predicted, confidence = probs.argmax(1), probs.max(1)
    selected = np.zeros(len(probs), np.float32)
    for c, rate in enumerate(rates):
        members = np.flatnonzero(predicted == c)
        order = members[np.lexsort((members, -confidence[members]))]
        selected[order[:int(len(members) * rate)]] = 1.
    return selected, predicted.astype(np.int32)


def crest_plus_temperature(generation, generations, t_min):
    """t_g of progressive distribution alignment: 1 at generation 0, t_min at the last one."""
    done = tf.cast(generation, tf.float32) / max(generations - 1, 1)
    return (1. - done) + done * t_min


@register('crest')
class CReST(WeakStrong):
    needs_indices = True
    base_algorithm: str = hparam('fixmatch', 'Algorithm that CReST trains in generations on an '
                                 'expanding labeled set (USB\'s classic_cv_imb: fixmatch).')
    consistency_weight: float = hparam(1., 'Weight lambda_u of the base\'s unlabeled loss.')
    confidence_threshold: float = hparam(0.95, 'The base\'s confidence threshold tau.')
    teacher: str = teacher_field()
    generations: int = hparam(6, 'Generations G of self-training in the run, each a 1/G of it; '
                              'each boundary adds pool images (USB crest_num_gens 6).')
    crest_alpha: float = hparam(1 / 3, 'Exponent alpha of the per-class sampling rates '
                                '(N_{K+1-c} / N_1)^alpha (USB crest_alpha 3, as 1/alpha).')

    def __post_init__(self):
        super().__post_init__()
        check_base(self, BASES, 'expands the labeled set of')
        if self.generations < 1 or self.crest_alpha < 0:
            raise ConfigError('--generations must be >= 1 and --crest_alpha >= 0')

    @property
    def pool_pass_every_fraction(self):
        return 1. / self.generations if self.generations > 1 else 0.

    @property
    def pool_pass_start(self):
        return 1. / self.generations

    def state(self, num_classes, pool_size):
        # crest_selected, crest_label: the last generation's added pool images and their labels.
        return {'crest_selected': State((pool_size,), 0.),
                'crest_label': State((pool_size,), 0, tf.int32),
                'crest_generation': State((), 0.),   # generations done (0 .. G-1)
                LABELED_PRIOR: State((num_classes,), 1. / num_classes)}

    def from_pool(self, probabilities, state, progress, unknown=None):
        if state['crest_generation'] >= self.generations - 1:   # the pass schedule's rounding
            return {}
        selected, label = crest_selection(
            probabilities, crest_sampling_rates(state[LABELED_PRIOR], self.crest_alpha))
        return {'crest_selected': selected, 'crest_label': label,
                'crest_generation': np.float32(state['crest_generation'] + 1)}

    def pseudo_label_probabilities(self, probs, batch):
        """The probabilities the base's pseudo-labels and mask come from, and new state."""
        return probs, {}

    def __call__(self, student, teacher, batch):
        weak, strong = batch.unlabeled
        xe, (weak_logits, strong_logits) = forward(student, batch, weak, strong)
        probs, new_state = self.pseudo_label_probabilities(
            tf.nn.softmax(target_logits(self, teacher, weak, weak_logits)), batch)
        mask = losses.confidence_mask(probs, self.confidence_threshold)
        hard = tf.one_hot(tf.argmax(probs, -1), tf.shape(probs)[-1])
        pseudo = losses.soft_cross_entropy(hard, tf.cast(strong_logits, tf.float32), mask)
        # The added images: labeled where they are drawn, on their weak view.
        added = tf.gather(batch.state['crest_selected'], batch.unlabeled_index)
        added_xe = tf.nn.sparse_softmax_cross_entropy_with_logits(
            tf.gather(batch.state['crest_label'], batch.unlabeled_index),
            tf.cast(weak_logits, tf.float32))
        labeled_count = tf.cast(tf.shape(batch.labels)[0], tf.float32)
        labeled = (xe * labeled_count + tf.reduce_sum(added_xe * added)) / (
            labeled_count + tf.reduce_sum(added))
        return Losses(labeled, self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask),
                       'added': tf.reduce_mean(added),
                       'generation': batch.state['crest_generation']}, new_state)


@register('crest_plus')
class CReSTPlus(CReST):
    alignment_temperature: float = hparam(0.5, 'Temperature t_min of the last generation\'s '
                                          'target distribution (USB crest_dist_align_t 0.5).')
    prediction_window: int = hparam(128, 'Batches whose mean predictions make the alignment\'s '
                                    'estimate p~ (the authors\' PMovingAverage buffer 128).')

    def __post_init__(self):
        super().__post_init__()
        if self.alignment_temperature <= 0 or self.prediction_window < 1:
            raise ConfigError('--alignment_temperature must be > 0 and --prediction_window '
                              '>= 1 for --algorithm=crest_plus')

    def state(self, num_classes, pool_size):
        return {**super().state(num_classes, pool_size),
                'p_model': State((self.prediction_window, num_classes), 1. / num_classes)}

    def pseudo_label_probabilities(self, probs, batch):
        t = crest_plus_temperature(batch.state['crest_generation'], self.generations,
                                   self.alignment_temperature)
        target = batch.state[LABELED_PRIOR] ** t
        window = batch.state['p_model']
        aligned = losses.align_distribution(probs, target / tf.reduce_sum(target),
                                            tf.reduce_mean(window, 0))
        window = tf.concat([window[1:], replica_mean(tf.reduce_mean(probs, 0))[None]], 0)
        return aligned, {'p_model': window}
