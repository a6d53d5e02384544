"""The user's own data in one flag: --dataset=npz:PATH or --dataset=folder:PATH.

npz:PATH   a NumPy .npz with `x_train` [N, H, W] or [N, H, W, C] (C = 1 or 3; uint8 0..255, or
           float in 0..1) and `y_train` [N] integer labels 0..K-1; optional `x_unlabeled` (extra
           unlabeled-only images of the same shape), `x_test` and `y_test`.
folder:PATH  one sub-folder per class holding image files (PNG, JPEG, BMP, GIF), the class ids
           being the sorted folder names; an optional `unlabeled/` folder of unlabeled-only images.
           If PATH has `train/` and `test/` sub-folders, each is laid out that way and `test/` is
           the test part. All images must have one size (grey images are widened to RGB when the
           others are in colour).

Without a test part, 10% of each class (at least one image of any class with two or more,
chosen with the fixed seed 0, the same for every run and --seed) is carved out of the training
images as the test part, so that test accuracies of runs on the same data are comparable.
Horizontal flips are assumed label-preserving.
"""
import dataclasses
import os
import pathlib
from typing import List, Optional, Tuple

import numpy as np

from ssl_ema.data.datasets import Arrays, DataError, one_line, register

TEST_FRACTION = 0.1
TEST_SEED = 0
IMAGE_SUFFIXES = {'.png', '.jpg', '.jpeg', '.bmp', '.gif'}
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
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f'{what} has shape {x.shape}; expected [N, H, W] or [N, H, W, C] with C 1 or 3')
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating) and 0 <= x.min() and x.max() <= 1:
        return np.round(x * 255).astype(np.uint8)
    values = f' in [{x.min()}, {x.max()}]' if np.issubdtype(x.dtype, np.number) else ''
    raise DataError(f'{what} is {x.dtype}{values}; expected uint8 0..255 or float 0..1')


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


def _image_files(folder: pathlib.Path) -> List[pathlib.Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith('.'))


def read_image(path) -> np.ndarray:
    """One image file as uint8 [H, W, C], C = 1 (grey) or 3 (colour; alpha dropped); DataError
    naming the file if it cannot be read. Training folders and `ssl_ema.predict` read through it."""
    import tensorflow as tf
    try:
        image = tf.io.decode_image(pathlib.Path(path).read_bytes(), expand_animations=False).numpy()
    except Exception as e:
        raise DataError(f'cannot decode {path} ({type(e).__name__})')
    if image.shape[-1] == 4:            # drop alpha
        image = image[..., :3]
    elif image.shape[-1] == 2:          # grey + alpha
        image = image[..., :1]
    return image


def _read_images(files: List[pathlib.Path], source: str) -> np.ndarray:
    images, first = [], None
    for path in files:
        try:
            image = read_image(path)
        except DataError as e:
            raise DataError(f'{source}: {e}') from None
        if first is None:
            first = path, image.shape
        elif image.shape[:2] != first[1][:2]:
            raise DataError(f'{source}: images of mixed sizes: {first[0]} is {first[1][1]}x'
                            f'{first[1][0]} but {path} is {image.shape[1]}x{image.shape[0]}; '
                            f'resize them to one size')
        images.append(image)
    if not images:
        return np.zeros((0, 1, 1, 1), np.uint8)
    if len({im.shape[-1] for im in images}) > 1:
        images = [np.repeat(im, 3, -1) if im.shape[-1] == 1 else im for im in images]
    return np.stack(images).astype(np.uint8)


def _read_class_folders(root: pathlib.Path, source: str, class_names: Optional[List[str]] = None
                        ) -> Tuple[List[str], List[pathlib.Path], np.ndarray]:
    folders = sorted(p.name for p in root.iterdir()
                     if p.is_dir() and p.name != UNLABELED_FOLDER and not p.name.startswith('.'))
    if class_names is None:
        if len(folders) < 2:
            raise DataError(f'--dataset={source}: {root} has {len(folders)} class folder(s) '
                            f'{folders}; need one sub-folder per class, at least 2')
        class_names = folders
    elif set(folders) - set(class_names):
        raise DataError(f'--dataset={source}: {root} has classes {sorted(set(folders) - set(class_names))} '
                        f'that train/ lacks')
    files, labels = [], []
    for label, name in enumerate(class_names):
        if (root / name).is_dir():
            found = _image_files(root / name)
            files += found
            labels += [label] * len(found)
    if class_names is folders:
        empty = [n for n in class_names if not _image_files(root / n)]
        if empty:
            raise DataError(f'--dataset={source}: class folder(s) {empty} in {root} hold no image '
                            f'files ({", ".join(sorted(IMAGE_SUFFIXES))})')
    return class_names, files, np.asarray(labels, np.int64)


@register('folder:')
def folder(path: str) -> Arrays:
    """--dataset=folder:PATH (see the module docstring for the layout)."""
    source = f'folder:{path}'
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f'--dataset={source}: no such directory')
    split_layout = (root / 'train').is_dir() and (root / 'test').is_dir()
    train_root = root / 'train' if split_layout else root
    names, train_files, y_train = _read_class_folders(train_root, source)
    test_files, y_test = [], None
    if split_layout:
        _, test_files, y_test = _read_class_folders(root / 'test', source, names)
    unlabeled_files = []
    for candidate in (train_root / UNLABELED_FOLDER, root / UNLABELED_FOLDER):
        if candidate.is_dir() and not unlabeled_files:
            unlabeled_files = _image_files(candidate)
    # Read all parts together so that the size check and grey->RGB widening see every image.
    everything = _read_images(train_files + test_files + unlabeled_files, source)
    n_train, n_test = len(train_files), len(test_files)
    x_train = everything[:n_train]
    x_test = everything[n_train:n_train + n_test] if split_layout else None
    x_unlabeled = everything[n_train + n_test:]
    arrays = _assemble(source, x_train, y_train, x_test, y_test, x_unlabeled)
    return dataclasses.replace(arrays, class_names=tuple(names))   # the class folders' names
