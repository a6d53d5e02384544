"""FixMatch (Sohn et al., NeurIPS 2020, arXiv:2001.07685).

The student's prediction on a weakly augmented unlabeled image becomes a hard pseudo-label when
its largest class probability reaches `confidence_threshold` (tau = 0.95); the student is then
trained with cross-entropy on a strongly augmented view of the same image (RandAugment + Cutout)
(Eq. 4: 1/(mu B) sum 1(max q_b >= tau) H(q^_b, p_m(y | A(u_b)))). Loss = l_s + lambda_u l_u
(Eq. 5), lambda_u = `consistency_weight` = 1, without ramp-up (Sec. 3.2). Labeled, weak and strong
images go through one forward pass so batch norm sees them together (the anchors' choice). The
paper's unlabeled ratio is mu = 7: `--uratio=7` (this toolkit's shared default is 4).
`--teacher=ema`: the pseudo-labels come from the EMA model (base.target_logits). The student's own
weak-view logits are then unused but for batch norm's statistics; `--nostudent_weak_pass` drops
that view from the student's pass (labeled and strong images only): 96 instead of 160 images
forward and backward a step at --uratio=2, about a third less compute (runs/RECIPE.md measures
what it does to accuracy).
"""
import tensorflow as tf

from ssl_ema.base.errors import ConfigError
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
    student_weak_pass: bool = hparam(
        True, 'With --teacher=ema, whether the student\'s training pass includes the weak view '
        '(the paper\'s one joint pass; its logits then serve only batch norm\'s statistics).')

    def __post_init__(self):
        super().__post_init__()
        if not self.student_weak_pass and self.teacher != 'ema':
            raise ConfigError('--nostudent_weak_pass needs --teacher=ema: with the student as '
                              'the teacher its weak-view logits are the pseudo-labels')

    def __call__(self, student, teacher, batch):
        weak, strong = batch.unlabeled
        if self.teacher == 'ema' and not self.student_weak_pass:
            (xe, (strong_logits,)), weak_logits = forward(student, batch, strong), None
        else:
            xe, (weak_logits, strong_logits) = forward(student, batch, weak, strong)
        pseudo, mask = losses.confident_pseudo_label_loss(
            target_logits(self, teacher, weak, weak_logits), strong_logits,
            self.confidence_threshold)
        return Losses(xe, self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask)})
