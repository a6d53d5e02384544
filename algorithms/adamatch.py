"""AdaMatch (Berthelot, Roelofs, Sohn, Carlini and Kurakin, "AdaMatch: A Unified Approach to
Semi-Supervised Learning and Domain Adaptation", ICLR 2022, arXiv:2106.04732; the authors' code
google-research/adamatch, semi_supervised/adamatch.py).

FixMatch (algorithms/fixmatch.py: hard pseudo-labels from the weak view train the strong view,
the loss averaged over every unlabeled image) with the paper's distribution alignment and
relative confidence threshold (its names for them) and a warm-up of the unlabeled weight; its
random logit interpolation is left out (below). The paper's equation numbers are not cited: its
text past the abstract could not be read when this was checked, so every formula below was
checked against the authors' code instead:
- distribution alignment: the weak-view prediction p is multiplied by p~_L / p~_U and
  renormalised, where p~_L is the running average (momentum 0.999) of the predictions on the
  labeled images (not ReMixMatch's label histogram) and p~_U the mean prediction on the unlabeled
  weak views over the last 128 batches, both starting at 1/C and both updated with this batch
  before it is aligned (the authors' p_labeled, objax.nn.ExponentialMovingAverage with its
  default momentum 0.999, and p_unlabeled, objax.nn.MovingAverage(buffer_size=128), both with
  init_value 1/C; pseudo_labels *= (1e-6 + p_labeled) / (1e-6 + p_unlabeled));
- relative confidence threshold: an image counts when its largest aligned probability reaches
  c_tau = tau * mean_b max_c p(c | labeled image b), so the bar follows how confident the model
  is on images whose labels it is taught (the authors' confidence_ratio =
  softmax(logit_sx_weak).max(1).mean(0) * confidence, --confidence 0.9;
  losses.relative_threshold);
- the warm-up of the unlabeled weight: loss = l_s + lambda_u mu(t) l_u, mu(t) = 1/2 -
  cos(pi min(1, t / (T / 2))) / 2 (the authors' self.wu = ScheduleCosPhases(1, [(0.5, 1),
  (1, wu)], start_value=0): a half cosine from 0 to 1 over the first half of training, then 1),
  i.e. --ramp_up=cosine over --warmup_fraction=0.5 (runs/algorithms/adamatch.flags; the
  toolkit's shared default fraction is 0.4), lambda_u = 1 (the authors' --wu; with --wu != 1
  their second phase ramps from 1 to wu, where ours scales the whole of mu(t)).

The mean labeled confidence of c_tau is the current batch's (every replica's), not a running
average: the authors' code computes it so (confidence_ratio above) and so does USB
(AdaMatchThresholdingHook); the only running averages AdaMatch keeps are the two class
distributions, the algorithm's state. With --teacher=ema the labeled and unlabeled predictions
(threshold, alignment and pseudo-labels) come from the EMA model.

Defaults, each from the authors' semi_supervised/adamatch.py: tau = 0.9 (--confidence),
lambda_u = 1 (--wu), the warm-up over half of training (ScheduleCosPhases above), momentum 0.999
(p_labeled) and a window of 128 batches (p_unlabeled); uratio 3 and the optimiser's in
runs/algorithms/adamatch.flags.

Deliberate differences: no random logit interpolation, which mixes the logits of a labeled-only
batch-norm pass into the joint pass's (the authors' logit_sx += (logit_bn_x - logit_sx) *
uniform) to bridge two domains' batch statistics: here labeled and unlabeled images come from
one distribution, and it would cost a second labeled pass (the authors' semi-supervised script
keeps it, USB's adamatch drops it). The labeled loss is on the weakly augmented labeled view
only, as USB's; the authors average a weak and a strong labeled view's. USB
(config/classic_cv/adamatch, e.g. adamatch_cifar10_40_0.yaml) differs too: tau = 0.95 (p_cutoff),
p~_U a moving average from the first batch's mean (DistAlignEMAHook; here
--prediction_window=0: a moving average from 1/C), and no warm-up (--ramp_up=none).
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
        'labeled batch\'s mean confidence (the authors\' --confidence 0.9; USB\'s 0.95).')
    state_momentum: float = hparam(0.999, 'Momentum of the running average p~_L of the labeled '
                                   'predictions (the authors\'), and of p~_U when '
                                   '--prediction_window=0.')
    prediction_window: int = hparam(128, 'p~_U is the mean unlabeled prediction over the last this '
                                    'many batches (the authors\' 128); 0: a moving average with '
                                    '--state_momentum instead (USB\'s).')
    ramp_up: str = hparam('cosine', 'Warm-up shape of lambda_u (cosine: the paper\'s mu(t), the '
                          'authors\' ScheduleCosPhases, over --warmup_fraction=0.5).')
    teacher: str = teacher_field()

    def state(self, num_classes, pool_size):
        window = (self.prediction_window,) if self.prediction_window else ()
        return {'p_labeled': State((num_classes,), 1. / num_classes),
                'p_unlabeled': State(window + (num_classes,), 1. / num_classes)}

    def __call__(self, student, teacher, batch):
        weak, strong = batch.unlabeled
        labeled_logits, weak_logits, strong_logits = concat_forward(
            student, batch.labeled_x, weak, strong)
        # l_s: the labeled cross-entropy (the authors average a weak and a strong labeled view's)
        xe = losses.cross_entropy(batch.labels, labeled_logits)
        labeled_probs = tf.nn.softmax(target_logits(self, teacher, batch.labeled_x,
                                                    labeled_logits))
        probs = tf.nn.softmax(target_logits(self, teacher, weak, weak_logits))
        m, old = self.state_momentum, batch.state
        mean_probs = replica_mean(tf.reduce_mean(probs, 0))
        # Distribution alignment: p~_U over the last 128 batches (the authors' p_unlabeled,
        # objax MovingAverage) or, with --prediction_window=0, a moving average (USB's p_model);
        # p~_L a moving average of the labeled predictions (the authors' p_labeled). Both take
        # this batch before aligning it, as the authors' do.
        if self.prediction_window:   # the window of batch means, oldest first
            p_unlabeled = tf.concat([old['p_unlabeled'][1:], mean_probs[None]], 0)
            unlabeled_distribution = tf.reduce_mean(p_unlabeled, 0)
        else:
            p_unlabeled = unlabeled_distribution = losses.moving_average(
                old['p_unlabeled'], mean_probs, m)
        state = {'p_labeled': losses.moving_average(
                     old['p_labeled'], replica_mean(tf.reduce_mean(labeled_probs, 0)), m),
                 'p_unlabeled': p_unlabeled}
        # p * (1e-6 + p~_L) / (1e-6 + p~_U), renormalised (the authors' pseudo_labels)
        aligned = losses.align_distribution(probs, state['p_labeled'], unlabeled_distribution)
        # Relative confidence threshold: c_tau = tau * mean_b max_c p(c | labeled b), this
        # batch's (the authors' confidence_ratio); replica_mean: the global batch's mean
        threshold = replica_mean(losses.relative_threshold(labeled_probs,
                                                           self.confidence_threshold))
        mask = losses.confidence_mask(aligned, threshold)   # max aligned p >= c_tau
        # l_u: hard pseudo-labels argmax of the aligned p train the strong view, averaged over
        # every unlabeled image (the authors' xeu = (xeu * pseudo_mask).mean())
        hard = tf.one_hot(tf.argmax(aligned, -1), tf.shape(aligned)[-1])
        pseudo = losses.soft_cross_entropy(hard, strong_logits, mask)
        # l_s + lambda_u mu(t) l_u: batch.ramp is mu(t), the cosine warm-up (--ramp_up=cosine)
        return Losses(xe, batch.ramp * self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask),
                       'threshold': threshold}, state)
