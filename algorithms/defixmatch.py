"""DeFixMatch (Schmutz, Humbert and Mattei, "Don't fear the unlabelled: safe semi-supervised
learning via debiasing", ICLR 2023, arXiv:2203.07512 "... via simple debiasing"; the authors'
code HugoSchmutz/DeFixmatch): FixMatch debiased by its own unlabeled loss on the labeled images.

Equation numbers are those of the paper's text in the authors' repository
(Article&SupplementayMaterials.pdf, its NeurIPS 2022 submission; the ICLR version's numbering
could not be checked). FixMatch's pseudo-label loss H (Eq. 12, App. B.2: H(theta; x) =
1[max_y p(y | x1) > tau] L(theta; x2, argmax_y p(y | x1)), x1 weak, x2 strong;
algorithms/fixmatch.py) makes the semi-supervised risk a biased estimate. DeSSL (Sec. 3) removes
the bias with the same term computed on the labeled images, whose expectation it shares under
MCAR, so the estimate is unbiased for any lambda (Eq. 5):
  R_DeSSL = 1/n_l sum_l L(x_i, y_i) + lambda/n_u sum_u H(x_i) - lambda/n_l sum_l H(x_i),
where L is the supervised loss averaged over a weak and a strong view, L = 1/2 (H(y, p(weak
x_l)) + H(y, p(strong x_l))) (Eq. 52, App. L.2), and H on a labeled image pseudo-labels its weak
view and trains its strong view (`labeled_views = ('strong',)`: each labeled image's strong
view, drawn with its own seed; the weak one, labeled_x, is the batch every algorithm sees).
Everything goes through one joint pass, as the authors' train loop does. The mask is max p >=
tau, as the authors' code (consistency_loss: max_probs.ge(p_cutoff)) and FixMatch's, where
Eq. 12 writes > tau.

Defaults: lambda = 1/2 (App. L.2 chooses it for Eq. 52's two-view supervised term, against
FixMatch's lambda = 1 with a one-view one; the authors' README runs --ulb_loss_ratio 0.5; USB's
config/classic_cv/defixmatch, e.g. defixmatch_cifar10_40_0.yaml, ulb_loss_ratio 0.5), tau = 0.95
and hard pseudo-labels (the authors' train.py --p_cutoff, --hard_label; USB's), uratio 7
(runs/algorithms/defixmatch.flags). USB's algorithms/defixmatch was contributed by the paper's
first author (USB #129). USB's own datasets produce no strong view of labeled images, so its
DeFixMatch does not run as shipped; here the pipeline makes one. With --teacher=ema both
pseudo-labels come from the EMA model.
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
                                       '(the paper\'s 1/2, App. L.2; USB\'s ulb_loss_ratio; not '
                                       'ramped).')
    confidence_threshold: float = hparam(0.95, 'tau: a weak view\'s prediction becomes a '
                                         'pseudo-label when its confidence reaches it.')
    teacher: str = teacher_field()

    def __call__(self, student, teacher, batch):
        weak, strong = batch.unlabeled
        (labeled_strong,) = batch.labeled_views
        labeled_logits, labeled_strong_logits, weak_logits, strong_logits = concat_forward(
            student, batch.labeled_x, labeled_strong, weak, strong)
        # Eq. 52: L = 1/2 (H(y, p(weak x_l)) + H(y, p(strong x_l)))
        xe = (losses.cross_entropy(batch.labels, labeled_logits)
              + losses.cross_entropy(batch.labels, labeled_strong_logits)) / 2.
        # Eq. 12 on the unlabeled images: 1/n_u sum_u H(x_i)
        pseudo, mask = losses.confident_pseudo_label_loss(
            target_logits(self, teacher, weak, weak_logits), strong_logits,
            self.confidence_threshold)
        # Eq. 12 on the labeled images (their labels unused): 1/n_l sum_l H(x_i)
        anti, labeled_mask = losses.confident_pseudo_label_loss(
            target_logits(self, teacher, batch.labeled_x, labeled_logits), labeled_strong_logits,
            self.confidence_threshold)
        # Eq. 5: R_DeSSL = L + lambda (H_unlabeled - H_labeled)
        return Losses(xe, self.consistency_weight * (pseudo - anti),
                      {'pseudo_label': pseudo, 'labeled_pseudo_label': anti,
                       'mask': tf.reduce_mean(mask),
                       'labeled_mask': tf.reduce_mean(labeled_mask)})
