"""DINO, self-distillation with no labels (Caron et al., ICCV 2021, arXiv:2104.14294).

Student and teacher are backbone + projection head; the teacher is the EMA of the student with
the cosine schedule from `teacher_momentum` to 1 (Sec. 3.1; main_dino.py momentum_teacher 0.996).
The head (vision_transformer.py DINOHead) is a 3-layer MLP (hidden 2048, GELU) to a 256-d
bottleneck, l2-normalised, then a weight-normalised linear layer without bias whose gain is fixed
at 1 (norm_last_layer=True). The loss (Eq. 1; main_dino.py DINOLoss) is the cross-entropy
H(P_t, P_s) between the teacher's centred and sharpened output softmax((g_t - c) / tau_t) and the
student's softmax(g_s / tau_s), over every pair of different views, averaged over the pairs. The
centre is an EMA of the teacher's batch means, c <- m c + (1 - m) mean(g_t) (Eq. 4, m = 0.9),
after the loss; tau_t warms up linearly from `warmup_teacher_temperature`.

Multi-crop (Sec. 3.1): `local_crops` small crops (96/224 of the side, area [0.05, 0.4];
data/views.py dino_local) go through the student only, each compared with both teacher outputs of
the global crops. main_dino.py uses 8; our default is 0 (measured on this CPU, runs/RESULTS.md).

Our choices, for CPU-sized runs: the output has 4096 dimensions, not main_dino.py's 65536
(--out_dim); --freeze_last_layer (the last layer fixed for the first epoch) is not done. The
backbone written at the end is the teacher's, the one DINO evaluates (eval_knn.py
checkpoint_key='teacher').
"""
import keras
import tensorflow as tf

from ssl_ema.algorithms.pretraining.base import (Losses, Method, State, hparam, mlp, register,
                                                 replica_mean)


def dino_loss(student, teacher, center, student_temperature, teacher_temperature):
    """Mean over pairs (teacher view i, student view v != i) of the batch mean of
    H(softmax((teacher_i - center) / tau_t), softmax(student_v / tau_s)); teacher gradient-stopped.
    The first len(teacher) student views are the teacher's views, in the same order."""
    targets = [tf.stop_gradient(tf.nn.softmax((t - center) / teacher_temperature))
               for t in teacher]
    log_probs = [tf.nn.log_softmax(s / student_temperature) for s in student]
    terms = [tf.reduce_mean(tf.reduce_sum(-q * log_probs[v], -1))
             for i, q in enumerate(targets) for v in range(len(log_probs)) if v != i]
    return tf.add_n(terms) / len(terms)


def updated_center(center, batch_mean, momentum):
    """c <- m c + (1 - m) mean of the teacher's outputs over the batch (Eq. 4)."""
    return momentum * center + (1. - momentum) * batch_mean


def teacher_temperature(progress, start, end, warmup):
    """tau_t: linear from `start` to `end` over the first `warmup` fraction of training, then
    `end` (main_dino.py teacher_temp_schedule, in fractions of training instead of epochs)."""
    if warmup <= 0:
        return tf.constant(end, tf.float32)
    fraction = tf.minimum(tf.cast(progress, tf.float32) / warmup, 1.)
    return start + (end - start) * fraction


@keras.saving.register_keras_serializable('ssl_ema')
class NormalizedDense(keras.layers.Layer):
    """Linear layer without bias whose every output unit's weight vector is scaled to unit norm:
    weight normalisation w = g v / |v| with the gain g fixed at 1 (DINOHead's last layer with
    norm_last_layer=True)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name='kernel',
                                      initializer=keras.initializers.TruncatedNormal(stddev=0.02))

    def call(self, x):
        return tf.matmul(x, tf.math.l2_normalize(self.kernel, axis=0))

    def get_config(self):
        return dict(super().get_config(), units=self.units)


@register('dino')
class DINO(Method):
    exported = 'ema'
    teacher_momentum: float = hparam(0.996, 'tau_base (main_dino.py --momentum_teacher).')
    hidden_dim: int = hparam(2048, 'Hidden units of the head\'s MLP (DINOHead hidden_dim).')
    bottleneck_dim: int = hparam(256, 'Size of the head\'s l2-normalised bottleneck (DINOHead '
                                 'bottleneck_dim).')
    out_dim: int = hparam(4096, 'Output dimensions K of the head (main_dino.py --out_dim is '
                          '65536; 4096, ours, keeps the head small next to a CPU backbone).')
    student_temperature: float = hparam(0.1, 'tau_s (DINOLoss student_temp).')
    teacher_temperature: float = hparam(0.04, 'tau_t after its warm-up (main_dino.py '
                                        '--teacher_temp).')
    warmup_teacher_temperature: float = hparam(0.04, 'tau_t at the start of training '
                                               '(main_dino.py --warmup_teacher_temp).')
    teacher_temperature_warmup: float = hparam(
        0., 'Fraction of training over which tau_t rises linearly to --teacher_temperature '
        '(main_dino.py --warmup_teacher_temp_epochs=0; its help suggests 30 of 100 epochs if '
        'training is unstable).')
    center_momentum: float = hparam(0.9, 'm of the centre\'s EMA (Eq. 4; DINOLoss '
                                    'center_momentum).')
    local_crops: int = hparam(0, 'Small local crops per image for the student (multi-crop; '
                              'main_dino.py --local_crops_number=8; 0, ours: see runs/RESULTS.md).')

    @property
    def views(self):
        return ('dino_global_1', 'dino_global_2') + ('dino_local',) * self.local_crops

    def state(self, num_classes, pool_size):
        return {'center': State((self.out_dim,), 0.)}

    def head(self, feature_dim):
        init = dict(kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02))
        inputs = keras.Input((feature_dim,))
        x = mlp(feature_dim, self.hidden_dim, self.bottleneck_dim, 'dino_mlp', layers=3,
                activation='gelu', batch_norm=False, **init)(inputs)   # use_bn_in_head=False
        x = keras.layers.UnitNormalization()(x)
        return keras.Model(inputs, NormalizedDense(self.out_dim)(x), name='dino_head')

    def __call__(self, student, teacher, online, views, progress, state):
        # One student pass per resolution (DINO's MultiCropWrapper concatenates the crops of one
        # size); the teacher sees the two global views only.
        global_views, local_views = views[:2], views[2:]
        student_out = tf.split(student(tf.concat(global_views, 0), training=True), 2)
        if local_views:
            student_out += tf.split(student(tf.concat(local_views, 0), training=True),
                                    len(local_views))
        teacher_out = tf.split(teacher(tf.concat(global_views, 0), training=True), 2)
        tau_t = teacher_temperature(progress, self.warmup_teacher_temperature,
                                    self.teacher_temperature, self.teacher_temperature_warmup)
        loss = dino_loss(student_out, teacher_out, state['center'], self.student_temperature,
                         tau_t)
        batch_mean = replica_mean(tf.reduce_mean(tf.stop_gradient(tf.concat(teacher_out, 0)), 0))
        center = updated_center(state['center'], batch_mean, self.center_momentum)
        return Losses(loss, {'teacher_temperature': tau_t}, {'center': center})
