"""RandAugment as FixMatch uses it (Sohn et al. 2020, Sec. 2.3 and Table 12), and Cutout: the parts
of the `strong` augmentation (augment.py).

FixMatch's variant of RandAugment samples, for every image, `NUM_OPS` operations uniformly from
the list below and a magnitude for each uniformly from its range, instead of one global magnitude.
Everything is vectorised over the batch: each per-image choice is a tensor of shape [B], and each
op runs once per step on the images that drew it. Keras' own RandAugment layer draws from a stateful generator, which would break the
pure-function-of-the-seed guarantee that exact resume depends on; hence the hand-written ops.

Images are float32 in [0, 1]; outputs stay in [0, 1] with the same shape.
"""
import math

import tensorflow as tf

NUM_OPS = 2
FILL = 0.5          # grey: fill for pixels a geometric op or Cutout uncovers (the reference's 128)
CUTOUT_MAX = 0.5    # Cutout square side drawn from [0, CUTOUT_MAX] x image side

# FixMatch Table 12 ranges. Enhance factors (brightness, colour, contrast, sharpness) are centred
# on 1 (identity) so that an op weakens or strengthens equally often.
ENHANCE = (0.05, 1.95)
POSTERIZE_BITS = (4, 8)
ROTATE_DEGREES = 30.0
SHEAR = 0.3
TRANSLATE = 0.3     # fraction of the side
COLOR_OPS = ('identity', 'autocontrast', 'equalize', 'brightness', 'color', 'contrast',
             'sharpness', 'posterize', 'solarize')
GEOMETRIC_OPS = ('rotate', 'shear_x', 'shear_y', 'translate_x', 'translate_y')
OPS = COLOR_OPS + GEOMETRIC_OPS


def _per_image(v):
    return v[:, None, None, None]


def per_image_uniform(seed, images, rows=None, minval=0., maxval=None, dtype=tf.float32):
    """One uniform draw per image of the batch. With `rows` = (global batch size, first row), the
    draws are the whole global batch's, cut to this batch's rows: an input pipeline that builds
    only its share of each global batch (pipeline.Share) gets exactly the values one device
    draws for the same images."""
    b = tf.shape(images)[0]
    if rows is None:
        return tf.random.stateless_uniform([b], seed, minval, maxval, dtype)
    total, first = rows
    return tf.random.stateless_uniform([total], seed, minval, maxval, dtype)[first:first + b]


def _blend(degenerate, images, factor):
    """PIL's ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
    return tf.clip_by_value(degenerate + _per_image(factor) * (images - degenerate), 0.0, 1.0)


def _grey(images):
    if images.shape[-1] == 1:
        return images
    return tf.image.rgb_to_grayscale(images)


def autocontrast(images):
    """Stretch each channel of each image to the full [0, 1] range (no-op for a flat channel)."""
    lo = tf.reduce_min(images, axis=[1, 2], keepdims=True)
    hi = tf.reduce_max(images, axis=[1, 2], keepdims=True)
    scale = tf.where(hi > lo, 1.0 / tf.maximum(hi - lo, 1e-6), 1.0)
    offset = tf.where(hi > lo, lo, 0.0)
    return tf.clip_by_value((images - offset) * scale, 0.0, 1.0)


def equalize(images):
    """Per image and channel histogram equalisation, PIL's algorithm on 256 levels."""
    b, h, w, c = tf.unstack(tf.shape(images))
    levels = tf.cast(tf.round(images * 255.0), tf.int32)
    rows = tf.reshape(tf.transpose(levels, [0, 3, 1, 2]), [b * c, h * w])
    hist = tf.math.bincount(rows, minlength=256, maxlength=256, axis=-1)        # [B*C, 256]
    # PIL: step = (pixels - count of the last non-empty level) // 255; identity if step == 0.
    last_level = 255 - tf.argmax(tf.reverse(tf.cast(hist > 0, tf.int32), [1]), axis=1,
                                 output_type=tf.int32)
    last_count = tf.gather(hist, last_level, batch_dims=1)
    step = (h * w - last_count) // 255
    cum_before = tf.cumsum(hist, axis=1, exclusive=True)
    safe_step = tf.maximum(step, 1)[:, None]
    lut = tf.minimum((cum_before + safe_step // 2) // safe_step, 255)
    lut = tf.where((step > 0)[:, None], lut, tf.range(256)[None])
    out = tf.gather(lut, rows, batch_dims=1)                                     # [B*C, H*W]
    out = tf.transpose(tf.reshape(out, [b, c, h, w]), [0, 2, 3, 1])
    return tf.cast(out, tf.float32) / 255.0


def sharpness(images, factor):
    """Blend with PIL's SMOOTH filter (3x3, centre weight 5); border pixels keep their value."""
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    channels = images.shape[-1]
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    smooth = tf.nn.depthwise_conv2d(images, kernel, [1, 1, 1, 1], 'SAME')
    h, w = tf.shape(images)[1], tf.shape(images)[2]
    rows, cols = tf.range(h), tf.range(w)
    inside = tf.logical_and(((rows > 0) & (rows < h - 1))[:, None], ((cols > 0) & (cols < w - 1))[None])
    smooth = tf.where(inside[None, :, :, None], smooth, images)
    return _blend(smooth, images, factor)


def posterize(images, bits):
    """Keep the top `bits` bits of each 8-bit level."""
    shift = tf.cast(_per_image(8 - bits), tf.float32)
    quantum = tf.pow(2.0, shift)
    return tf.floor(tf.round(images * 255.0) / quantum) * quantum / 255.0


def solarize(images, threshold):
    return tf.where(images >= _per_image(threshold), 1.0 - images, images)


def _transform(images, rows, fill=None):
    """Projective transform with per-image rows [a0, a1, a2, b0, b1, b2] (output -> input pixel:
    x_in = a0 x + a1 y + a2, y_in = b0 x + b1 y + b2), bilinear, grey fill (or `fill`, per image
    [B, 1, 1, C]: the transform of images - fill with fill 0, plus fill, is exactly that)."""
    if fill is not None:
        return _projective(images - fill, rows, 0.) + fill
    return _projective(images, rows, FILL)


def _projective(images, rows, fill_value):
    matrix = tf.stack(rows, axis=1)
    matrix = tf.concat([matrix, tf.zeros_like(matrix[:, :2])], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=matrix, output_shape=tf.shape(images)[1:3],
        fill_value=fill_value, interpolation='BILINEAR', fill_mode='CONSTANT')


def rotate(images, v, fill=None):
    """Rotate about the centre by v * ROTATE_DEGREES, v in [-1, 1]."""
    h = tf.cast(tf.shape(images)[1], tf.float32)
    w = tf.cast(tf.shape(images)[2], tf.float32)
    theta = v * ROTATE_DEGREES * math.pi / 180.0
    cos, sin = tf.cos(theta), tf.sin(theta)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return _transform(images, [cos, sin, cx - cos * cx - sin * cy,
                               -sin, cos, cy + sin * cx - cos * cy], fill)


def _shift_rows(images, v, which):
    """Rows of a shear or translation along x or y with signed magnitude v in [-1, 1]."""
    zeros, ones = tf.zeros_like(v), tf.ones_like(v)
    h = tf.cast(tf.shape(images)[1], tf.float32)
    w = tf.cast(tf.shape(images)[2], tf.float32)
    return {'shear_x': [ones, v * SHEAR, zeros, zeros, ones, zeros],
            'shear_y': [ones, zeros, zeros, v * SHEAR, ones, zeros],
            'translate_x': [ones, zeros, v * TRANSLATE * w, zeros, ones, zeros],
            'translate_y': [ones, zeros, zeros, zeros, ones, v * TRANSLATE * h]}[which]


def _op_functions():
    """name -> f(images, magnitude in [0, 1], fill) mapping the magnitude onto the op's range;
    `fill` (None: grey) is what the geometric ops give the pixels they uncover."""
    def enhance(m):
        return ENHANCE[0] + (ENHANCE[1] - ENHANCE[0]) * m

    def bits(m):
        return tf.cast(tf.round(POSTERIZE_BITS[0] + (POSTERIZE_BITS[1] - POSTERIZE_BITS[0]) * m),
                       tf.int32)

    def shift(which):
        return lambda x, m, f: _transform(x, _shift_rows(x, 2.0 * m - 1.0, which), f)
    return {
        'identity': lambda x, m, f: x,
        'autocontrast': lambda x, m, f: autocontrast(x),
        'equalize': lambda x, m, f: equalize(x),
        'brightness': lambda x, m, f: _blend(tf.zeros_like(x), x, enhance(m)),
        'color': lambda x, m, f: _blend(_grey(x), x, enhance(m)),
        'contrast': lambda x, m, f: _blend(tf.reduce_mean(_grey(x), axis=[1, 2, 3], keepdims=True),
                                           x, enhance(m)),
        'sharpness': lambda x, m, f: sharpness(x, enhance(m)),
        'posterize': lambda x, m, f: posterize(x, bits(m)),
        'solarize': lambda x, m, f: solarize(x, m),
        'rotate': lambda x, m, f: rotate(x, 2.0 * m - 1.0, f),
        **{name: shift(name) for name in ('shear_x', 'shear_y', 'translate_x', 'translate_y')},
    }


def apply_op(images, op, magnitude, fill=None):
    """Apply, per image, OPS[op] at `magnitude` in [0, 1] (mapped onto the op's range), the
    geometric ops filling with `fill` (None: grey; else per image, [B, 1, 1, C]).

    Each op runs only on the images that drew it (dynamic_partition, then dynamic_stitch back in
    batch order), so a batch costs about one op per image, not every op on every image.
    """
    functions = _op_functions()
    positions = tf.dynamic_partition(tf.range(tf.shape(images)[0]), op, len(OPS))
    parts = tf.dynamic_partition(images, op, len(OPS))
    magnitudes = tf.dynamic_partition(magnitude, op, len(OPS))
    fills = (tf.dynamic_partition(fill, op, len(OPS)) if fill is not None else
             [None] * len(OPS))
    outputs = [functions[name](parts[i], magnitudes[i], fills[i]) for i, name in enumerate(OPS)]
    out = tf.dynamic_stitch(positions, outputs)
    out.set_shape(images.shape)
    return out


def cutout(images, seed, max_fraction=CUTOUT_MAX, rows=None, fill=None):
    """Grey out one square per image (or fill it with `fill`, per image [B, 1, 1, C]), side
    uniform in [0, max_fraction] x min(H, W), centre uniform over the image (the square is
    clipped at the borders)."""
    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    s = tf.random.experimental.stateless_split(seed, 3)
    side = per_image_uniform(s[0], images, rows, 0.0, max_fraction) * tf.cast(tf.minimum(h, w),
                                                                              tf.float32)
    cy = per_image_uniform(s[1], images, rows, 0.0, tf.cast(h, tf.float32))
    cx = per_image_uniform(s[2], images, rows, 0.0, tf.cast(w, tf.float32))
    rows = tf.cast(tf.range(h), tf.float32)[None, :] + 0.5
    cols = tf.cast(tf.range(w), tf.float32)[None, :] + 0.5
    in_rows = tf.abs(rows - cy[:, None]) < side[:, None] / 2          # [B, H]
    in_cols = tf.abs(cols - cx[:, None]) < side[:, None] / 2          # [B, W]
    mask = tf.logical_and(in_rows[:, :, None], in_cols[:, None, :])[..., None]
    return tf.where(mask, tf.cast(FILL, images.dtype) if fill is None else fill, images)


def rand_augment(images, seed, num_ops=NUM_OPS, rows=None, fill=None):
    """`num_ops` random ops per image with magnitudes drawn per image and op (`fill`: apply_op's)."""
    s = tf.random.experimental.stateless_split(seed, 2 * num_ops)
    for k in range(num_ops):
        op = per_image_uniform(s[2 * k], images, rows, 0, len(OPS), dtype=tf.int32)
        magnitude = per_image_uniform(s[2 * k + 1], images, rows)
        images = apply_op(images, op, magnitude, fill)
    return images
