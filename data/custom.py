"""The user's own data in one flag: --dataset=npz:PATH or --dataset=folder:PATH.

npz:PATH   a NumPy .npz with `x_train` [N, H, W] or [N, H, W, C] (C = 1 or 3, or 2 and 4 whose
           alpha is dropped; integers 0..255, or floats in 0..1) and `y_train` [N] integer labels
           0..K-1; optional `x_unlabeled` (extra unlabeled-only images of the same shape),
           `x_test` and `y_test`. A damaged file, or arrays that need pickle, are refused.
folder:PATH  one sub-folder per class holding image files (PNG, JPEG, BMP, GIF, WebP), the class
           ids being the sorted folder names; an optional `unlabeled/` folder of unlabeled-only
           images. If PATH has `train/` and `test/` sub-folders, each is laid out that way and
           `test/` is the test part. Images from the wild, case by case:
             converted  grey, grey+alpha, RGBA, palette and 16-bit images (alpha dropped, 16 bits
                        scaled to 8; grey widened to RGB when others are in colour)
             ignored    hidden files and folders (.DS_Store, ._x.jpg, .ipynb_checkpoints)
             resized    images of mixed sizes, to --image_size or, by default, their median size
                        (scaled to cover it, centre-cropped: images.py)
             skipped, with one warning per reason naming the files and their count:
                        files that do not decode (truncated, corrupt), other files and
                        sub-folders, broken or looping symbolic links; a damaged file of a folder
                        too large to decode at start (folder.py) is met while training instead:
                        a warning names it and a grey image takes its place in the batch
             refused    (one-line error naming it) a file or folder that cannot be read
                        (permissions), a class folder left without a readable image, a test/
                        folder without one.

Without a test part, 10% of each class (at least one image of any class with two or more,
chosen with the fixed seed 0, the same for every run and --seed) is carved out of the training
images as the test part, so that test accuracies of runs on the same data are comparable.
Horizontal flips are assumed label-preserving. folder.py indexes and reads folders; this module
holds what npz: and folder: share, and `unreadable`, which says why a file is not an image.
"""
import os
import pathlib
import sys
import zipfile
import zlib
from typing import Optional

import numpy as np

from ssl_ema.data.datasets import Arrays, register
from ssl_ema.base.errors import DataError, one_line

TEST_FRACTION = 0.1
TEST_SEED = 0
IMAGE_SUFFIXES = {'.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp'}
HEAD_BYTES = 1 << 16   # enough for the header of every format but JPEGs with large EXIF blocks
UNLABELED_FOLDER = 'unlabeled'


def carve_test(labels: np.ndarray, fraction: float = TEST_FRACTION, seed: int = TEST_SEED):
    """(train indices, test indices): `fraction` of each class, reproducibly, for data without a
    test part. A class with a single image stays entirely in training."""
    rng = np.random.RandomState(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = max(1, int(round(fraction * len(members)))) if len(members) > 1 else 0
        test.append(rng.permutation(members)[:take])
    test = np.sort(np.concatenate(test)).astype(np.int64)
    return np.setdiff1d(np.arange(len(labels)), test), test


def _as_images(x: np.ndarray, what: str) -> np.ndarray:
    """uint8 NHWC from [N, H, W] / [N, H, W, C] uint8 0..255 or float 0..1."""
    x = np.asarray(x)
    if x.size == 0:
        raise DataError(f'{what} is empty (shape {x.shape}); give it images, or leave an '
                        f'optional part (x_test, x_unlabeled) out')
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 2, 3, 4):
        raise DataError(f'{what} has shape {x.shape}; expected [N, H, W] or [N, H, W, C] with C 1 '
                        f'or 3 (2 or 4: the alpha channel is dropped)')
    x = x[..., :{1: 1, 2: 1, 3: 3, 4: 3}[x.shape[-1]]]   # drop alpha, as for image files
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer) and 0 <= x.min() and x.max() <= 255:
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating) and 0 <= x.min() and x.max() <= 1:   # False for NaN
        return np.round(x * 255).astype(np.uint8)
    values = f' in [{x.min()}, {x.max()}]' if np.issubdtype(x.dtype, np.number) else ''
    raise DataError(f'{what} is {x.dtype}{values}; expected integers 0..255 or floats 0..1 '
                    f'(scale 16-bit images down)')


def _as_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f'{what} has {len(y)} {y.dtype} values; expected {n} integer labels')
    return y.astype(np.int64)


def _assemble(source: str, x_train, y_train, x_test=None, y_test=None, x_unlabeled=None) -> Arrays:
    """Checks shared by npz: and folder:, then the test part carved if there is none."""
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise DataError(f'{source}: the training labels hold {len(classes)} class; need at least 2')
    num_classes = len(classes)
    if classes[0] != 0 or classes[-1] != num_classes - 1:
        raise DataError(f'{source}: training labels are {classes[:5].tolist()}...; expected every '
                        f'class id 0..{num_classes - 1}')
    shapes = {'train': x_train.shape[1:]}
    for part, x in (('test', x_test), ('unlabeled', x_unlabeled)):
        if x is not None and len(x):
            shapes[part] = x.shape[1:]
    if len(set(shapes.values())) > 1:
        raise DataError(f'{source}: images of mixed sizes {shapes}; all parts need one HxWxC')
    if x_test is None:
        train, test = carve_test(y_train)
        x_train, y_train, x_test, y_test = x_train[train], y_train[train], x_train[test], y_train[test]
    elif len(y_test) and (y_test.min() < 0 or y_test.max() >= num_classes):
        raise DataError(f'{source}: test labels span {y_test.min()}..{y_test.max()}; expected '
                        f'0..{num_classes - 1} as in training')
    return Arrays(source, x_train, y_train, x_test, y_test, num_classes=num_classes,
                  x_extra=x_unlabeled if x_unlabeled is not None and len(x_unlabeled) else None)


@register('npz:')
def npz(path: str) -> Arrays:
    """--dataset=npz:PATH (see the module docstring for the arrays it reads)."""
    source = f'npz:{path}'
    try:
        f = np.load(os.path.expanduser(path), allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f'--dataset={source}: no such file')
    except Exception as e:
        raise DataError(f'--dataset={source}: not a readable .npz ({one_line(e)})')
    with f:
        try:
            return _npz_arrays(f, source)
        except DataError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            # a damaged member (bad CRC, cut short) or one that needs pickle (object arrays)
            raise DataError(f'--dataset={source}: not a readable .npz ({one_line(e)})') from None


def _npz_arrays(f, source: str) -> Arrays:
    keys = set(f.files)
    missing = [k for k in ('x_train', 'y_train') if k not in keys]
    if missing or ('x_test' in keys) != ('y_test' in keys):
        need = missing or [k for k in ('x_test', 'y_test') if k not in keys]
        raise DataError(f'--dataset={source} lacks {", ".join(need)} (has {", ".join(sorted(keys))}); '
                        f'expected x_train, y_train, optional x_unlabeled, x_test with y_test')
    x_train = _as_images(f['x_train'], f'{source} x_train')
    y_train = _as_labels(f['y_train'], len(x_train), f'{source} y_train')
    x_test = y_test = x_unlabeled = None
    if 'x_test' in keys:
        x_test = _as_images(f['x_test'], f'{source} x_test')
        y_test = _as_labels(f['y_test'], len(x_test), f'{source} y_test')
    if 'x_unlabeled' in keys:
        x_unlabeled = _as_images(f['x_unlabeled'], f'{source} x_unlabeled')
    return _assemble(source, x_train, y_train, x_test, y_test, x_unlabeled)


def from_arrays(x, y, x_unlabeled=None, x_test=None, y_test=None, class_names=None) -> Arrays:
    """In-memory arrays as a dataset, checked as `npz:` checks its arrays: images [N, H, W] or
    [N, H, W, C], uint8 or float 0..1; labels 0..K-1; without a test part, 10% of each class is
    held out as test (the same every time); `class_names` names classes 0..K-1."""
    source = 'arrays'
    if (x_test is None) != (y_test is None):
        raise DataError('from_arrays: give x_test and y_test together, or neither')
    x = _as_images(x, 'from_arrays x')
    y = _as_labels(y, len(x), 'from_arrays y')
    if x_test is not None:
        x_test = _as_images(x_test, 'from_arrays x_test')
        y_test = _as_labels(y_test, len(x_test), 'from_arrays y_test')
    if x_unlabeled is not None:
        x_unlabeled = _as_images(x_unlabeled, 'from_arrays x_unlabeled')
    arrays = _assemble(source, x, y, x_test, y_test, x_unlabeled)
    if class_names is not None:
        if len(class_names) != arrays.num_classes:
            raise DataError(f'from_arrays: {len(class_names)} class_names for '
                            f'{arrays.num_classes} classes')
        arrays.class_names = tuple(map(str, class_names))
    return arrays


def unreadable(path) -> Optional[str]:
    """Why an image file cannot be read as an image (it cannot be opened, or does not decode:
    truncated, corrupt, empty), or None if it can (images.decode_as_stored's pixels)."""
    import tensorflow as tf
    from ssl_ema.data import images
    try:
        with open(path, 'rb') as f:
            contents = f.read()
    except OSError as e:
        return f'cannot be read ({e.strerror})'
    try:
        images.decode_as_stored(contents)
    except (tf.errors.OpError, ValueError):
        return 'not a readable image (truncated or corrupt?)'
    return None


class _Skipped:
    """Files left out of a folder dataset, by reason, reported as one warning line per reason."""
    REASONS = {'damaged': 'damaged image file(s) that do not decode',
               'other': f'file(s) or folder(s) that are not images '
                        f'({", ".join(sorted(IMAGE_SUFFIXES))})',
               'link': 'broken or looping symbolic link(s)'}

    def __init__(self):
        self.paths = {reason: [] for reason in self.REASONS}

    def warn(self, source: str, root: pathlib.Path) -> None:
        for reason, paths in self.paths.items():
            if paths:
                names = [os.path.relpath(p, root) for p in paths]
                more = f' and {len(names) - 5} more' if len(names) > 5 else ''
                print(f'warning: --dataset={source}: skipped {len(names)} {self.REASONS[reason]}: '
                      f'{", ".join(names[:5])}{more}', file=sys.stderr)


def read_head(path, source: str, size: int = HEAD_BYTES) -> bytes:
    """A file's first bytes (its header, for folder.py's index); DataError naming it if it cannot
    be read (permissions, a vanished file)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(size)
            if head[:3] == b'\xff\xd8\xff' and len(head) == size:
                head += f.read()   # a JPEG's size may follow a large EXIF block: read it all
            return head
    except OSError as e:
        raise DataError(f'--dataset={source}: cannot read {path}: {e.strerror}; fix its '
                        'permissions or move it away') from None
