"""Stop a run whose loss or weights turned NaN or Inf before it saves anything from that state.

Every step compares its logged terms (the losses and the algorithm's metrics) with infinity on the
device and remembers the first step and term that were not finite; nothing leaves the device
until `check`, which the loop calls where it reads the step anyway: at each progress line and
before every evaluation, checkpoint, accuracy.json and the checkpoint an interrupt saves. `check`
also looks at every weight of the student and the EMA model (cheap next to an evaluation), and
raises RunError naming the step and the term: the latest checkpoint is then still the last good
one, and a resumed run starts from it. Cost per step: a few scalar ops (runs/nan_guard_cost.py).
"""
import numpy as np
import tensorflow as tf

from ssl_ema.base.errors import RunError


class NonFiniteGuard:
    def __init__(self):
        # Step of the first non-finite term (0: none yet), that term's index and value.
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='nonfinite_step')
        self.term = tf.Variable(0, dtype=tf.int64, trainable=False, name='nonfinite_term')
        self.value = tf.Variable(0., dtype=tf.float32, trainable=False, name='nonfinite_value')
        self.terms = []

    def observe(self, metrics: dict, step) -> None:
        """In the compiled step (cross-replica context): remember the first non-finite term."""
        # The names, in order (a Python side effect at tracing); the sum last, so that the
        # message names the term it came from.
        self.terms = sorted(metrics, key=lambda name: name == 'loss/total')
        values = tf.stack([tf.cast(tf.reduce_mean(metrics[k]), tf.float32) for k in self.terms])
        finite = tf.math.is_finite(values)
        first = tf.argmin(tf.cast(finite, tf.int32), output_type=tf.int64)
        new = tf.logical_and(tf.logical_not(tf.reduce_all(finite)), tf.equal(self.step, 0))
        self.term.assign(tf.where(new, first, self.term))
        self.value.assign(tf.where(new, values[first], self.value))
        self.step.assign(tf.where(new, tf.cast(step, tf.int64), self.step))

    def check(self, step: int, models: dict, last_checkpoint) -> None:
        """RunError if a term was non-finite at some step or a weight of `models` (name -> Keras
        model) is now: nothing from this state may be saved."""
        if int(self.step.numpy()):
            what = f'{self.terms[int(self.term.numpy())]} = {float(self.value.numpy())}'
            step = int(self.step.numpy())
        else:
            what = next((f'weight {v.path} of the {name} model = {bad}'
                         for name, model in models.items() for v in model.weights
                         for bad in [_first_nonfinite(v)] if bad is not None), None)
            if what is None:
                return
        kept = (f'the latest checkpoint, {last_checkpoint}, is from before it' if last_checkpoint
                else 'no checkpoint was saved')
        raise RunError(f'{what} at step {step}: training stopped without saving anything from '
                       f'it; {kept}')


def _first_nonfinite(variable):
    """The first NaN or Inf of a float variable, None if it has none."""
    x = np.asarray(variable)
    if not np.issubdtype(x.dtype, np.floating) or np.isfinite(x).all():
        return None
    return float(x[~np.isfinite(x)][0])
