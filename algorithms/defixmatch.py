"""DeFixMatch (Schmutz, Humbert and Mattei, ICLR 2023, arXiv:2203.07512): FixMatch debiased by its
own unlabeled loss on the labeled images.

FixMatch's pseudo-label loss L_u (algorithms/fixmatch.py: the weak view's confident hard
pseudo-label trains the strong view) is an estimate that can pull the model away from what the
labels say. DeFixMatch subtracts the same loss computed on the labeled images, whose expectation
it shares, so the unlabeled term is an unbiased correction (Sec. 3, the debiased risk):
loss = 1/2 (H(y, p(weak x_l)) + H(y, p(strong x_l))) + lambda (L_u(unlabeled) - L_u(labeled)),
where L_u(labeled) pseudo-labels the labeled images' weak view and trains their strong view
(`labeled_views = ('strong',)`: each labeled image's strong view, drawn with its own seed; the
weak one, labeled_x, is the batch every algorithm sees). Everything goes through one joint pass.

Defaults: USB's config/classic_cv/defixmatch/defixmatch_cifar10_40_0.yaml and
algorithms/defixmatch (written with the paper's authors): tau = 0.95, hard pseudo-labels,
lambda = 0.5 (ulb_loss_ratio), uratio 7 (runs/algorithms/defixmatch.flags). USB's own datasets
produce no strong view of labeled images, so its DeFixMatch does not run as shipped; here the
pipeline makes one. With --teacher=ema both pseudo-labels come from the EMA model.
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (Algorithm, Losses, concat_forward, hparam, register,
                                     target_logits, teacher_field)


@register('defixmatch')
class DeFixMatch(Algorithm):
    views = ('weak', 'strong')
    labeled_views = ('strong',)
    ramp_up = 'none'
    consistency_weight: float = hparam(0.5, 'lambda: weight of the debiased unlabeled loss '
                                       '(USB\'s ulb_loss_ratio, not ramped).')
    confidence_threshold: float = hparam(0.95, 'tau: a weak view\'s prediction becomes a '
                                         'pseudo-label when its confidence reaches it.')
    teacher: str = teacher_field()

    def __call__(self, student, teacher, batch):
        weak, strong = batch.unlabeled
        (labeled_strong,) = batch.labeled_views
        labeled_logits, labeled_strong_logits, weak_logits, strong_logits = concat_forward(
            student, batch.labeled_x, labeled_strong, weak, strong)
        xe = (losses.cross_entropy(batch.labels, labeled_logits)
              + losses.cross_entropy(batch.labels, labeled_strong_logits)) / 2.
        pseudo, mask = losses.confident_pseudo_label_loss(
            target_logits(self, teacher, weak, weak_logits), strong_logits,
            self.confidence_threshold)
        anti, labeled_mask = losses.confident_pseudo_label_loss(
            target_logits(self, teacher, batch.labeled_x, labeled_logits), labeled_strong_logits,
            self.confidence_threshold)
        return Losses(xe, self.consistency_weight * (pseudo - anti),
                      {'pseudo_label': pseudo, 'labeled_pseudo_label': anti,
                       'mask': tf.reduce_mean(mask),
                       'labeled_mask': tf.reduce_mean(labeled_mask)})
