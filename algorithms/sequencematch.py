"""SequenceMatch (Khanh-Binh Nguyen, "SequenceMatch: Revisiting the design of weak-strong
augmentations for Semi-supervised learning", WACV 2024, arXiv:2310.15787; the author's code
beandkay/SequenceMatch, models/sequencematch, on TorchSSL; his port to USB,
algorithms/sequencematch, USB #201): FlexMatch with a medium view between the weak and the
strong one, and a chain of divergences along weak -> medium -> strong.

A medium augmentation (data/augment.medium: RandAugment with one op, then Cutout) narrows the
gap the strong view's prediction must bridge. With FlexMatch's curriculum mask M on the weak
view (algorithms/flexmatch.py: class thresholds from the per-image record, hence its state and
`needs_indices`), the unlabeled loss is (USB's train_step: unsup_loss + unsup_loss_mw +
unsup_loss_sm + unsup_loss_sw)
  L_u = H(hard pseudo-label of weak, strong) + KL(p~_w || p_m) + KL(p~_m || p_s) + KL(p~_w || p_s),
every term averaged over the batch with M, where p~ = softmax(logits / T) is a view's prediction
sharpened by T = 0.5 (gradient stopped) and p_m, p_s the medium and strong views' predictions.
Loss = L_s + lambda_u L_u, lambda_u = 1. The paper's equation numbers are not cited: its text
past the abstract could not be read when this was checked; the terms were checked against both
of the author's implementations.

Defaults: USB's config/classic_cv/sequencematch/sequencematch_cifar10_40_0.yaml and
algorithms/sequencematch (the author's config/sequencematch/sequencematch_cifar10_40_0.yaml
agrees): tau = 0.95 (p_cutoff), T = 0.5, hard pseudo-labels, threshold warm-up (thresh_warmup),
lambda_u = 1 (ulb_loss_ratio), uratio 7 (runs/algorithms/sequencematch.flags). Two faults of
USB's code not copied: it sharpens with softmax(p / T) of probabilities p, which flattens them
instead of sharpening (here softmax of the logits over T, i.e. p^(1/T) normalised, as the
author's own code does: uda_utils.consistency_loss 'kld_tf', softmax(logits_w / T)), and it
references an undefined feat_dict at its HEAD (USB issue #243); its docstring also cites
FlexMatch's arXiv id (2110.08263) for SequenceMatch. With --teacher=ema the weak and medium
targets (and the curriculum) come from the EMA model.

The author's original code masks differently, and ours follows his later USB port: there each
KL term is masked by a fixed threshold (max p >= tau, no curriculum) on its own target view's
confidence, the weak view's for KL(p~_w || p_m) and KL(p~_w || p_s) and the medium view's for
KL(p~_m || p_s); only the pseudo-label term carries FlexMatch's mask (use_flex: True).
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
        # M: FlexMatch's curriculum mask on the weak view, and its hard pseudo-labels
        mask, hard, threshold, state = self.curriculum(tf.nn.softmax(weak_target), batch)
        # H(hard pseudo-label of weak, strong), masked by M (USB's unsup_loss)
        pseudo = losses.soft_cross_entropy(hard, strong_logits, mask)
        t = self.temperature
        # KL(softmax(z / T) of the target view || the other view's p), each masked by M (USB's
        # unsup_loss_mw, _sm, _sw; sharpened from logits, as the author's 'kld_tf')
        divergences = {'weak_medium': losses.kl_divergence(weak_target / t, medium_logits, mask),
                       'medium_strong': losses.kl_divergence(medium_target / t, strong_logits,
                                                             mask),
                       'weak_strong': losses.kl_divergence(weak_target / t, strong_logits, mask)}
        unlabeled = pseudo + tf.add_n(list(divergences.values()))   # L_u
        return Losses(xe, self.consistency_weight * unlabeled,   # L_s + lambda_u L_u
                      {'pseudo_label': pseudo, **divergences,
                       'mask': tf.reduce_mean(mask),
                       'mean_threshold': tf.reduce_mean(threshold)}, state)
