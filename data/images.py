"""One image file -> pixels at the run's size: its header (size, channels) without decoding it,
and the TensorFlow decode + resize that the file-backed pipeline, evaluation and predict share.

Aspect-ratio policy (the pretrained-model world's, e.g. torchvision's Resize + CenterCrop): an
image is scaled so that it covers the target H x W (the shorter side, relative to the target's
shape, fits exactly), bilinear with antialiasing, then centre-cropped to H x W. Training applies
the run's --augment (random flips and translations, RandAugment) after this same resize; an image
already at H x W is left untouched, so a folder of one size reads exactly as its in-memory arrays.
"""
import struct
from typing import Optional, Tuple

import numpy as np

HEAD_BYTES = 1 << 16   # read per file for its header; a JPEG with a large EXIF block reads more
GREY_LEVEL = 128       # the stand-in pixel value of a damaged file met mid-run (files.py)


def _jpeg(data: bytes) -> Optional[Tuple[int, int, int]]:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:              # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:   # markers without a length
            i += 2
            continue
        (length,) = struct.unpack('>H', data[i + 2:i + 4])
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            h, w = struct.unpack('>HH', data[i + 5:i + 9])
            components = data[i + 9]
            return (h, w, 1 if components == 1 else 3) if components in (1, 3) else None
        i += 2 + length
    return None


def header(data: bytes) -> Optional[Tuple[int, int, int]]:
    """(height, width, channels after decoding) from a file's first bytes, or None if they are not
    the header of a PNG, JPEG, GIF, BMP or WebP image. Channels follow decode_as_stored's
    conversions: alpha dropped, palettes expanded to RGB, grey stays 1."""
    try:
        if data[:8] == b'\x89PNG\r\n\x1a\n' and data[12:16] == b'IHDR':
            w, h = struct.unpack('>II', data[16:24])
            colour = data[25]
            channels = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}.get(colour)
            shape = (h, w, channels) if channels else None
        elif data[:3] == b'\xff\xd8\xff':
            shape = _jpeg(data)
        elif data[:6] in (b'GIF87a', b'GIF89a'):
            w, h = struct.unpack('<HH', data[6:10])
            shape = (h, w, 3)
        elif data[:2] == b'BM':
            w, h = struct.unpack('<ii', data[18:26])
            (bits,) = struct.unpack('<H', data[28:30])
            shape = (abs(h), w, 3 if bits >= 24 else 1)
        elif data[:4] == b'RIFF' and data[8:12] == b'WEBP':
            chunk = data[12:16]
            if chunk == b'VP8 ':
                w, h = struct.unpack('<HH', data[26:30])
                shape = (h & 0x3FFF, w & 0x3FFF, 3)
            elif chunk == b'VP8L':
                (bits,) = struct.unpack('<I', data[21:25])
                shape = (((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1, 3)
            elif chunk == b'VP8X':
                w = int.from_bytes(data[24:27], 'little') + 1
                h = int.from_bytes(data[27:30], 'little') + 1
                shape = (h, w, 3)
            else:
                shape = None
        else:
            shape = None
    except (struct.error, IndexError):
        return None
    if shape is None or shape[0] <= 0 or shape[1] <= 0:
        return None
    return tuple(int(v) for v in shape)


def median_size(sizes: np.ndarray) -> Tuple[int, int]:
    """The default --image_size of a folder of mixed sizes: the median height and the median width
    of its training images (each rounded down), so that half the images are shrunk and half are
    enlarged along each side (our choice: neither the smallest nor the largest image sets it)."""
    return int(np.median(sizes[:, 0])), int(np.median(sizes[:, 1]))


def parse_size(value: str, flag: str = '--image_size') -> Optional[Tuple[int, int]]:
    """'H' or 'H,W' -> (H, W); '' -> None (the data's own size)."""
    from ssl_ema.base.errors import ConfigError
    if not value:
        return None
    parts = [p.strip() for p in str(value).replace('x', ',').split(',')]
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f'{flag}={value} must be H or H,W in pixels (positive integers), '
                          f'e.g. 32 or 224,224')
    return (int(parts[0]), int(parts[-1]))


def cover_and_crop(image, size):
    """Float or uint8 image(s) [(N,) h, w, C] -> float32 [(N,) H, W, C]: scaled to cover `size`
    (the side that needs the larger scale fits exactly), then centre-cropped."""
    import tensorflow as tf
    target_h, target_w = size
    image = tf.cast(image, tf.float32)
    shape = tf.shape(image)[-3:-1]
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = tf.maximum(target_h / h, target_w / w)
    # Rounded, then at least the target: the covering side lands on it exactly.
    new_h = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), target_h)
    new_w = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), target_w)
    same = tf.logical_and(tf.equal(new_h, shape[0]), tf.equal(new_w, shape[1]))
    image = tf.cond(same, lambda: image,
                    lambda: tf.image.resize(image, tf.stack([new_h, new_w]), antialias=True))
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    return image[..., top:top + target_h, left:left + target_w, :]


def to_uint8(image):
    import tensorflow as tf
    return tf.cast(tf.clip_by_value(tf.round(image), 0., 255.), tf.uint8)


def decode(contents, size, channels: int):
    """Encoded image bytes (tf.string) -> uint8 [H, W, channels] at `size` (raises on a damaged
    image; the pipeline turns that into a warning and a stand-in, files.py)."""
    import tensorflow as tf
    image = tf.io.decode_image(contents, channels=channels, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, channels])
    out = to_uint8(cover_and_crop(image, size))
    out.set_shape([size[0], size[1], channels])
    return out


def decode_as_stored(contents):
    """Encoded image bytes (tf.string) -> uint8 [h, w, 1 or 3] at the file's own size and
    channels: PNG, JPEG, BMP, GIF (its first frame) or WebP; palettes expanded, 16-bit images
    scaled to 8 bits, alpha dropped (grey + alpha -> grey, RGBA -> RGB). Raises on a damaged
    image. What predict reads; training reads at the run's size and channels instead (decode)."""
    import tensorflow as tf
    image = tf.io.decode_image(contents, channels=0, dtype=tf.uint8, expand_animations=False)
    image = image[..., :tf.where(tf.shape(image)[-1] >= 3, 3, 1)]
    image.set_shape([None, None, None])
    return image


def to_shape(image, shape, resize: bool = True):
    """uint8 image(s) [(N,) h, w, 1 or 3] -> uint8 [(N,) H, W, C] for a model taking `shape`
    (H, W, C): grey repeated to colour, colour turned grey (ITU-R 601 luma,
    tf.image.rgb_to_grayscale, rounded) for a grey model; then, with `resize`, another size scaled
    to cover H x W and centre-cropped (cover_and_crop). Works eagerly and inside tf.data."""
    import tensorflow as tf
    h, w, c = shape
    image = tf.convert_to_tensor(image)
    if c == 1:
        image = tf.cond(tf.shape(image)[-1] == 1, lambda: image,
                        lambda: to_uint8(tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))))
    else:
        image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.repeat(image, c, axis=-1),
                        lambda: image)
    if resize:
        image = to_uint8(cover_and_crop(image, (h, w)))
    return image


def resize_images(x: np.ndarray, size, chunk: int = 1024) -> np.ndarray:
    """uint8 numpy [N, h, w, C] (one size) -> uint8 [N, H, W, C], a chunk at a time."""
    if x.shape[1:3] == tuple(size):
        return x
    out = np.empty((len(x), *size, x.shape[-1]), np.uint8)
    for start in range(0, len(x), chunk):
        out[start:start + chunk] = to_uint8(cover_and_crop(x[start:start + chunk], size)).numpy()
    return out
