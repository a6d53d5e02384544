"""Interpolation Consistency Training (Verma et al., IJCAI 2019, arXiv:1903.03825).

The student's prediction at a mixup of two unlabeled images should be the same mixup of the EMA
teacher's predictions at the two images (Eq. 2: f_theta(Mix_lambda(u_j, u_k)) ~
Mix_lambda(f_theta'(u_j), f_theta'(u_k)), lambda ~ Beta(alpha, alpha)), with a squared-error cost
on class probabilities averaged over classes (Eq. 3), ramped up to `consistency_weight` along
the paper's sigmoid (the anchors ramp linearly: `--ramp_up`). Defaults: the paper's CIFAR-10
settings, alpha = 1 and a maximum consistency coefficient of 100 (the anchors,
google-research/fixmatch ict.py, use 0.5 and 50). Partners are a random permutation of the
batch (the anchors pair the shuffled batch with its reverse, y[::-1]: the same distribution of
pairs), and lambda' = max(lambda, 1 - lambda) as in the anchors (the loss is symmetric in the
pair, so this only orders it).
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import Algorithm, Losses, forward, hparam, register


@register('ict')
class ICT(Algorithm):
    views = ('weak',)
    consistency_weight: float = hparam(
        100., 'Weight of the interpolation consistency cost at the end of the ramp-up.')
    mixup_alpha: float = hparam(1., 'alpha of the Beta(alpha, alpha) distribution of mixup coefficients.')
    ramp_up: str = hparam('sigmoid', 'Ramp-up shape (sigmoid: the paper\'s exp(-5(1-t)^2)).')
    bn_passes: str = hparam('joint', 'Labeled and mixed images in one pass or separate ones.')

    def __call__(self, student, teacher, batch):
        (x,) = batch.unlabeled
        # The teacher runs like Mean Teacher's (batch statistics), as in the ICT and anchors' code.
        target = tf.stop_gradient(tf.nn.softmax(teacher(x, training=True)))
        mixed_x, mixed_target = losses.mixup(batch.rng, self.mixup_alpha, x, target)
        xe, (logits,) = forward(student, batch, mixed_x, passes=self.bn_passes)
        consistency = losses.softmax_mse(logits, mixed_target)
        return Losses(xe, batch.ramp * self.consistency_weight * consistency,
                      {'consistency': consistency})
