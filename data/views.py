"""The view pairs of self-supervised pretraining (BYOL, DINO), batched and driven by stateless seeds.

Each view is random resized crop -> horizontal flip -> colour jitter -> Gaussian blur ->
solarisation, with the probabilities of BYOL (Grill et al. 2020, Table 6; google-deepmind
deepmind-research byol/utils/augmentations.py `augment_config`), whose two views are asymmetric:

                         view 1   view 2
  random resized crop     1.0      1.0     area in [0.08, 1] of the image, aspect in [3/4, 4/3]
  horizontal flip         0.5      0.5
  colour jitter           0.8      0.8     brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1,
                                           in a random order per image
  greyscale               0.2      0.2
  Gaussian blur           1.0      0.1     sigma in [0.1, 2.0] pixels, kernel side / 10
  solarisation            0.0      0.2     x -> 1 - x where x >= 0.5

DINO's two global views (Caron et al. 2021, main_dino.py DataAugmentationDINO) are the same two
with crops of area [0.4, 1] (its --global_crops_scale); its local crops (multi-crop, --local_crops
of algorithms/pretraining/dino.py) cover [0.05, 0.4] of the image at 96/224 of its side.

Grey images (one channel) have no saturation, hue or greyscale: their colour jitter is
brightness and contrast only. Brightness is additive and contrast scales around each image's
mean, as BYOL's code does (adjust_brightness, adjust_contrast). The blur kernel is side / 10
pixels (BYOL's blur_divider), so on 28x28 images it is 3x3 and 8x8 images are not blurred.
Crops are resized back to the full side with bilinear interpolation (the papers use bicubic).

Images are float32 in [0, 1], [B, H, W, C], and stay so; every random choice is per image and a
pure function of the seed (shape [2]), so a resumed run sees the same views. Each view takes
`rows` = (global batch size, first row) when it augments one share of a global batch
(pipeline.Share), as augment.py's do: the per-image draws are then the global batch's own, so
every input pipeline builds only its share and the views are the ones one device makes.
"""
import math

import tensorflow as tf

from ssl_ema.data.augment import _seeds, flip_left_right

GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)   # BYOL's _to_grayscale


def _uniform(seed, images, rows, low=0., high=1., columns=()):
    """Uniform draws per image of the batch (shape [B, *columns]): with `rows`, the global
    batch's draws cut to this share's rows (randaugment.per_image_uniform's rule)."""
    b = tf.shape(images)[0]
    if rows is None:
        return tf.random.stateless_uniform([b, *columns], seed, low, high)
    total, first = rows
    return tf.random.stateless_uniform([total, *columns], seed, low, high)[first:first + b]


def _per_image(v):
    return v[:, None, None, None]


def _apply_with_probability(images, transformed, seed, probability, rows=None):
    """`transformed` for a fraction `probability` of the images (each drawn independently)."""
    if probability >= 1.:
        return transformed
    chosen = _uniform(seed, images, rows) < probability
    return tf.where(_per_image(chosen), transformed, images)


def random_resized_crop(images, seed, scale=(0.08, 1.), ratio=(3. / 4., 4. / 3.), size=None,
                        rows=None):
    """A crop of each image covering a fraction of its area uniform in `scale`, with aspect
    ratio (width / height) log-uniform in `ratio`, clipped to the image, at a uniform position,
    resized to `size` (default: the image's own side). BYOL's _decode_and_random_crop."""
    height, width = images.shape[1], images.shape[2]
    batch = tf.shape(images)[0]
    s = _seeds(seed, 4)
    area = _uniform(s[0], images, rows, *scale)
    aspect = tf.exp(_uniform(s[1], images, rows, math.log(ratio[0]), math.log(ratio[1])))
    # Crop sides as fractions of the image's sides.
    h = tf.minimum(tf.sqrt(area / aspect), 1.)
    w = tf.minimum(tf.sqrt(area * aspect), 1.)
    top = _uniform(s[2], images, rows) * (1. - h)
    left = _uniform(s[3], images, rows) * (1. - w)
    # crop_and_resize samples the box's corners at pixel centres: the box in those coordinates.
    boxes = tf.stack([top * height / (height - 1), left * width / (width - 1),
                      ((top + h) * height - 1) / (height - 1),
                      ((left + w) * width - 1) / (width - 1)], axis=1)
    return tf.image.crop_and_resize(images, boxes, tf.range(batch), size or (height, width))


def _brightness(images, seed, strength, rows):
    delta = _uniform(seed, images, rows, -strength, strength)
    return images + _per_image(delta)


def _contrast(images, seed, strength, rows):
    factor = _per_image(_uniform(seed, images, rows, 1. - strength, 1. + strength))
    mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
    return factor * (images - mean) + mean


def _saturation(images, seed, strength, rows):
    hsv = tf.image.rgb_to_hsv(images)
    factor = _uniform(seed, images, rows, 1. - strength, 1. + strength)[:, None, None]
    return tf.image.hsv_to_rgb(tf.stack(
        [hsv[..., 0], tf.clip_by_value(hsv[..., 1] * factor, 0., 1.), hsv[..., 2]], -1))


def _hue(images, seed, strength, rows):
    hsv = tf.image.rgb_to_hsv(images)
    delta = _uniform(seed, images, rows, -strength, strength)[:, None, None]
    return tf.image.hsv_to_rgb(tf.stack(
        [tf.math.floormod(hsv[..., 0] + delta, 1.), hsv[..., 1], hsv[..., 2]], -1))


def color_jitter(images, seed, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                 probability=0.8, grey_probability=0.2, rows=None):
    """BYOL's colour transform: with `probability`, brightness, contrast, saturation and hue
    jitter in a random order per image (each result clipped to [0, 1]); then, with
    `grey_probability`, greyscale. Grey images get brightness and contrast only."""
    rgb = images.shape[-1] == 3
    ops = [(_brightness, brightness), (_contrast, contrast)]
    if rgb:
        ops += [(_saturation, saturation), (_hue, hue)]
    ops = [(op, strength) for op, strength in ops if strength > 0]
    s = _seeds(seed, len(ops) + 3)
    # order[b, i]: the op image b applies i-th (a random permutation per image).
    order = tf.argsort(_uniform(s[0], images, rows, columns=(len(ops),)), axis=1)
    jittered = images
    for position in range(len(ops)):
        out = jittered
        for k, (op, strength) in enumerate(ops):
            mine = _per_image(tf.equal(order[:, position], k))
            out = tf.where(mine, tf.clip_by_value(op(jittered, s[3 + k], strength, rows), 0., 1.),
                           out)
        jittered = out
    images = _apply_with_probability(images, jittered, s[1], probability, rows)
    if rgb and grey_probability > 0:
        grey = tf.reduce_sum(images * tf.constant(GREY_WEIGHTS), -1, keepdims=True)
        images = _apply_with_probability(images, tf.tile(grey, [1, 1, 1, 3]), s[2],
                                          grey_probability, rows)
    return images


def gaussian_blur(images, seed, probability, sigma=(0.1, 2.0), divider=10., rows=None):
    """With `probability`, a separable Gaussian blur of std uniform in `sigma` pixels over a
    kernel of 2 * int(side / divider / 2) + 1 taps with zero padding (BYOL's gaussian_blur)."""
    radius = int(images.shape[1] / divider / 2)
    if radius == 0 or probability <= 0:
        return images
    s = _seeds(seed, 2)
    std = _uniform(s[0], images, rows, *sigma)
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    weights = tf.exp(-taps[None] ** 2 / (2. * std[:, None] ** 2))
    weights /= tf.reduce_sum(weights, 1, keepdims=True)   # [B, 2 radius + 1]

    def blur(x, axis):
        padding = [[0, 0]] * 4
        padding[axis] = [radius, radius]
        padded = tf.pad(x, padding)
        side = x.shape[axis]
        return tf.add_n([_per_image(weights[:, k]) *
                         tf.gather(padded, tf.range(k, k + side), axis=axis)
                         for k in range(2 * radius + 1)])
    return _apply_with_probability(images, blur(blur(images, 1), 2), s[1], probability, rows)


def solarize(images, seed, probability, threshold=0.5, rows=None):
    """With `probability`, x -> 1 - x where x >= threshold (BYOL's solarize)."""
    if probability <= 0:
        return images
    return _apply_with_probability(images, tf.where(images < threshold, images, 1. - images),
                                   seed, probability, rows)


def view(images, seed, flip=True, crop_scale=(0.08, 1.), blur=1.0, solarization=0.0, size=None,
         rows=None):
    """One augmented view: crop, flip (if the dataset allows it), colour jitter, blur, solarise."""
    s = _seeds(seed, 5)
    images = random_resized_crop(images, s[0], crop_scale, size=size, rows=rows)
    if flip:
        images = flip_left_right(images, s[1], rows)
    images = color_jitter(images, s[2], rows=rows)
    images = gaussian_blur(images, s[3], blur, rows=rows)
    return tf.clip_by_value(solarize(images, s[4], solarization, rows=rows), 0., 1.)


def byol_1(images, seed, flip=True, rows=None):
    return view(images, seed, flip, blur=1.0, solarization=0.0, rows=rows)


def byol_2(images, seed, flip=True, rows=None):
    return view(images, seed, flip, blur=0.1, solarization=0.2, rows=rows)


def dino_global_1(images, seed, flip=True, rows=None):
    return view(images, seed, flip, crop_scale=(0.4, 1.), blur=1.0, solarization=0.0, rows=rows)


def dino_global_2(images, seed, flip=True, rows=None):
    return view(images, seed, flip, crop_scale=(0.4, 1.), blur=0.1, solarization=0.2, rows=rows)


def local_side(side: int) -> int:
    """DINO's local crops are 96 pixels where its global ones are 224 (main_dino.py
    DataAugmentationDINO): the same fraction of this image's side (12 of 28, 3 of 8)."""
    return max(1, round(side * 96 / 224))


def dino_local(images, seed, flip=True, rows=None):
    """A DINO local crop: area [0.05, 0.4] (--local_crops_scale) at a smaller size, the global
    views' flip and colour jitter, blur with probability 0.5, no solarisation."""
    size = (local_side(images.shape[1]), local_side(images.shape[2]))
    return view(images, seed, flip, crop_scale=(0.05, 0.4), blur=0.5, solarization=0.0, size=size,
                rows=rows)


VIEWS = {'byol_1': byol_1, 'byol_2': byol_2,
         'dino_global_1': dino_global_1, 'dino_global_2': dino_global_2, 'dino_local': dino_local}
