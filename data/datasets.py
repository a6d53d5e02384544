"""Dataset registry: a name (the value of --dataset) maps to a loader returning numpy arrays.

Every loader returns uint8 images in NHWC layout and int64 labels, so that the split, the
normalisation and the augmentation downstream are the same for every source.
"""
import dataclasses
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ssl_ema.base.errors import DataError


@dataclasses.dataclass
class Arrays:
    name: str
    x_train: np.ndarray             # uint8 [N, H, W, C]
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


def load(name: str, data_dir: Optional[str] = None, download: bool = True) -> Arrays:
    """The arrays of --dataset=name. `download=False` forbids fetching from the internet."""
    if name not in DATASETS:
        # Prefixed sources (e.g. npz:PATH) register their prefix with a trailing colon.
        prefix = name.split(':', 1)[0] + ':'
        if ':' in name and prefix in DATASETS:
            return DATASETS[prefix](name.split(':', 1)[1])
        raise DataError(f'--dataset={name} is unknown; valid: {", ".join(sorted(DATASETS))}')
    return DATASETS[name](data_dir, download=download)


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
