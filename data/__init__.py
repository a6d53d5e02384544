"""Datasets, label splits, augmentation and the input pipeline (installed as `ssl_ema.data`)."""
from ssl_ema.data.datasets import Arrays, DATASETS, load
from ssl_ema.data.splits import Protocol, Split, make_split
from ssl_ema.data.pipeline import SSLData, build
# Importing these registers their --dataset names (cifar10, ..., npz:, folder:).
from ssl_ema.data import custom as _custom, folder as _folder, official as _official  # noqa: E402,F401
from ssl_ema.data import imagenet as _imagenet  # noqa: E402,F401
from ssl_ema.data.custom import from_arrays  # noqa: E402
