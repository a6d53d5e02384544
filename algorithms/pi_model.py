"""Pi-model (Laine & Aila, ICLR 2017, arXiv:1610.02242; Sajjadi et al. 2016).

Two stochastic passes of the *student* (two random augmentations, and dropout where the backbone
has it) on each unlabeled image; the squared difference of their class probabilities is the
consistency cost (Sec. 2.1, Algorithm 1: w(t) ||z_i - z~_i||^2), here averaged over classes, with
w(t) ramped up along the paper's Gaussian curve exp(-5 (1 - t)^2) (Sec. 3.1; the anchors,
google-research/fixmatch pi_model.py, ramp linearly: `--ramp_up`). As in the anchors, one pass is
the target with its gradient stopped, and `consistency_weight` is 10.
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (Algorithm, Losses, forward, hparam, register, target_logits,
                                     teacher_field)


@register('pi_model')
class PiModel(Algorithm):
    views = ('weak', 'weak')   # target pass, student pass
    consistency_weight: float = hparam(10., 'Weight of the Pi-model consistency (ramped up).')
    ramp_up: str = hparam('sigmoid', 'Ramp-up shape (sigmoid: the paper\'s exp(-5(1-t)^2)).')
    bn_passes: str = hparam('joint', 'Labeled and unlabeled views in one pass or separate ones.')
    teacher: str = teacher_field()   # the paper: a second pass of the student itself

    def __call__(self, student, teacher, batch):
        xe, (first_logits, logits) = forward(student, batch, *batch.unlabeled,
                                             passes=self.bn_passes)
        target = tf.nn.softmax(target_logits(self, teacher, batch.unlabeled[0], first_logits))
        consistency = losses.softmax_mse(logits, target)
        return Losses(xe, batch.ramp * self.consistency_weight * consistency,
                      {'consistency': consistency})
