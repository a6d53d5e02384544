"""Augmentations: shapes, dtypes, ranges, per-image randomness, determinism per seed, and the
RandAugment ops against PIL (the library the reference FixMatch code used) where it is installed."""
import numpy as np
import pytest
import tensorflow as tf

from ssl_ema.data import randaugment
from ssl_ema.data.augment import AUGMENTATIONS, edge_colour

SEED = tf.constant([3, 7], tf.int64)


def _batch(n=16, h=32, w=32, c=3, seed=0):
    return tf.constant(np.random.RandomState(seed).rand(n, h, w, c), tf.float32)


@pytest.mark.parametrize('name', sorted(AUGMENTATIONS))
@pytest.mark.parametrize('shape', [(16, 32, 32, 3), (8, 28, 28, 1), (4, 8, 8, 1)])
def test_keeps_shape_dtype_and_range(name, shape):
    out = AUGMENTATIONS[name](_batch(*shape), SEED).numpy()
    assert out.shape == shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize('name', ['weak', 'strong'])
def test_random_per_image_deterministic_per_seed(name):
    same = tf.repeat(_batch(1), 16, axis=0)          # 16 copies of one image
    out = AUGMENTATIONS[name](same, SEED).numpy()
    distinct = {out[i].tobytes() for i in range(16)}
    assert len(distinct) >= 8, 'images in a batch must get independent random choices'
    np.testing.assert_array_equal(out, AUGMENTATIONS[name](same, SEED).numpy())
    other = AUGMENTATIONS[name](same, tf.constant([3, 8], tf.int64)).numpy()
    assert not np.array_equal(out, other)


def test_none_is_identity():
    x = _batch()
    np.testing.assert_array_equal(AUGMENTATIONS['none'](x, SEED).numpy(), x.numpy())


def test_weak_without_flip_never_mirrors():
    # An image whose left half is 1 and right half 0 stays so under translation without flips.
    x = np.zeros((32, 16, 16, 1), np.float32)
    x[:, :, :8] = 1.0
    out = AUGMENTATIONS['weak'](tf.constant(x), SEED, flip=False).numpy()
    assert (out[:, :, 0] == 1).all() and (out[:, :, -1] == 0).all()
    flipped = AUGMENTATIONS['weak'](tf.constant(x), SEED, flip=True).numpy()
    assert (flipped[:, :, 0] == 0).any()


def _op(name, images, magnitude, fill=None):
    n = images.shape[0]
    return randaugment.apply_op(images, tf.fill([n], randaugment.OPS.index(name)),
                                tf.fill([n], float(magnitude)), fill).numpy()


def test_edge_colour_is_the_mean_of_the_border():
    x = np.zeros((2, 4, 5, 1), np.float32)
    x[0, 0, :] = 1.            # the top row: 5 of the 14 border pixels
    x[1, 1:3, 1:4] = 1.        # inside only
    np.testing.assert_allclose(edge_colour(tf.constant(x)).numpy().ravel(), [5 / 14, 0.],
                               atol=1e-6)


def test_fill_covers_what_each_augmentation_uncovers():
    """--augment_fill=edge: the weak translation pads with each image's own fill (the anchors'
    reflect padding copies the image instead), and RandAugment's geometric ops and Cutout fill
    with it where the anchors fill grey."""
    x = np.full((32, 16, 16, 1), 0.5, np.float32)
    x[:, :, :8] = 1.0                              # left half 1, right half 0.5
    fill = tf.constant(np.linspace(0.05, 0.2, 32, dtype=np.float32)[:, None, None, None])
    uncovered = lambda out: np.isclose(out, fill.numpy()).all(axis=(2, 3))   # [B, H] rows
    weak = AUGMENTATIONS['weak'](tf.constant(x), SEED, flip=False, fill=fill).numpy()
    anchors = AUGMENTATIONS['weak'](tf.constant(x), SEED, flip=False).numpy()
    # Every pixel is the image's or its own fill; some rows (vertical shifts) are all fill.
    assert np.isin(weak - fill.numpy(), [0.]).sum() > 0
    assert (np.isclose(weak, fill.numpy()) | np.isin(weak, [0.5, 1.])).all()
    assert uncovered(weak).any() and not np.isin(anchors, fill.numpy().ravel()).any()
    rotated = _op('rotate', tf.constant(x), 1.0, fill)       # 30 degrees: the corners uncovered
    assert np.allclose(rotated[:, 0, 0], fill.numpy()[:, 0, 0])
    assert np.allclose(_op('rotate', tf.constant(x), 1.0)[:, 0, 0], randaugment.FILL)
    cut = randaugment.cutout(tf.constant(x), SEED, fill=fill).numpy()
    greyed = randaugment.cutout(tf.constant(x), SEED).numpy()
    changed = greyed != x                                     # the squares (grey never on 0.5)
    assert changed.any() and np.allclose(cut[changed], np.broadcast_to(fill, x.shape)[changed])


def test_translate_x_moves_by_thirty_percent():
    x = _batch(2, 10, 10, 1)
    out = _op('translate_x', x, 1.0)        # magnitude 1 -> +0.3 * 10 = 3 pixels
    np.testing.assert_allclose(out[:, :, :7], x.numpy()[:, :, 3:], atol=1e-6)
    np.testing.assert_allclose(out[:, :, 7:], randaugment.FILL)


@pytest.mark.parametrize('name', ['rotate', 'shear_x', 'shear_y', 'translate_x', 'translate_y'])
def test_geometric_ops_at_zero_strength_are_identity(name):
    x = _batch(2)
    np.testing.assert_allclose(_op(name, x, 0.5), x.numpy(), atol=1e-5)   # 0.5 -> signed 0


def test_solarize_and_posterize_by_hand():
    x = tf.constant([[[[0.2], [0.6], [200 / 255]]]], tf.float32)
    np.testing.assert_allclose(_op('solarize', x, 0.5)[0, 0, :, 0], [0.2, 0.4, 55 / 255], atol=1e-6)
    # 4 bits keep the top nibble: 200 = 0b11001000 -> 192; round(0.6 * 255) = 153 -> 144.
    np.testing.assert_allclose(_op('posterize', x, 0.0)[0, 0, :, 0] * 255, [48, 144, 192],
                               atol=1e-4)


def test_cutout_greys_one_square_at_most_half_the_side():
    x = tf.zeros([64, 32, 32, 3])
    out = randaugment.cutout(x, SEED).numpy()
    grey = (out == randaugment.FILL).all(-1)
    sizes = grey.sum((1, 2))
    assert sizes.max() <= 16 * 16 and (sizes > 0).mean() > 0.8
    for mask in grey[sizes > 0]:          # each greyed area is one axis-aligned rectangle
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()


def _pil(fn, x):
    return np.stack([np.asarray(fn(image)) for image in x])


@pytest.mark.parametrize('name', ['autocontrast', 'equalize', 'brightness', 'color', 'contrast',
                                  'sharpness', 'posterize', 'solarize'])
def test_colour_ops_match_pil(name):
    PIL = pytest.importorskip('PIL')
    from PIL import Image, ImageEnhance, ImageOps
    rng = np.random.RandomState(1)
    # Low-contrast images so that autocontrast and equalize have work to do.
    uint8 = rng.randint(40, 180, (4, 32, 32, 3)).astype(np.uint8)   # > 512 pixels: PIL equalizes
    images = [Image.fromarray(u) for u in uint8]
    magnitude = 0.7
    factor = randaugment.ENHANCE[0] + (randaugment.ENHANCE[1] - randaugment.ENHANCE[0]) * magnitude
    reference = {
        'autocontrast': ImageOps.autocontrast,
        'equalize': ImageOps.equalize,
        'brightness': lambda im: ImageEnhance.Brightness(im).enhance(factor),
        'color': lambda im: ImageEnhance.Color(im).enhance(factor),
        'contrast': lambda im: ImageEnhance.Contrast(im).enhance(factor),
        'sharpness': lambda im: ImageEnhance.Sharpness(im).enhance(factor),
        'posterize': lambda im: ImageOps.posterize(im, 7),     # 4 + 4 * 0.7 rounds to 7 bits
        'solarize': lambda im: ImageOps.solarize(im, magnitude * 255),
    }[name]
    expected = _pil(reference, images).astype(np.float32)
    got = _op(name, tf.constant(uint8 / 255.0, tf.float32), magnitude) * 255
    # PIL rounds to uint8 at every step (and uses integer grey/mean); allow that, nothing more.
    tolerance = {'contrast': 3.0, 'color': 2.0, 'sharpness': 1.5, 'autocontrast': 1.0,
                 'brightness': 1.0}.get(name, 1e-3)   # equalize, posterize, solarize: exact
    np.testing.assert_allclose(got, expected, atol=tolerance)
    del PIL
