"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017, arXiv:1703.01780).

The teacher is the EMA of the student's weights (Eq. 1, the shared `ssl_ema.ema.EMA`). Its class
probabilities on one augmented view are the target of the student's on another view, with a
squared-error consistency cost J = E ||f(x, theta', eta') - f(x, theta, eta)||^2 (Sec. 2),
weighted by `consistency_weight` and ramped up over the run's warm-up.
"""
import tensorflow as tf

from ssl_ema import losses
from ssl_ema.algorithms.base import Algorithm, Losses, forward, hparam, register


@register('mean_teacher')
class MeanTeacher(Algorithm):
    views = ('weak', 'weak')   # student view, teacher view
    consistency_weight: float = hparam(
        50., 'Weight of the unlabeled consistency cost at the end of the ramp-up.')

    def __call__(self, student, teacher, batch):
        student_view, teacher_view = batch.unlabeled
        xe, (logits,) = forward(student, batch, student_view)
        target = tf.stop_gradient(tf.nn.softmax(teacher(teacher_view, training=False)))
        consistency = losses.softmax_mse(logits, target)
        return Losses(xe, batch.ramp * self.consistency_weight * consistency,
                      {'consistency': consistency})
