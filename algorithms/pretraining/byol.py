"""BYOL, Bootstrap Your Own Latent (Grill et al., NeurIPS 2020, arXiv:2006.07733).

The online network (backbone + projector g, then the predictor q) predicts the target network's
projection of another view of the same image; the target network is the EMA of backbone +
projector (Sec. 3.1), with tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (Sec. 3.2). The loss
is the normalised regression ||q(z)/|q(z)| - z'/|z'|||^2 = 2 - 2 cos(q(z), z') (Eq. 2),
symmetrised over the two views (L + L~), the target's projection gradient-stopped. Projector and
predictor are Linear(4096) -> batch norm -> ReLU -> Linear(256) (Sec. 3.3). The views are the
paper's asymmetric pair (Table 6; ssl_ema/data/views.py byol_1, byol_2). Like the paper, the
backbone written at the end is the online one (Sec. 3.1: "we only keep the encoder f_theta").
The target runs on each batch's own batch-norm statistics, as the reference code's target
network (google-deepmind/deepmind-research byol/byol_experiment.py, is_training=True).
"""
import tensorflow as tf

from ssl_ema.algorithms.pretraining.base import Losses, Method, hparam, mlp, register


def regression_loss(prediction, target):
    """||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z) per row (Eq. 2)."""
    p = tf.math.l2_normalize(prediction, axis=-1)
    z = tf.math.l2_normalize(target, axis=-1)
    return tf.reduce_sum(tf.square(p - z), axis=-1)


def symmetrised_loss(predictions, projections):
    """L + L~ (Sec. 3.1): each view's prediction regresses the other view's target projection
    (gradient stopped); mean over the batch."""
    (p1, p2), (z1, z2) = predictions, projections
    return tf.reduce_mean(regression_loss(p1, tf.stop_gradient(z2))
                          + regression_loss(p2, tf.stop_gradient(z1)))


@register('byol')
class BYOL(Method):
    views = ('byol_1', 'byol_2')
    exported = 'raw'
    teacher_momentum: float = hparam(
        0.99, 'tau_base (Sec. 3.2): 0.99, the reference code\'s preset for 100-300 epoch runs '
        '(byol/configs/byol.py _EMA_PRESETS; the paper\'s 1000 epochs use 0.996): our runs are '
        'far shorter.')
    hidden_dim: int = hparam(4096, 'Hidden units of the projector and predictor (Sec. 3.3).')
    projection_dim: int = hparam(256, 'Output size of the projector and predictor (Sec. 3.3).')

    def head(self, feature_dim):
        return mlp(feature_dim, self.hidden_dim, self.projection_dim, 'projector')

    def online_heads(self, output_dim):
        return {'predictor': mlp(output_dim, self.hidden_dim, self.projection_dim, 'predictor')}

    def __call__(self, student, teacher, online, views, progress, state):
        # One pass per view: batch norm normalises each view on its own, as the reference code.
        predictions = [online['predictor'](student(v, training=True), training=True)
                       for v in views]
        projections = [teacher(v, training=True) for v in views]
        loss = symmetrised_loss(predictions, projections)
        return Losses(loss, {'cosine': 1. - loss / 4.})   # mean cos(q(z), z') over both terms
