"""The exponential moving average (EMA) of a model's weights: teacher, and final classifier.

`EMA.model` is an ordinary Keras model of the same architecture whose variables are the shadow
weights, updated after every optimizer step with the semantics of
`tf.train.ExponentialMovingAverage`:

    shadow = decay * shadow + (1 - decay) * weight,
    decay  = min(ema_decay, (1 + t) / (10 + t))   with the optional warm-up (t = updates so far).

Batch-norm statistics: the moving mean and variance are averaged exactly like the weights (as
the anchors' `tf.train.ExponentialMovingAverage` over all model variables did). The averaged
statistics then belong to the averaged weights, and the EMA model in inference mode is a
self-contained classifier: what is evaluated (and what a user would save) is exactly the averaged model.

As a teacher, `ema(x, training=True)` runs the averaged weights the way Mean Teacher's teacher
runs (Tarvainen & Valpola 2017, Sec. 2): batch norm on the batch's statistics and dropout active,
so the teacher is as noisy as the student; the shadow moving averages are left untouched, so
only `update()` ever changes the EMA. `ema(x)` is the inference-mode classifier.
"""
import keras
import tensorflow as tf

from ssl_ema import backbones


class EMA:
    def __init__(self, model: keras.Model, decay: float = 0.999, warmup: bool = False):
        if not 0. <= decay < 1.:
            raise ValueError(f'--ema_decay={decay} must be in [0, 1)')
        self.decay = decay
        self.warmup = warmup
        self.model = keras.models.clone_model(model)
        self.model.set_weights(model.get_weights())
        self.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name='ema_updates')
        self._pairs = list(zip(self.model.weights, model.weights))

    def __call__(self, x, training=False):
        if not training:
            return self.model(x, training=False)
        return backbones.call_keeping_statistics(self.model, x)

    def current_decay(self):
        if not self.warmup:
            return tf.constant(self.decay, tf.float32)
        t = tf.cast(self.updates, tf.float32)
        return tf.minimum(self.decay, (1. + t) / (10. + t))

    def update(self):
        """One EMA step towards the student's current weights (call after each optimizer step)."""
        decay = self.current_decay()
        for shadow, weight in self._pairs:
            shadow.assign(decay * shadow + (1. - decay) * weight)
        self.updates.assign_add(1)
