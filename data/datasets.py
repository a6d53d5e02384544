"""Dataset registry: a name (the value of --dataset) maps to a loader returning numpy arrays.

Every loader returns uint8 images in NHWC layout and int64 labels, so that the split, the
normalisation and the augmentation downstream are the same for every source. Images are either
in memory (numpy arrays) or, for a large folder, files.FileImages: the same shape, length and
indexing, decoded only when a batch needs them.
"""
import dataclasses
import inspect
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ssl_ema.base.errors import DataError


@dataclasses.dataclass
class Arrays:
    name: str
    x_train: np.ndarray             # uint8 [N, H, W, C] (or files.FileImages: pixels on disk)
    y_train: np.ndarray             # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    x_extra: Optional[np.ndarray] = None   # extra unlabeled images (svhn_extra, stl10), never labeled
    flip: bool = True                      # horizontal flips are a valid augmentation (False for digits)
    class_names: Optional[Tuple[str, ...]] = None   # label -> name, where the source has names

    @property
    def image_shape(self):
        return tuple(self.x_train.shape[1:])


DATASETS: Dict[str, Callable[[Optional[str]], Arrays]] = {}


def register(name: str):
    def wrap(loader):
        DATASETS[name] = loader
        return loader
    return wrap


def load(name: str, data_dir: Optional[str] = None, download: bool = True,
         image_size: Optional[Tuple[int, int]] = None) -> Arrays:
    """The arrays of --dataset=name. `download=False` forbids fetching from the internet.
    `image_size` (H, W): every image at that size (images.py's policy); a loader that reads at a
    size (one with an `image_size` argument: folder:) does it itself, others are resized here."""
    if name not in DATASETS:
        # Prefixed sources (e.g. npz:PATH) register their prefix with a trailing colon.
        prefix = name.split(':', 1)[0] + ':'
        if not (':' in name and prefix in DATASETS):
            raise DataError(f'--dataset={name} is unknown; valid: {", ".join(sorted(DATASETS))}')
        loader, args, kwargs = DATASETS[prefix], (name.split(':', 1)[1],), {}
    else:
        loader, args, kwargs = DATASETS[name], (data_dir,), {'download': download}
    if image_size and 'image_size' in inspect.signature(loader).parameters:
        kwargs['image_size'] = tuple(image_size)
    arrays = loader(*args, **kwargs)
    if image_size and tuple(arrays.image_shape[:2]) != tuple(image_size):
        arrays = resized(arrays, image_size)
    return arrays


def resized(arrays: Arrays, size: Tuple[int, int]) -> Arrays:
    """In-memory arrays with every image at `size` (scaled to cover it, centre crop)."""
    from ssl_ema.data.images import resize_images
    changes = {k: resize_images(getattr(arrays, k), size)
               for k in ('x_train', 'x_test', 'x_extra') if getattr(arrays, k) is not None}
    return dataclasses.replace(arrays, **changes)


@register('digits')
def digits(data_dir=None, download=True) -> Arrays:
    """scikit-learn's bundled 8x8 digits (1,797 images): the embedded default, no download.

    A fixed stratified 30% is the test part (random_state=0), identical for every run and seed.
    """
    del data_dir, download   # embedded in scikit-learn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    bunch = load_digits()
    images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)[..., None]  # 0..16 -> 0..255
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.3, stratify=labels, random_state=0)
    return Arrays('digits', x_train, y_train, x_test, y_test, num_classes=10, flip=False,
                  class_names=tuple(map(str, range(10))))
