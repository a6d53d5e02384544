"""Unsupervised Data Augmentation (Xie et al., NeurIPS 2020, arXiv:1904.12848).

The student's prediction on a weakly augmented unlabeled image, sharpened with temperature T
(softmax temperature control, Sec. 3.3), is the target of its prediction on a strongly augmented
(RandAugment) view, by cross-entropy, only where the weak prediction's largest probability reaches
`confidence_threshold` (Eq. 3: 1/|B| sum 1(max p(y|x; theta~) > beta) CE(p_sharp || p(y|x^))).
Training Signal Annealing (`--tsa`, Sec. 3.3) optionally drops labeled examples already predicted
above eta_t = alpha_t (1 - 1/K) + 1/K, t the fraction of training done. Defaults: the UDA
paper's T = 0.4 and confidence 0.8, unlabeled weight 1 without ramp-up, no TSA (the anchors,
google-research/fixmatch uda.py, use T = 1 and 0.95: runs/algorithms/uda.flags). One forward
pass over labeled, weak and strong images (shared batch norm).
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (Algorithm, ConfigError, Losses, concat_forward, hparam,
                                     register, target_logits, teacher_field)

TSA_SCHEDULES = ('none', 'linear', 'log', 'exp')


@register('uda')
class UDA(Algorithm):
    views = ('weak', 'strong')
    ramp_up = 'none'
    consistency_weight: float = hparam(1., 'Weight of the unlabeled consistency (not ramped).')
    temperature: float = hparam(0.4, 'Softmax temperature T sharpening the weak-view targets.')
    confidence_threshold: float = hparam(
        0.8, 'Confidence beta a weak-view prediction needs for its image to count.')
    tsa: str = hparam('none', 'Training Signal Annealing schedule of the labeled loss: '
                      + ', '.join(TSA_SCHEDULES) + '.')
    teacher: str = teacher_field()   # the paper: the student's own weak-view prediction

    def __post_init__(self):
        super().__post_init__()
        if self.tsa not in TSA_SCHEDULES:
            raise ConfigError(f'--tsa={self.tsa} is unknown; valid: {", ".join(TSA_SCHEDULES)}')

    def __call__(self, student, teacher, batch):
        labeled_logits, weak_logits, strong_logits = concat_forward(
            student, batch.labeled_x, *batch.unlabeled)
        probs = tf.nn.softmax(target_logits(self, teacher, batch.unlabeled[0], weak_logits))
        mask = losses.confidence_mask(probs, self.confidence_threshold)
        consistency = losses.soft_cross_entropy(losses.sharpen(probs, self.temperature),
                                                strong_logits, mask)
        eta = losses.tsa_threshold(self.tsa, batch.progress, labeled_logits.shape[-1])
        xe = losses.tsa_cross_entropy(batch.labels, labeled_logits, eta)
        return Losses(xe, self.consistency_weight * consistency,
                      {'consistency': consistency, 'mask': tf.reduce_mean(mask),
                       'tsa_threshold': eta})
