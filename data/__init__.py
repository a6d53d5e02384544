"""Datasets, label splits, augmentation and the input pipeline (installed as `ssl_ema.data`)."""
from ssl_ema.data.datasets import Arrays, DATASETS, load
from ssl_ema.data.splits import Split, make_split
from ssl_ema.data.pipeline import SSLData, build
