"""AdaMatch (Berthelot et al., ICLR 2022, arXiv:2106.04732) for semi-supervised learning.

FixMatch (algorithms/fixmatch.py: hard pseudo-labels from the weak view train the strong view,
the loss averaged over every unlabeled image) with three changes (Sec. 3):
- distribution alignment (Sec. 3.2): the weak-view prediction p is multiplied by p~_L / p~_U and
  renormalised, where p~_L is the running average (momentum 0.999) of the predictions on the
  labeled images (not ReMixMatch's label histogram) and p~_U the mean prediction on the unlabeled
  weak views over the last 128 batches, both starting at 1/C and both updated with this batch
  before it is aligned (the authors' google-research/adamatch semi_supervised/adamatch.py:
  p_labeled, an ExponentialMovingAverage; p_unlabeled, a MovingAverage of buffer_size=128);
- relative confidence threshold (Sec. 3.3): an image counts when its largest aligned probability
  reaches c_tau = tau * mean_b max_c p(c | labeled image b), so the bar follows how confident the
  model is on images whose labels it is taught (tau = 0.9: the paper's and the authors'
  --confidence; losses.relative_threshold);
- warm-up (Sec. 3.4): loss = l_s + lambda_u mu(t) l_u, mu(t) = 1/2 - cos(min(pi, 2 pi t / T)) / 2,
  i.e. --ramp_up=cosine over --warmup_fraction=0.5 (runs/algorithms/adamatch.flags; the
  toolkit's shared default fraction is 0.4), lambda_u = 1 (the authors' --wu).

The mean labeled confidence of c_tau is the current batch's (every replica's), not a running
average: the authors' code computes it so (softmax(logit_sx_weak).max(1).mean(0) * confidence)
and so does USB (AdaMatchThresholdingHook); the only running averages AdaMatch keeps are the two
class distributions, the algorithm's state. With --teacher=ema the labeled and unlabeled
predictions (threshold, alignment and pseudo-labels) come from the EMA model.

Deliberate differences: no random logit interpolation (Sec. 3.1), which mixes the logits of a
labeled-only batch-norm pass into the joint pass's to bridge two domains' batch statistics: here
labeled and unlabeled images come from one distribution, and it would cost a second labeled pass
(the authors' semi-supervised script keeps it, USB's adamatch drops it). The labeled loss is on the
weakly augmented labeled view only, as USB's; the authors average a weak and a strong labeled
view's. USB (config/classic_cv/adamatch, e.g. adamatch_cifar10_40_0.yaml) differs too: tau = 0.95
(p_cutoff), p~_U a moving average from the first batch's mean (here --prediction_window=0: a
moving average from 1/C), and no warm-up (--ramp_up=none).
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (Algorithm, Losses, State, concat_forward, hparam, register,
                                     replica_mean, target_logits, teacher_field)


@register('adamatch')
class AdaMatch(Algorithm):
    views = ('weak', 'strong')
    consistency_weight: float = hparam(1., 'lambda_u: weight of the unlabeled loss after the '
                                       'warm-up mu(t) (the authors\' --wu).')
    confidence_threshold: float = hparam(
        0.9, 'tau: an unlabeled image counts when its aligned confidence reaches tau times the '
        'labeled batch\'s mean confidence (the paper\'s and the authors\' 0.9; USB\'s 0.95).')
    state_momentum: float = hparam(0.999, 'Momentum of the running average p~_L of the labeled '
                                   'predictions (the authors\'), and of p~_U when '
                                   '--prediction_window=0.')
    prediction_window: int = hparam(128, 'p~_U is the mean unlabeled prediction over the last this '
                                    'many batches (the authors\' 128); 0: a moving average with '
                                    '--state_momentum instead (USB\'s).')
    ramp_up: str = hparam('cosine', 'Warm-up shape of lambda_u (cosine: the paper\'s mu(t), over '
                          '--warmup_fraction=0.5).')
    teacher: str = teacher_field()

    def state(self, num_classes, pool_size):
        window = (self.prediction_window,) if self.prediction_window else ()
        return {'p_labeled': State((num_classes,), 1. / num_classes),
                'p_unlabeled': State(window + (num_classes,), 1. / num_classes)}

    def __call__(self, student, teacher, batch):
        weak, strong = batch.unlabeled
        labeled_logits, weak_logits, strong_logits = concat_forward(
            student, batch.labeled_x, weak, strong)
        xe = losses.cross_entropy(batch.labels, labeled_logits)
        labeled_probs = tf.nn.softmax(target_logits(self, teacher, batch.labeled_x,
                                                    labeled_logits))
        probs = tf.nn.softmax(target_logits(self, teacher, weak, weak_logits))
        m, old = self.state_momentum, batch.state
        mean_probs = replica_mean(tf.reduce_mean(probs, 0))
        if self.prediction_window:   # the window of batch means, oldest first
            p_unlabeled = tf.concat([old['p_unlabeled'][1:], mean_probs[None]], 0)
            unlabeled_distribution = tf.reduce_mean(p_unlabeled, 0)
        else:
            p_unlabeled = unlabeled_distribution = losses.moving_average(
                old['p_unlabeled'], mean_probs, m)
        state = {'p_labeled': losses.moving_average(
                     old['p_labeled'], replica_mean(tf.reduce_mean(labeled_probs, 0)), m),
                 'p_unlabeled': p_unlabeled}
        aligned = losses.align_distribution(probs, state['p_labeled'], unlabeled_distribution)
        threshold = replica_mean(losses.relative_threshold(labeled_probs,
                                                           self.confidence_threshold))
        mask = losses.confidence_mask(aligned, threshold)
        hard = tf.one_hot(tf.argmax(aligned, -1), tf.shape(aligned)[-1])
        pseudo = losses.soft_cross_entropy(hard, strong_logits, mask)
        return Losses(xe, batch.ramp * self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask),
                       'threshold': threshold}, state)
