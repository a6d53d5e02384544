"""Batch norm as one fused kernel, a drop-in for `keras.layers.BatchNormalization`.

Keras 3 computes batch norm on TensorFlow from separate ops (moments, rsqrt, multiply, add) and
differentiates through all of them; TensorFlow's `FusedBatchNormV3` does the forward pass in one
kernel and the backward pass in another (`FusedBatchNormGradV3`; on x86 both run as oneDNN
primitives). Measured in runs/SPEED.md. `BatchNorm` has the same weights (gamma, beta,
moving_mean, moving_variance, same order and shapes), config and formulas as the stock layer,
so weights move between the two with `set_weights`:

- training: normalise with the batch's mean and biased variance, and move the moving averages
  by `momentum` towards the batch's mean and biased variance (the fused kernel returns the
  unbiased one, n / (n - 1) times larger; it is rescaled);
- inference: normalise with the moving averages.

The fused path needs a 4-D channels-last input; anything else, and synchronised batch norm under
a multi-replica strategy (whose cross-replica moments the fused kernel cannot compute), takes the
stock layer's unfused math, with the same statistics handling.

Inside `keeping_statistics()` (read when the call is traced), training-mode calls use the batch
statistics but leave the moving averages alone: `backbones.call_keeping_statistics` uses it for
the extra passes that must not shape them, with no copy or restore of variables.
"""
import contextlib
import threading

import keras
import tensorflow as tf

_STATE = threading.local()   # per thread: MirroredStrategy traces each replica in its own thread


@contextlib.contextmanager
def keeping_statistics():
    """Training-mode `BatchNorm` calls made (traced) inside leave the moving averages alone."""
    previous = getattr(_STATE, 'keep', False)
    _STATE.keep = True
    try:
        yield
    finally:
        _STATE.keep = previous


def statistics_kept() -> bool:
    return getattr(_STATE, 'keep', False)


@keras.saving.register_keras_serializable(package='ssl_ema')
class BatchNorm(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` on TensorFlow's fused kernel (see the module doc)."""

    def _fusable(self, inputs, mask):
        return (len(inputs.shape) == 4 and self.axis in (-1, 3) and mask is None
                and not self.synchronized and not self.renorm and self.scale and self.center)

    def call(self, inputs, training=None, mask=None):
        training = bool(training) and self.trainable
        if not self._fusable(inputs, mask):
            return self._unfused(inputs, training, mask)
        if inputs.dtype not in (tf.float32, tf.bfloat16, tf.float16):
            inputs = tf.cast(inputs, tf.float32)
        # The kernel reads half-precision inputs and computes in float32 (its U type), which is
        # what the stock layer's upcast to float32 achieves.
        y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=self.gamma, offset=self.beta,
            mean=tf.zeros([0]) if training else self.moving_mean,
            variance=tf.zeros([0]) if training else self.moving_variance,
            epsilon=self.epsilon, is_training=training, data_format='NHWC')
        if training:
            n = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
            self._update_statistics(mean, variance * ((n - 1.) / tf.maximum(n, 1.)))
        return tf.cast(y, self.compute_dtype)

    def _unfused(self, inputs, training, mask):
        """The stock layer's math (it also serves synchronised batch norm)."""
        if not training:
            return super().call(inputs, training=False, mask=mask)
        x = tf.cast(inputs, tf.float32)
        mean, variance = self._moments(x, mask)
        self._update_statistics(mean, variance)
        y = keras.ops.batch_normalization(x, mean, variance, axis=self.axis, offset=self.beta,
                                          scale=self.gamma, epsilon=self.epsilon)
        return tf.cast(y, self.compute_dtype)

    def _update_statistics(self, mean, variance):
        if statistics_kept():
            return
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + mean * (1. - m))
        self.moving_variance.assign(self.moving_variance * m + variance * (1. - m))
