"""The math of SSL, as small pure functions of tensors (each tested on hand-worked values).

Conventions: `logits` are [batch, classes]; every loss is a mean over the batch.
"""
import math

import tensorflow as tf


def cross_entropy(labels, logits):
    """Mean cross-entropy of integer labels."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


def softmax_mse(logits, target_probs):
    """Mean Teacher's consistency cost (Tarvainen & Valpola 2017, Sec. 2): squared distance
    between the student's and the target's class probabilities, averaged over classes and batch."""
    return tf.reduce_mean(tf.square(tf.nn.softmax(logits) - target_probs))


def kl_divergence(target_logits, logits):
    """KL(p_target || p_student), with p = softmax(logits): the direction VAT uses (Miyato et al.
    2018, Eq. 4), target first. Summed over classes, averaged over the batch."""
    p = tf.nn.softmax(target_logits)
    return tf.reduce_mean(tf.reduce_sum(
        p * (tf.nn.log_softmax(target_logits) - tf.nn.log_softmax(logits)), axis=-1))


def entropy(logits):
    """Mean entropy of softmax(logits) (entropy minimisation, Grandvalet & Bengio 2005)."""
    return -tf.reduce_mean(tf.reduce_sum(
        tf.nn.softmax(logits) * tf.nn.log_softmax(logits), axis=-1))


def linear_rampup(progress, length):
    """min(1, progress / length); 1 everywhere when length is 0."""
    if length <= 0:
        return tf.ones_like(progress)
    return tf.clip_by_value(progress / length, 0., 1.)


def fixmatch_cosine(progress):
    """The anchors' learning-rate multiplier cos(7 pi t / 16 T): from 1 down to ~0.2 at the end."""
    return tf.cos(7. * math.pi * progress / 16.)


def l2_normalize(d):
    """Scale each example of d to unit L2 norm over all non-batch axes."""
    axes = list(range(1, len(d.shape)))
    return d / tf.sqrt(1e-12 + tf.reduce_sum(tf.square(d), axes, keepdims=True))


def vat_perturbation(logits_fn, x, target_logits, noise, xi, eps):
    """The virtual adversarial perturbation r_adv (Miyato et al. 2018, Eqs. 11-13).

    One power iteration: from the random direction d = `noise`, r = xi * d / ||d||, and
    r_adv = eps * g / ||g|| with g the gradient of KL(target || logits_fn(x + r)) w.r.t. r.
    Returned with its gradient stopped.
    """
    r = xi * l2_normalize(noise)
    with tf.GradientTape() as tape:
        tape.watch(r)
        divergence = kl_divergence(tf.stop_gradient(target_logits), logits_fn(x + r))
    g = tape.gradient(divergence, r)
    return tf.stop_gradient(eps * l2_normalize(g))
