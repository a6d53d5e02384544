"""Random draws from the run's tf.random.Generator that XLA computes exactly as the CPU and GPU
kernels do, so a step under --jit_compile draws the noise, mixup coefficients and partners, and
rotations the step without it draws (and a run is the same run with or without the flag).

tf.random's float draws (Generator.uniform and .normal, the stateless ops) come out different
under XLA (measured on TF 2.21's CPU: other values from the same state), and XLA has no kernel
for tf.random.stateless_gamma at all; the generator's raw bits (uniform_full_int) agree. So every
draw here is a function of those bits: uniforms exactly, the rest (Box-Muller normals, Gamma by
rejection) up to the last bits of log, cos and pow.
"""
import math

import tensorflow as tf


def uniform(rng, shape):
    """U(0, 1) draws: 24 random bits per value, (k + 1/2) 2^-24, never 0 or 1 (logs stay finite)."""
    bits = tf.bitwise.right_shift(rng.uniform_full_int(shape, tf.uint32), tf.constant(8, tf.uint32))
    return (tf.cast(bits, tf.float32) + 0.5) * 2. ** -24


def integers(rng, shape, maxval):
    """Integers uniform in [0, maxval) (exactly uniform when maxval is a power of 2)."""
    return tf.cast(tf.floor(uniform(rng, shape) * maxval), tf.int32)


def normal(rng, shape):
    """N(0, 1) draws by the Box-Muller transform of two uniforms."""
    u, v = uniform(rng, shape), uniform(rng, shape)
    return tf.sqrt(-2. * tf.math.log(u)) * tf.cos(2. * math.pi * v)


def log_gamma(rng, shape, alpha, rounds=16):
    """log of Gamma(alpha, 1) draws by Marsaglia & Tsang's rejection sampler (ACM TOMS 2000),
    static-shaped for XLA: `rounds` candidates per draw, the first accepted one kept. For
    alpha >= 1 a candidate is accepted with probability > 0.95 (their Sec. 4), so all 16 fail
    with probability < 1e-20 (the last is then kept); alpha < 1 draws Gamma(alpha + 1)
    U^(1/alpha) (their Sec. 6), in logs so that a small alpha cannot underflow to 0."""
    boosted = alpha < 1
    d = (alpha + 1. if boosted else alpha) - 1. / 3.
    c = 1. / math.sqrt(9. * d)
    x, log_u = normal(rng, [rounds, *shape]), tf.math.log(uniform(rng, [rounds, *shape]))
    v = tf.maximum(tf.pow(1. + c * x, 3.), 1e-30)   # a candidate with 1 + c x <= 0 is rejected
    accept = (1. + c * x > 0.) & (log_u < 0.5 * tf.square(x) + d - d * v + d * tf.math.log(v))
    # The first accepted round (argmax returns the first maximum); the last if none is.
    first = tf.where(tf.reduce_any(accept, 0), tf.argmax(tf.cast(accept, tf.int32), 0),
                     rounds - 1)
    result = math.log(d) + tf.math.log(tf.reduce_sum(tf.one_hot(first, rounds, axis=0) * v, 0))
    if boosted:
        result += tf.math.log(uniform(rng, shape)) / alpha
    return result
