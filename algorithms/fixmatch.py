"""FixMatch (Sohn et al., NeurIPS 2020, arXiv:2001.07685).

The student's prediction on a weakly augmented unlabeled image becomes a hard pseudo-label when
its largest class probability reaches `confidence_threshold` (tau = 0.95); the student is then
trained with cross-entropy on a strongly augmented view of the same image (RandAugment + Cutout)
(Eq. 4: 1/(mu B) sum 1(max q_b >= tau) H(q^_b, p_m(y | A(u_b)))). Loss = l_s + lambda_u l_u
(Eq. 5), lambda_u = `consistency_weight` = 1, without ramp-up (Sec. 3.2). Labeled, weak and strong
images go through one forward pass so batch norm sees them together (the anchors' choice). The
paper's unlabeled ratio is mu = 7: `--uratio=7` (this toolkit's shared default is 4).
`--teacher=ema`: the pseudo-labels come from the EMA model (base.target_logits).
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (Algorithm, Losses, forward, hparam, register, target_logits,
                                     teacher_field)


@register('fixmatch')
class FixMatch(Algorithm):
    views = ('weak', 'strong')
    ramp_up = 'none'
    consistency_weight: float = hparam(
        1., 'Weight of the unlabeled loss (lambda_u; at the end of the ramp-up for the '
        'algorithms that ramp it up, constant for fixmatch and uda).')
    confidence_threshold: float = hparam(
        0.95, 'Largest class probability an unlabeled prediction needs to count (as a '
        'pseudo-label, or as a consistency target for uda).')
    teacher: str = teacher_field()   # the paper's pseudo-labels are the student's own

    def __call__(self, student, teacher, batch):
        xe, (weak_logits, strong_logits) = forward(student, batch, *batch.unlabeled)
        weak, _ = batch.unlabeled
        pseudo, mask = losses.confident_pseudo_label_loss(
            target_logits(self, teacher, weak, weak_logits), strong_logits,
            self.confidence_threshold)
        return Losses(xe, self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask)})
