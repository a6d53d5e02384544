"""Augmentations on batches of float32 images [B, H, W, C] in [0, 1], driven by stateless seeds.

The pipeline augments before it normalises, so every op sees pixel values in [0, 1] and returns
values in [0, 1]: `weak` and `none` here, `strong` (RandAugment + Cutout) in randaugment.py.

Every random choice is a pure function of a seed of shape [2], so a batch can be rebuilt exactly
from (run seed, step): that is what makes a resumed run identical to an uninterrupted one.
"""
import tensorflow as tf

from ssl_ema.data.randaugment import cutout, rand_augment


def _seeds(seed, n):
    """n independent stateless seeds derived from one."""
    return tf.random.experimental.stateless_split(seed, n)


def translate(images, seed, fraction=0.125):
    """Random translation by up to `fraction` of the side, reflect padding (the anchors' weak aug)."""
    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    # At least one pixel, but reflect padding needs less than the side (1-pixel sides stay put).
    pad_h = min(max(1, round(fraction * images.shape[1])), images.shape[1] - 1)
    pad_w = min(max(1, round(fraction * images.shape[2])), images.shape[2] - 1)
    padded = tf.pad(images, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]], mode='REFLECT')
    s = _seeds(seed, 2)
    dy = tf.random.stateless_uniform([b], s[0], 0, 2 * pad_h + 1, dtype=tf.int32)
    dx = tf.random.stateless_uniform([b], s[1], 0, 2 * pad_w + 1, dtype=tf.int32)
    rows = dy[:, None] + tf.range(h)[None]
    cols = dx[:, None] + tf.range(w)[None]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(out, cols, axis=2, batch_dims=1)


def flip_left_right(images, seed):
    flip = tf.random.stateless_uniform([tf.shape(images)[0]], seed) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(images, [2]), images)


def weak(images, seed, flip=True):
    """Random horizontal flip (unless `flip` is False, e.g. for digits) and translation."""
    s = _seeds(seed, 2)
    if flip:
        images = flip_left_right(images, s[0])
    return translate(images, s[1])


def strong(images, seed, flip=True):
    """weak, then RandAugment (FixMatch variant), then Cutout. The reference FixMatch and USB code
    also start their strong view with the weak flip-and-translate."""
    s = _seeds(seed, 3)
    return cutout(rand_augment(weak(images, s[0], flip=flip), s[1]), s[2])


def none(images, seed, flip=True):
    del seed, flip
    return images


AUGMENTATIONS = {'weak': weak, 'strong': strong, 'none': none}
