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
from ssl_ema.data.files import FileImages, Normalized
from ssl_ema.data.images import parse_size
from ssl_ema.base.errors import DataError
from ssl_ema.data.splits import Protocol, Split, known_arrays, protocol_split

_LABELED, _UNLABELED = 1, 2   # stream ids folded into the seed so streams are independent
# Augmentations by name: the SSL algorithms' and the self-supervised methods' views.
_AUGMENTATIONS = {**augment_lib.AUGMENTATIONS, **views_lib.VIEWS}


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


@dataclasses.dataclass(frozen=True)
class Share:
    """The part of every global batch one input pipeline builds: the rows of replicas
    first..first+count-1 of `replicas`, replica r holding rows [r B/R, (r+1) B/R) of a batch of B
    (as experimental_distribute_dataset splits a batch on one machine)."""
    first: int = 0
    count: int = 1
    replicas: int = 1

    @classmethod
    def of(cls, context: tf.distribute.InputContext) -> 'Share':
        local = context.num_replicas_in_sync // context.num_input_pipelines
        return cls(context.input_pipeline_id * local, local, context.num_replicas_in_sync)

    def rows(self, batch: int):
        """(first row, rows) of a global batch of `batch`."""
        if batch % self.replicas:
            raise DataError(f'a batch of {batch} does not split over {self.replicas} replicas')
        per = batch // self.replicas
        return self.first * per, self.count * per

    def per_replica(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """This pipeline's batches -> one element per local replica, in replica order (what
        distribute_datasets_from_function hands to the replicas of one worker in turn)."""
        if self.count == 1:
            return ds
        count = self.count

        def split(*batch):
            return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(
                lambda t: tf.reshape(t, [count, -1, *t.shape[1:]]), batch))
        return ds.flat_map(split)


ONE_DEVICE = Share()


@dataclasses.dataclass
class SSLData:
    """The run's data: batches as a pure function of (seed, step), and the evaluation sets.

    Pixels come from either of two sources, chosen by the dataset (datasets.py, folder.py):
    in-memory uint8 arrays, held as tensors (every dataset small enough: the digits, the public
    benchmarks, npz files, small folders), whose batches are a gather; or files.FileImages, whose
    batches decode their own images in parallel in the tf.data pipeline (large folders). Either
    way a batch is indices first (_index_batches), and an input pipeline builds only its Share
    of each global batch: the images of its rows, their augmentation drawn as the whole batch's
    (augment.py), so N workers read and decode what one would and train on one device's batches.
    """
    arrays: Arrays
    split: Split
    seed: int
    augment: str = 'weak'
    input_norm: str = 'standardize'

    # Images the 'standardize' statistics are measured on when the images are files (a fixed
    # sample, seed 0: the same for every run on the same folder).
    STATISTICS_SAMPLE = 2000

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
            if isinstance(x, FileImages):
                sample = np.random.RandomState(0).permutation(len(x))[:self.STATISTICS_SAMPLE]
                x = np.asarray(x[np.sort(sample)])
            self.mean = x.reshape(-1, channels).mean(0).astype(np.float32)
            self.std = np.maximum(x.reshape(-1, channels).std(0), 1e-3).astype(np.float32)
        else:
            raise DataError(f'--input_norm={self.input_norm} is unknown; valid: standardize, '
                            'plus_minus_one')
        # Model-input units per unit of the anchors' [-1, 1] pixel scale (127.5 grey levels):
        # input noise and VAT's epsilon are defined in those units whatever the normalisation.
        self.pixel_scale = (127.5 / self.std).astype(np.float32)
        x = self.arrays.x_train
        # Eager constants live on the default device, which is the first GPU when there is one:
        # the whole training set would take GPU memory and feed tf.data from there. The host holds
        # them; each batch gathered from them goes to the devices with the batch.
        with tf.device('/cpu:0'):
            self._labels = tf.constant(self.arrays.y_train[self.split.labeled])
        self._labeled_x = x[self.split.labeled]
        pool = x[self.split.unlabeled]
        extra = self.arrays.x_extra
        if extra is not None:
            pool = pool.concatenate(extra) if isinstance(pool, FileImages) else np.concatenate(
                [pool, np.asarray(extra)])
        self._unlabeled_x = pool
        if not isinstance(x, FileImages):   # the in-memory source: tensors, gathered per batch
            with tf.device('/cpu:0'):
                self._labeled_x = tf.constant(self._labeled_x)
                self._unlabeled_x = tf.constant(self._unlabeled_x)

    @property
    def num_classes(self):
        return self.arrays.num_classes

    @property
    def image_shape(self):
        return self.arrays.image_shape

    def normalize(self, images):
        """uint8 images, or floats in 0..255 units -> per-channel standardised float32."""
        return (tf.cast(images, tf.float32) - self.mean) / self.std

    def _augment(self, name, images, seed, rows=None, fill='anchors'):
        """uint8 images -> augmented in [0, 1] (the range the ops need) -> normalised. `fill`
        (--augment_fill): what the augment.py ops give the pixels they uncover."""
        unit = tf.cast(images, tf.float32) / 255.0
        # `rows`: this share's place in the global batch, whose draws every augmentation and
        # view makes (augment.py, views.py).
        own = {'fill': augment_lib.edge_colour(unit)} if (
            fill == 'edge' and name in augment_lib.AUGMENTATIONS) else {}
        unit = _AUGMENTATIONS[name](unit, seed, flip=self.arrays.flip, rows=rows, **own)
        return self.normalize(unit * 255.0)

    def _batches(self, images, batch, stream, start_step, share):
        """(step, indices, uint8 images) of this share's rows of each global batch, and the
        stream's base seed and the rows' position in the global batch."""
        first, rows = share.rows(batch)
        indices = _index_batches(int(images.shape[0]), batch, self.seed, stream, start_step)
        if rows != batch:
            indices = indices.map(lambda idx: idx[first:first + rows])
        steps = indices.enumerate(start_step)
        if isinstance(images, FileImages):
            out = images.batches(steps, rows)
        else:
            out = steps.map(lambda step, idx: (step, idx, tf.gather(images, idx)),
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return out, tf.constant([self.seed, stream], tf.int64), (None if rows == batch else
                                                                 (batch, first))

    def labeled(self, batch: int, start_step: int = 0, share: Share = ONE_DEVICE,
                views: Sequence[str] = (), indices: bool = False,
                augment: str = '', fill: str = 'anchors') -> tf.data.Dataset:
        """(images, labels) per step, with `augment` (--labeled_augment; empty: the run's
        --augment) and `fill` (--augment_fill): this share's rows of each batch.
        `views` (e.g. ('strong',): DeFixMatch's) add more augmentations of the same images, each
        with a seed of its own (the first view's is unchanged), and `indices` the images' indices
        in the labeled set: (images, labels, *views[, indices])."""
        steps, base, rows = self._batches(self._labeled_x, batch, _LABELED, start_step, share)
        augment = augment or self.augment
        if augment not in augment_lib.AUGMENTATIONS:
            raise DataError(f'--labeled_augment={augment} is unknown; valid: '
                            f'{", ".join(sorted(augment_lib.AUGMENTATIONS))}')
        if fill not in augment_lib.FILLS:
            raise DataError(f'--augment_fill={fill} is unknown; valid: '
                            f'{", ".join(augment_lib.FILLS)}')

        def make(step, idx, x):
            seed = tf.random.experimental.stateless_fold_in(base, step)
            out = (self._augment(augment, x, seed, rows, fill), tf.gather(self._labels, idx))
            out += tuple(self._augment(self.augment if v == 'weak' else v, x,
                                       tf.random.experimental.stateless_fold_in(seed, i + 1), rows,
                                       fill)
                         for i, v in enumerate(views))
            return out + (idx,) if indices else out
        return steps.map(make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    @property
    def labeled_size(self) -> int:
        """Images in the labeled set (the range of the indices `labeled` can yield)."""
        return int(len(self.split.labeled))

    @property
    def unlabeled_size(self) -> int:
        """Images in the unlabeled pool (the range of the indices `unlabeled` can yield)."""
        return int(len(self._unlabeled_x))

    def unlabeled(self, batch: int, views: Sequence[str], start_step: int = 0,
                  indices: bool = False, share: Share = ONE_DEVICE,
                  fill: str = 'anchors') -> tf.data.Dataset:
        """A tuple of augmented views of the same unlabeled images per step.

        A view named 'weak' gets the run's --augment; other names ('strong', 'none') are taken
        literally, so an algorithm asks for exactly the views its paper uses. With `indices`, the
        tuple ends with the images' indices in the pool (FlexMatch's per-image state).
        """
        steps, base, rows = self._batches(self._unlabeled_x, batch, _UNLABELED, start_step, share)

        def make(step, idx, x):
            seeds = tf.random.experimental.stateless_split(
                tf.random.experimental.stateless_fold_in(base, step), len(views))
            out = tuple(self._augment(self.augment if v == 'weak' else v, x, seeds[i], rows, fill)
                        for i, v in enumerate(views))
            return out + (idx,) if indices else out
        return steps.map(make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def train(self, batch: int, uratio: int, views: Sequence[str], start_step: int = 0,
              indices: bool = False, share: Share = ONE_DEVICE, labeled_views: Sequence[str] = (),
              labeled_indices: bool = False, labeled_augment: str = '', fill: str = 'anchors'):
        """((labeled images, labels[, labeled views][, labeled indices]), unlabeled views
        [+ indices]) per step, prefetched: this share's rows of each global batch."""
        return tf.data.Dataset.zip((self.labeled(batch, start_step, share, labeled_views,
                                                 labeled_indices, labeled_augment, fill),
                                    self.unlabeled(batch * uratio, views, start_step, indices,
                                                   share, fill))).prefetch(tf.data.AUTOTUNE)

    def pool_images(self):
        """The whole unlabeled pool in index order (the indices `unlabeled` yields), normalised,
        not augmented, read by slices x[a:b] (file-backed pools decode a slice at a time)."""
        if isinstance(self._unlabeled_x, FileImages):
            return Normalized(self._unlabeled_x, self.normalize)
        return _Sliced(self._unlabeled_x, self.normalize)

    def labeled_images(self):
        """(the labeled images normalised, not augmented, read by slices; their labels)."""
        images = (Normalized(self._labeled_x, self.normalize)
                  if isinstance(self._labeled_x, FileImages)
                  else _Sliced(self._labeled_x, self.normalize))
        return images, self.arrays.y_train[self.split.labeled]

    def eval_arrays(self) -> dict:
        """{'valid': (x, y), 'test': (x, y)}, normalised, not augmented. File-backed images are
        decoded a slice at a time when read (files.Normalized), in-memory ones at once."""
        a, s = self.arrays, self.split
        known = a.y_test < a.num_classes   # an open-set protocol's test: its known classes
        test = (a.x_test, a.y_test) if known.all() else (a.x_test[np.flatnonzero(known)],
                                                     a.y_test[known])
        out = {'valid': (a.x_train[s.valid], a.y_train[s.valid]), 'test': test}
        return {k: (Normalized(x, self.normalize) if isinstance(x, FileImages)
                    else self.normalize(x).numpy(), y) for k, (x, y) in out.items() if len(y)}

    def unknown_test_images(self):
        """An open-set protocol's test images of the unknown classes, normalised (None
        otherwise): the positives of the known-vs-unknown AUROC (core/accuracy.py)."""
        a = self.arrays
        unknown = np.flatnonzero(a.y_test >= a.num_classes)
        if not len(unknown):
            return None
        x = a.x_test[unknown]
        return Normalized(x, self.normalize) if isinstance(x, FileImages) else \
            self.normalize(x).numpy()


class _Sliced:
    """In-memory images normalised one slice at a time: len() and x[a:b] as an array."""

    def __init__(self, images, normalize):
        self.images, self.normalize = images, normalize

    def __len__(self):
        return int(self.images.shape[0])

    def __getitem__(self, window: slice):
        return np.asarray(self.normalize(self.images[window]))


def build(dataset: str, labels: int, valid: int, seed: int, augment: str = 'weak',
          data_dir: str = None, download: bool = True, input_norm: str = 'standardize',
          image_size: str = '', protocol: Protocol = None) -> SSLData:
    """--dataset, --labels, --valid, --seed, --augment, --data_dir, --input_norm, --image_size
    and the protocol's split flags (splits.Protocol: long tail, known classes) -> SSLData.

    `dataset` is a name (--dataset) or Arrays already loaded (data.from_arrays).
    `download=False` forbids tfds from fetching from the internet (see official.py for where the
    files are looked for first)."""
    arrays = dataset if isinstance(dataset, Arrays) else load(
        dataset, data_dir, download=download, image_size=parse_size(image_size))
    split = protocol_split(arrays.y_train, labels, valid, seed, arrays.num_classes, protocol,
                           arrays.x_extra)
    if split.protocol and 'known_classes' in split.protocol:
        arrays = known_arrays(arrays, split.protocol['known_classes'])
    return SSLData(arrays, split, seed, augment, input_norm)
