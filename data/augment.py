"""Augmentations on batches of float32 images [B, H, W, C] in [0, 1], driven by stateless seeds.

The pipeline augments before it normalises, so every op sees pixel values in [0, 1] and returns
values in [0, 1]: `weak`, `medium`, `strong` and `none` here (RandAugment and Cutout in
randaugment.py).

Every random choice is a pure function of a seed of shape [2], so a batch can be rebuilt exactly
from (run seed, step): that is what makes a resumed run identical to an uninterrupted one. Each
op takes `rows` = (global batch size, first row) when it augments one share of a global batch
(pipeline.Share): the per-image draws are then the global batch's own (per_image_uniform).
"""
import tensorflow as tf

from ssl_ema.data.randaugment import cutout, per_image_uniform, rand_augment

FILLS = ('anchors', 'edge')   # --augment_fill


def edge_colour(images):
    """Each image's mean colour over its one-pixel border, [B, 1, 1, C]: the fill `edge` gives
    the pixels an augmentation uncovers (the background of an object on a plain one)."""
    border = tf.concat([images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]],
                       axis=1)                                                  # [B, 2H+2W-4, C]
    return tf.reduce_mean(border, axis=1)[:, None, None, :]


def _seeds(seed, n):
    """n independent stateless seeds derived from one."""
    return tf.random.experimental.stateless_split(seed, n)


def translate(images, seed, fraction=0.125, rows=None, fill=None):
    """Random translation by up to `fraction` of the side, reflect padding (the anchors' weak aug),
    or padding with `fill` (per image, [B, 1, 1, C]) when given."""
    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    # At least one pixel, but reflect padding needs less than the side (1-pixel sides stay put).
    pad_h = min(max(1, round(fraction * images.shape[1])), images.shape[1] - 1)
    pad_w = min(max(1, round(fraction * images.shape[2])), images.shape[2] - 1)
    paddings = [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]]
    padded = (tf.pad(images, paddings, mode='REFLECT') if fill is None else
              tf.pad(images - fill, paddings) + fill)
    s = _seeds(seed, 2)
    dy = per_image_uniform(s[0], images, rows, 0, 2 * pad_h + 1, dtype=tf.int32)
    dx = per_image_uniform(s[1], images, rows, 0, 2 * pad_w + 1, dtype=tf.int32)
    rows = dy[:, None] + tf.range(h)[None]
    cols = dx[:, None] + tf.range(w)[None]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(out, cols, axis=2, batch_dims=1)


def flip_left_right(images, seed, rows=None):
    flip = per_image_uniform(seed, images, rows) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(images, [2]), images)


def weak(images, seed, flip=True, rows=None, fill=None):
    """Random horizontal flip (unless `flip` is False, e.g. for digits) and translation.
    `fill` (every op here): None for the anchors' fills, else per image [B, 1, 1, C]."""
    s = _seeds(seed, 2)
    if flip:
        images = flip_left_right(images, s[0], rows)
    return translate(images, s[1], rows=rows, fill=fill)


def strong(images, seed, flip=True, rows=None, fill=None):
    """weak, then RandAugment (FixMatch variant), then Cutout. The reference FixMatch and USB code
    also start their strong view with the weak flip-and-translate."""
    s = _seeds(seed, 3)
    return cutout(rand_augment(weak(images, s[0], flip=flip, rows=rows, fill=fill), s[1],
                               rows=rows, fill=fill), s[2], rows=rows, fill=fill)


def medium(images, seed, flip=True, rows=None, fill=None):
    """weak, then RandAugment with one op (strong's has NUM_OPS = 2), then Cutout: SequenceMatch's
    medium view (USB's datasets/cv_datasets/cifar.py transform_medium, RandAugment(1, 5) against
    its strong view's (3, 5); USB's RandAugment ends with Cutout)."""
    s = _seeds(seed, 3)
    return cutout(rand_augment(weak(images, s[0], flip=flip, rows=rows, fill=fill), s[1],
                               num_ops=1, rows=rows, fill=fill), s[2], rows=rows, fill=fill)


def none(images, seed, flip=True, rows=None, fill=None):
    del seed, flip, rows, fill
    return images


AUGMENTATIONS = {'weak': weak, 'medium': medium, 'strong': strong, 'none': none}
