"""Virtual Adversarial Training (Miyato et al., TPAMI 2018, arXiv:1704.03976), with optional
entropy minimisation (the anchors' VAT+EntMin).

Consistency: by default the paper's KL(target || student(x + r_adv)) (Eqs. 4-5); the anchors
(google-research/fixmatch vat.py) compute KL(student(x + r_adv) || target): `--vat_kl`.
r_adv is the direction in which the student's own prediction is least smooth, found by one
power iteration on KL(p(x) || p(x + r)) around its minimum at r = 0 (Eqs. 11-13,
`losses.vat_perturbation`); that is only the curvature's eigenvector if both sides are the same
function, so the clean unlabeled logits come from their own pass, with the unlabeled batch's
statistics, as in the anchors. The target of the consistency is then, by default, the EMA
teacher's prediction on the clean image (this toolkit's design: the EMA produces the consistency
targets); `--vat_target=student` uses the paper's and the anchors' stop-gradient student
prediction. As in the anchors, only the labeled pass moves the batch-norm moving statistics:
the clean and perturbed unlabeled passes leave them alone (`call_keeping_statistics`).

`--vat_eps` and `--vat_xi` are L2 norms in the anchors' pixel units (images scaled to [-1, 1]),
whatever `--input_norm` feeds the model: the anchors' eps = 6 is the same perturbation here.
eps is given for a 32x32x3 image (3,072 values, the anchors' every dataset); other image sizes
scale it by sqrt(values / 3072), keeping the per-value strength the same (on 8x8 digits, 6
becomes 0.87).

Precision: xi = 1e-3 over 3,072 values is ~2e-5 per value, below what bfloat16 (--precision=
mixed_*) or TF32 (float32 convolutions on Ampere and newer GPUs) resolve: x + r would round to x
and the power iteration return rounding noise. Below float32 each image's step is raised to what
the model's compute precision resolves, and the difference is central (`losses.vat_perturbation`;
docs/gpu.md). The metric `xi_raised` is the share of images whose step was raised (0 in float32).
"""
import math

import tensorflow as tf

from ssl_ema.nn import draws, losses
from ssl_ema.algorithms.base import Algorithm, ConfigError, Losses, hparam, register
from ssl_ema.nn.backbones import call_keeping_statistics


@register('vat')
class VAT(Algorithm):
    views = ('weak',)
    consistency_weight: float = hparam(0.3, 'Weight of the VAT consistency (ramped up).')
    vat_eps: float = hparam(6., 'L2 norm epsilon of the adversarial perturbation r_adv (Eq. 13) '
                            'in [-1, 1] pixel units for a 32x32x3 image (the anchors\' 6); scaled '
                            'by sqrt(values / 3072) for other sizes.')
    # The paper's xi = 1e-6 is below float32's resolution here: x + xi d rounds, and the power
    # iteration returns rounding noise (measured: the direction at 1e-6 has cosine ~0.1 with the
    # one that xi = 1e-4 ... 1e-2 all agree on, test_algorithms.py); 1e-3 is inside that range.
    vat_xi: float = hparam(1e-3, 'Finite-difference step xi of the power iteration (Eq. 12), '
                           'in [-1, 1] pixel units; the paper\'s and anchors\' 1e-6 drowns in '
                           'float32 rounding.')
    vat_kl: str = hparam('target_student', 'Direction of the consistency: target_student = '
                         'KL(target || student(x + r_adv)) (the paper, Eq. 4), student_target = '
                         'KL(student(x + r_adv) || target) (the anchors\' vat.py).')
    ramp_up: str = hparam('linear', 'Ramp-up shape of the VAT weight (linear: the anchors).')
    vat_target: str = hparam('ema', 'Target distribution: ema (the EMA teacher) or student '
                             '(stop-gradient student, as in the paper).')
    entmin_weight: float = hparam(0.06, 'Weight of entropy minimisation on unlabeled images '
                                  '(0 disables it; not ramped).')

    def __post_init__(self):
        super().__post_init__()
        if self.vat_target not in ('ema', 'student'):
            raise ConfigError(f'--vat_target={self.vat_target} is unknown; valid: ema, student')
        if self.vat_kl not in ('target_student', 'student_target'):
            raise ConfigError(f'--vat_kl={self.vat_kl} is unknown; valid: target_student, '
                              'student_target')

    def __call__(self, student, teacher, batch):
        (x,) = batch.unlabeled
        xe = losses.cross_entropy(batch.labels, student(batch.labeled_x, training=True))
        unlabeled = lambda v: call_keeping_statistics(student, v)  # noqa: E731
        logits = unlabeled(x)
        eps = self.vat_eps * math.sqrt(math.prod(x.shape[1:]) / 3072)
        # The random start of the power iteration from the generator's bits (nn/draws.py), so a
        # step under --jit_compile draws the direction the step without it draws.
        noise, resolution = draws.normal(batch.rng, tf.shape(x)), losses.compute_resolution(student)
        r_adv = losses.vat_perturbation(unlabeled, x, logits, noise, self.vat_xi, eps,
                                        batch.pixel_scale, resolution)
        # The share of images whose step xi the compute precision could not resolve (raised).
        step, unit = losses.vat_step(x, losses.l2_normalize(noise), self.vat_xi,
                                     batch.pixel_scale, resolution)
        target = tf.stop_gradient(teacher(x) if self.vat_target == 'ema' else logits)
        pair = (target, unlabeled(x + r_adv))
        consistency = losses.kl_divergence(*(pair if self.vat_kl == 'target_student'
                                             else pair[::-1]))
        entropy = losses.entropy(logits)
        return Losses(xe, batch.ramp * self.consistency_weight * consistency
                      + self.entmin_weight * entropy,
                      {'consistency': consistency, 'entropy': entropy,
                       'xi_raised': tf.reduce_mean(tf.cast(step > self.vat_xi * unit,
                                                           tf.float32))})
