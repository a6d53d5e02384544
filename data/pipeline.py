"""The input pipeline: arrays + split -> normalised, augmented batches as a function of the step.

Design: every batch is a pure function of (seed, step). Each epoch's order is a stateless
permutation of the indices, and augmentation uses stateless seeds, so starting the stream at step k
yields exactly the batches an uninterrupted run sees from step k on. Resuming therefore needs only
the step counter from the checkpoint, never a saved shuffle buffer (which for SVHN-extra would
hold gigabytes), and works the same under any tf.distribute strategy.
"""
import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf

from ssl_ema.data import augment as augment_lib
from ssl_ema.data import views as views_lib
from ssl_ema.data.datasets import Arrays, load
from ssl_ema.base.errors import DataError
from ssl_ema.data.splits import Split, make_split

_LABELED, _UNLABELED = 1, 2
# Augmentations by name: the SSL algorithms' and the self-supervised methods' views.
_AUGMENTATIONS = {**augment_lib.AUGMENTATIONS, **views_lib.VIEWS}   # stream ids folded into the seed so streams are independent


def _index_batches(n: int, batch: int, seed: int, stream: int, start_step: int):
    """Batches of indices in [0, n): epoch e is the stateless permutation seeded by (seed, e)."""
    first_epoch, offset = divmod(start_step * batch, n)
    base = tf.constant([seed, stream], tf.int64)

    def permutation(epoch):
        epoch_seed = tf.random.experimental.stateless_fold_in(base, epoch)
        return tf.data.Dataset.from_tensor_slices(
            tf.argsort(tf.random.stateless_uniform([n], epoch_seed)))

    epochs = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
    return epochs.flat_map(permutation).skip(offset).batch(batch, drop_remainder=True)


@dataclasses.dataclass
class SSLData:
    arrays: Arrays
    split: Split
    seed: int
    augment: str = 'weak'
    input_norm: str = 'standardize'

    def __post_init__(self):
        if self.augment not in augment_lib.AUGMENTATIONS:
            raise DataError(f'--augment={self.augment} is unknown; valid: '
                            f'{", ".join(sorted(augment_lib.AUGMENTATIONS))}')
        x = self.arrays.x_train
        channels = x.shape[-1]
        if self.input_norm == 'plus_minus_one':   # x / 127.5 - 1, the anchors' libml/data.py
            self.mean = np.full(channels, 127.5, np.float32)
            self.std = np.full(channels, 127.5, np.float32)
        elif self.input_norm == 'standardize':
            # Per-channel statistics of the training part, in 0..255 units.
            self.mean = x.reshape(-1, channels).mean(0).astype(np.float32)
            self.std = np.maximum(x.reshape(-1, channels).std(0), 1e-3).astype(np.float32)
        else:
            raise DataError(f'--input_norm={self.input_norm} is unknown; valid: standardize, '
                            'plus_minus_one')
        # Model-input units per unit of the anchors' [-1, 1] pixel scale (127.5 grey levels):
        # input noise and VAT's epsilon are defined in those units whatever the normalisation.
        self.pixel_scale = (127.5 / self.std).astype(np.float32)
        self._labeled_x = tf.constant(x[self.split.labeled])
        self._labels = tf.constant(self.arrays.y_train[self.split.labeled])
        pool = x[self.split.unlabeled]
        if self.arrays.x_extra is not None:
            pool = np.concatenate([pool, self.arrays.x_extra])
        self._unlabeled_x = tf.constant(pool)

    @property
    def num_classes(self):
        return self.arrays.num_classes

    @property
    def image_shape(self):
        return self.arrays.image_shape

    def normalize(self, images):
        """uint8 images, or floats in 0..255 units -> per-channel standardised float32."""
        return (tf.cast(images, tf.float32) - self.mean) / self.std

    def _augment(self, name, images, seed):
        """uint8 images -> augmented in [0, 1] (the range the ops need) -> normalised."""
        unit = tf.cast(images, tf.float32) / 255.0
        unit = _AUGMENTATIONS[name](unit, seed, flip=self.arrays.flip)
        return self.normalize(unit * 255.0)

    def _stream(self, images, batch, stream, start_step):
        indices = _index_batches(int(images.shape[0]), batch, self.seed, stream, start_step)
        base = tf.constant([self.seed, stream], tf.int64)
        return indices.enumerate(start_step), base

    def labeled(self, batch: int, start_step: int = 0) -> tf.data.Dataset:
        """(images, labels) per step, with the run's --augment."""
        steps, base = self._stream(self._labeled_x, batch, _LABELED, start_step)

        def make(step, idx):
            seed = tf.random.experimental.stateless_fold_in(base, step)
            x = tf.gather(self._labeled_x, idx)
            return self._augment(self.augment, x, seed), tf.gather(self._labels, idx)
        return steps.map(make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    @property
    def unlabeled_size(self) -> int:
        """Images in the unlabeled pool (the range of the indices `unlabeled` can yield)."""
        return int(self._unlabeled_x.shape[0])

    def unlabeled(self, batch: int, views: Sequence[str], start_step: int = 0,
                  indices: bool = False) -> tf.data.Dataset:
        """A tuple of augmented views of the same unlabeled images per step.

        A view named 'weak' gets the run's --augment; other names ('strong', 'none') are taken
        literally, so an algorithm asks for exactly the views its paper uses. With `indices`, the
        tuple ends with the images' indices in the pool (FlexMatch's per-image state).
        """
        steps, base = self._stream(self._unlabeled_x, batch, _UNLABELED, start_step)

        def make(step, idx):
            x = tf.gather(self._unlabeled_x, idx)
            seeds = tf.random.experimental.stateless_split(
                tf.random.experimental.stateless_fold_in(base, step), len(views))
            out = tuple(self._augment(self.augment if v == 'weak' else v, x, seeds[i])
                        for i, v in enumerate(views))
            return out + (idx,) if indices else out
        return steps.map(make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def train(self, batch: int, uratio: int, views: Sequence[str], start_step: int = 0,
              indices: bool = False):
        """((labeled images, labels), unlabeled views [+ indices]) per step, prefetched."""
        return tf.data.Dataset.zip((self.labeled(batch, start_step),
                                    self.unlabeled(batch * uratio, views, start_step, indices))
                                   ).prefetch(tf.data.AUTOTUNE)

    def eval_arrays(self) -> dict:
        """{'valid': (x, y), 'test': (x, y)}, normalised, not augmented."""
        a, s = self.arrays, self.split
        out = {'valid': (a.x_train[s.valid], a.y_train[s.valid]), 'test': (a.x_test, a.y_test)}
        return {k: (self.normalize(x).numpy(), y) for k, (x, y) in out.items() if len(y)}


def replica_shares(ds: tf.data.Dataset, context: tf.distribute.InputContext) -> tf.data.Dataset:
    """What tf.distribute's input function for `context` yields: of each global batch of `ds`,
    the share of every replica this input pipeline (one per worker) feeds, in replica order.

    Replica r of R gets rows [r B/R, (r+1) B/R) of each global batch of B rows, as
    `experimental_distribute_dataset` splits a batch on one machine, so any number of workers
    trains on exactly the batches of one device. Every worker builds the whole global batch and
    keeps its share: the augmentations draw their randomness batch-wide, and this is what keeps
    every batch a pure function of (seed, step) whatever the cluster. (The cost: each worker's
    input pipeline does the work of a one-machine run's.)"""
    replicas = context.num_replicas_in_sync
    if replicas == 1:
        return ds
    local = replicas // context.num_input_pipelines
    first = context.input_pipeline_id * local

    def split(*batch):
        return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(
            lambda t: tf.reshape(t, [replicas, -1, *t.shape[1:]])[first:first + local], batch))
    return ds.flat_map(split)


def build(dataset: str, labels: int, valid: int, seed: int, augment: str = 'weak',
          data_dir: str = None, download: bool = True, input_norm: str = 'standardize') -> SSLData:
    """--dataset, --labels, --valid, --seed, --augment, --data_dir, --input_norm -> SSLData.

    `dataset` is a name (--dataset) or Arrays already loaded (data.from_arrays).
    `download=False` forbids tfds from fetching from the internet (see official.py for where the
    files are looked for first)."""
    arrays = dataset if isinstance(dataset, Arrays) else load(dataset, data_dir, download=download)
    split = make_split(arrays.y_train, labels, valid, seed, arrays.num_classes)
    return SSLData(arrays, split, seed, augment, input_norm)
