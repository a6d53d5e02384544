"""Pseudo-Label (Lee, ICML 2013 Workshop on Challenges in Representation Learning).

The class the student predicts for an unlabeled image is taken as its label (Eq. 1, the argmax)
and trained with cross-entropy (Eq. 15's second term), weighted by `consistency_weight` (the
paper's alpha(t), Eq. 16, here the shared linear ramp-up). As in the anchors
(google-research/fixmatch pseudo_label.py and the realistic-evaluation code), only confident
predictions count (here max p >= `confidence_threshold`, 0.95; the anchors test max p > 0.95,
which differs only on a tie), the mean is over the whole unlabeled batch, and the weight is 1.
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (Algorithm, Losses, forward, hparam, register, target_logits,
                                     teacher_field)


@register('pseudo_label')
class PseudoLabel(Algorithm):
    views = ('weak',)
    consistency_weight: float = hparam(1., 'Weight of the pseudo-label loss (ramped up).')
    confidence_threshold: float = hparam(
        0.95, 'Largest class probability a prediction needs to become a (pseudo-)label.')
    ramp_up: str = hparam('linear', 'Ramp-up shape of the pseudo-label weight (the anchors\').')
    bn_passes: str = hparam('joint', 'Labeled and unlabeled images in one pass or separate ones.')
    teacher: str = teacher_field()   # Lee 2013: the network's own prediction

    def __call__(self, student, teacher, batch):
        xe, (logits,) = forward(student, batch, *batch.unlabeled, passes=self.bn_passes)
        # The same logits give the label (gradient stopped) and are trained toward it, unless
        # --teacher=ema takes the label from the EMA model.
        target = target_logits(self, teacher, batch.unlabeled[0], logits)
        pseudo, mask = losses.confident_pseudo_label_loss(target, logits, self.confidence_threshold)
        return Losses(xe, batch.ramp * self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask)})
