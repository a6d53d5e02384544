"""The optimizer side of the loop: the learning-rate schedule, SGD or Adam as the anchors build
them, and which variables weight decay shrinks (the Trainer applies it, --weight_decay_type)."""
import keras
import tensorflow as tf

from ssl_ema.base.config import TrainConfig
from ssl_ema.nn import losses


class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """Peak `lr`, then the anchors' cosine decay lr * cos(7 pi t / 16 T) (or constant)."""

    def __init__(self, lr, total_steps, decay='cosine'):
        self.lr, self.total_steps, self.decay = lr, total_steps, decay

    def __call__(self, step):
        if self.decay == 'constant':
            return tf.constant(self.lr, tf.float32)
        progress = tf.minimum(tf.cast(step, tf.float32) / self.total_steps, 1.)
        return self.lr * losses.fixmatch_cosine(progress)


def make_optimizer(cfg: TrainConfig, schedule=None):
    """SGD with Nesterov momentum or Adam, as the anchors' tf.compat.v1 MomentumOptimizer
    (use_nesterov) and AdamOptimizer (epsilon 1e-8). Weight decay is not the optimizer's: the
    Trainer applies it (`--weight_decay_type`)."""
    lr = schedule or LearningRate(cfg.lr, cfg.total_steps, cfg.lr_decay)
    if cfg.optimizer == 'sgd':
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=True)
    return keras.optimizers.Adam(lr, beta_1=cfg.momentum, epsilon=1e-8)


def decayed_variables(model):
    """The variables weight decay shrinks: kernels of convolutions and dense layers, not biases
    or batch norm (the anchors select `'kernel' in v.name`)."""
    return [v for v in model.trainable_variables if v.name.endswith('kernel')]


def l2_penalty(variables):
    """sum over variables of sum(v^2) / 2 (tf.nn.l2_loss), the anchors' `loss_wd`."""
    return tf.add_n([tf.nn.l2_loss(v) for v in variables])
