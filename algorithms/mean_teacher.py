"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017, arXiv:1703.01780).

The teacher is the EMA of the student's weights (Eq. 1, the shared `ssl_ema.core.ema.EMA`), run with
noise like the student (batch statistics, dropout; the EMA itself is not changed by it). Its class
probabilities on one augmented view are the target of the student's on another view, with a
squared-error consistency cost J = E ||f(x, theta', eta') - f(x, theta, eta)||^2 (Sec. 2),
weighted by `consistency_weight` and ramped up over the run's warm-up along the paper's sigmoid
exp(-5 (1 - t)^2) (App. B; the anchors, google-research/fixmatch mean_teacher.py, ramp linearly:
`--ramp_up`). Both views also get Gaussian input noise of std `input_noise` in [-1, 1] pixel
units (the paper's eta, eta'; sigma = 0.15 in Appendix B; the anchors add none), drawn
independently for student and teacher.
"""
import tensorflow as tf

from ssl_ema.nn import draws, losses
from ssl_ema.algorithms.base import Algorithm, Losses, forward, hparam, register


@register('mean_teacher')
class MeanTeacher(Algorithm):
    views = ('weak', 'weak')   # student view, teacher view
    consistency_weight: float = hparam(
        50., 'Weight of the unlabeled consistency cost at the end of the ramp-up.')
    input_noise: float = hparam(0.15, 'Std of the Gaussian noise added to each unlabeled view, '
                                'student and teacher independently, in [-1, 1] pixel units '
                                '(the paper\'s 0.15; the anchors\' mean_teacher.py adds none).')
    ramp_up: str = hparam('sigmoid', 'Ramp-up shape (sigmoid: the paper\'s exp(-5(1-t)^2)).')
    bn_passes: str = hparam('joint', 'Labeled and student views in one pass or separate ones.')

    def __call__(self, student, teacher, batch):
        noise = self.input_noise * batch.pixel_scale
        student_view, teacher_view = (v + noise * draws.normal(batch.rng, tf.shape(v))
                                      for v in batch.unlabeled)
        xe, (logits,) = forward(student, batch, student_view, passes=self.bn_passes)
        target = tf.stop_gradient(tf.nn.softmax(teacher(teacher_view, training=True)))
        consistency = losses.softmax_mse(logits, target)
        return Losses(xe, batch.ramp * self.consistency_weight * consistency,
                      {'consistency': consistency})
