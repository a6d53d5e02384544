"""The optimizer side of the loop: the learning-rate schedule, SGD or Adam as the anchors build
them, and which variables weight decay shrinks (the Trainer applies it, --weight_decay_type)."""
import math

import keras
import tensorflow as tf

from ssl_ema.base.config import TrainConfig
from ssl_ema.nn import custom_backbones, losses


class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """Peak `lr`, then the anchors' cosine decay lr * cos(7 pi t / 16 T), or the full half
    cosine lr * (1 + cos(pi t / T)) / 2 down to 0 (`cosine_to_zero`: SGDR's, Loshchilov & Hutter
    2017, Eq. 5 without restarts, which lets a short run's raw student settle), or constant. With
    `warmup_steps` (--lr_warmup_kimg), first lr * t / warmup_steps, then the decay over the
    remaining steps, as USB's get_cosine_schedule_with_warmup."""

    def __init__(self, lr, total_steps, decay='cosine', warmup_steps=0):
        self.lr, self.total_steps, self.decay = lr, total_steps, decay
        self.warmup_steps = min(warmup_steps, total_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if self.decay == 'constant':
            lr = tf.constant(self.lr, tf.float32)
        else:
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            progress = tf.clip_by_value(progress, 0., 1.)
            lr = self.lr * (losses.fixmatch_cosine(progress) if self.decay == 'cosine' else
                            (1. + tf.cos(math.pi * progress)) / 2.)
        if not self.warmup_steps:
            return lr
        return tf.where(step < self.warmup_steps, self.lr * step / self.warmup_steps, lr)


def make_optimizer(cfg: TrainConfig, schedule=None):
    """SGD with Nesterov momentum or Adam, as the anchors' tf.compat.v1 MomentumOptimizer
    (use_nesterov) and AdamOptimizer (epsilon 1e-8). Weight decay is not the optimizer's: the
    Trainer applies it (`--weight_decay_type`)."""
    lr = schedule or learning_rate(cfg)
    # --layer_decay and --head_lr: one learning rate per variable (custom_backbones).
    scaled = cfg.layer_decay != 1. or cfg.head_lr
    if cfg.optimizer == 'sgd':
        kind = custom_backbones.with_multipliers(keras.optimizers.SGD) if scaled else \
            keras.optimizers.SGD
        return kind(lr, momentum=cfg.momentum, nesterov=True)
    # adamw: Adam, and the Trainer's decoupled weight decay (--weight_decay_type=decoupled,
    # kernel *= 1 - weight_decay * lr after each step) makes it AdamW.
    kind = custom_backbones.with_multipliers(keras.optimizers.Adam) if scaled else \
        keras.optimizers.Adam
    return kind(lr, beta_1=cfg.momentum, epsilon=1e-8)


def learning_rate(cfg: TrainConfig) -> LearningRate:
    warmup = round(cfg.lr_warmup_kimg * 1024 / cfg.batch)
    return LearningRate(cfg.lr, cfg.total_steps, cfg.lr_decay, warmup)


def decayed_variables(model):
    """The variables weight decay shrinks: kernels of convolutions and dense layers, not biases
    or batch norm (the anchors select `'kernel' in v.name`)."""
    return [v for v in model.trainable_variables if v.name.endswith('kernel')]


def l2_penalty(variables):
    """sum over variables of sum(v^2) / 2 (tf.nn.l2_loss), the anchors' `loss_wd`."""
    return tf.add_n([tf.nn.l2_loss(v) for v in variables])
