"""DebiasPL (Wang et al., CVPR 2022, arXiv 2201.01490, "Debiased Learning from Naturally
Imbalanced Pseudo-Labels"), plugged on a base algorithm (--base_algorithm, FixMatch: USB's
classic_cv_imb fixmatch_debiaspl).

Pseudo-labels pile onto the classes the model already favours, even when the data are balanced.
DebiasPL keeps a moving average p^ [K] of the weak view's predicted class distribution, one value
per class (p^ <- m p^ + (1 - m) mean_b softmax(z_b), their update_qhat), and removes it by
counterfactual reasoning: the pseudo-label is arg max softmax(z - tau log p^) of the weak view's
logits z (the paper's counterfactual debiasing; their causal_inference), kept where that
debiased probability reaches the threshold. The strong view then trains by the adaptive marginal
loss, cross-entropy of the logits shifted by + tau log p^: a class the model over-predicts must
win by a wider margin. As the authors' main_DebiasPL.py: the pseudo-labels use p^ before the
batch's update, the marginal loss p^ after it. (No copy of the paper's text was at hand: the
formulas are cited by the paper's terms and the authors' function names, not by equation
number.)

USB's debiaspl.py averages softmax(z) over every element into a scalar (probs.mean()), so its
p^ is the same for every class and log p^ shifts all logits equally: nothing is debiased, and its
numbers equal FixMatch's; it also mixes the EMA's momentum into p^'s update and fixes the loss's
tau at 0.4. Ours keeps the per-class vector (replica-averaged), one tau and one momentum.
Defaults: tau 0.4 and momentum 0.999 (USB's debiaspl_tau, debiaspl_ema_p; the authors' ImageNet
scripts: --tau 0.4 --qhat_m 0.999), lambda_u 1 and threshold 0.95 (USB's
fixmatch_debiaspl_cifar10_lb1500_100_ulb3000_100_0.yaml: ulb_loss_ratio, p_cutoff).
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (ConfigError, Losses, State, WeakStrong, check_base, hparam,
                                     register, replica_mean, teacher_field)

BASES = ('fixmatch',)   # the base algorithms whose pseudo-labels DebiasPL debiases


def debiased_pseudo_labels(weak_logits, prior, strength, threshold):
    """(hard pseudo-labels [N], mask [N]): arg max and confidence of softmax(z - tau log p^), the
    confident ones (>= threshold) kept."""
    probs = tf.nn.softmax(weak_logits - strength * tf.math.log(prior))
    return (tf.argmax(probs, -1, output_type=tf.int32),
            losses.confidence_mask(probs, threshold))


def adaptive_marginal_loss(strong_logits, labels, prior, strength, mask):
    """Cross-entropy of hard `labels` on the logits shifted by + tau log p^ (DebiasPL's adaptive
    marginal loss), masked, averaged over the whole batch."""
    shifted = strong_logits + strength * tf.math.log(prior)
    return losses.soft_cross_entropy(tf.one_hot(labels, tf.shape(prior)[-1]), shifted, mask)


@register('debiaspl')
class DebiasPL(WeakStrong):
    base_algorithm: str = hparam('fixmatch', 'Algorithm whose pseudo-labels DebiasPL debiases '
                                 '(USB\'s classic_cv_imb: fixmatch).')
    consistency_weight: float = hparam(1., 'Weight lambda_u of the base\'s unlabeled loss.')
    confidence_threshold: float = hparam(0.95, 'Threshold on the debiased pseudo-label\'s '
                                         'probability.')
    teacher: str = teacher_field()
    debias_strength: float = hparam(0.4, 'tau: strength of the debiasing, z - tau log p^ for the '
                                    'pseudo-labels and z + tau log p^ in the adaptive marginal '
                                    'loss (USB debiaspl_tau 0.4).')
    state_momentum: float = hparam(0.999, 'Momentum m of the moving average p^ of the predicted '
                                   'class distribution (USB debiaspl_ema_p 0.999).')

    def __post_init__(self):
        super().__post_init__()
        check_base(self, BASES, 'debiases')
        if self.debias_strength < 0:
            raise ConfigError('--debias_strength must be >= 0')

    def state(self, num_classes, pool_size):
        return {'p_hat': State((num_classes,), 1. / num_classes)}

    def __call__(self, student, teacher, batch):
        labeled, weak_logits, strong_logits = (
            tf.cast(t, tf.float32) for t in self.weak_strong_logits(student, teacher, batch))
        xe = losses.cross_entropy(batch.labels, labeled)
        prior = batch.state['p_hat']
        classes, mask = debiased_pseudo_labels(weak_logits, prior, self.debias_strength,
                                               self.confidence_threshold)
        prior = losses.moving_average(
            prior, replica_mean(tf.reduce_mean(tf.nn.softmax(weak_logits), 0)),
            self.state_momentum)
        pseudo = adaptive_marginal_loss(strong_logits, classes, prior, self.debias_strength, mask)
        changed = tf.cast(classes != tf.argmax(weak_logits, -1, output_type=tf.int32), tf.float32)
        return Losses(xe, self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask),
                       'debiased_changed': tf.reduce_mean(changed),
                       'p_hat_max': tf.reduce_max(prior)}, {'p_hat': prior})
