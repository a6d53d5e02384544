"""SequenceMatch (Nguyen, WACV 2024, arXiv:2310.15787): FlexMatch with a medium view between the
weak and the strong one, and a chain of divergences along weak -> medium -> strong.

A medium augmentation (data/augment.medium: RandAugment with one op, then Cutout) narrows the
gap the strong view's prediction must bridge. With FlexMatch's curriculum mask M on the weak
view (algorithms/flexmatch.py: class thresholds from the per-image record, hence its state and
`needs_indices`), the unlabeled loss is (Sec. 3)
  L_u = H(hard pseudo-label of weak, strong) + KL(p~_w || p_m) + KL(p~_m || p_s) + KL(p~_w || p_s),
every term averaged over the batch with M, where p~ = softmax(logits / T) is a view's prediction
sharpened by T = 0.5 (gradient stopped) and p_m, p_s the medium and strong views' predictions.
Loss = L_s + lambda_u L_u, lambda_u = 1.

Defaults: USB's config/classic_cv/sequencematch/sequencematch_cifar10_40_0.yaml and
algorithms/sequencematch: tau = 0.95, T = 0.5, hard pseudo-labels, threshold warm-up, uratio 7
(runs/algorithms/sequencematch.flags). Two faults of USB's code not copied: it sharpens with
softmax(p / T) of probabilities p, which flattens them instead of sharpening (here softmax of the
logits over T, i.e. p^(1/T) normalised), and it references an undefined feat_dict at its HEAD
(USB issue #243). With --teacher=ema the weak and medium targets (and the curriculum) come from
the EMA model.
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import Losses, forward, hparam, register, target_logits
from ssl_ema.algorithms.flexmatch import FlexMatch


@register('sequencematch')
class SequenceMatch(FlexMatch):
    views = ('weak', 'medium', 'strong')
    temperature: float = hparam(0.5, 'T: the weak and medium targets of the divergences are '
                                'softmax(logits / T) (USB\'s T).')

    def __call__(self, student, teacher, batch):
        weak, medium, _ = batch.unlabeled
        xe, (weak_logits, medium_logits, strong_logits) = forward(student, batch, *batch.unlabeled)
        weak_target = target_logits(self, teacher, weak, weak_logits)
        medium_target = target_logits(self, teacher, medium, medium_logits)
        mask, hard, threshold, state = self.curriculum(tf.nn.softmax(weak_target), batch)
        pseudo = losses.soft_cross_entropy(hard, strong_logits, mask)
        t = self.temperature
        divergences = {'weak_medium': losses.kl_divergence(weak_target / t, medium_logits, mask),
                       'medium_strong': losses.kl_divergence(medium_target / t, strong_logits,
                                                             mask),
                       'weak_strong': losses.kl_divergence(weak_target / t, strong_logits, mask)}
        unlabeled = pseudo + tf.add_n(list(divergences.values()))
        return Losses(xe, self.consistency_weight * unlabeled,
                      {'pseudo_label': pseudo, **divergences,
                       'mask': tf.reduce_mean(mask),
                       'mean_threshold': tf.reduce_mean(threshold)}, state)
