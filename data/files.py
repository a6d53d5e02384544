"""Images backed by files: decoded when a batch needs them, in parallel in the tf.data pipeline.

`FileImages` stands where an in-memory uint8 array [N, H, W, C] stands in `Arrays` (datasets.py):
it has a `shape`, a length and numpy-style indexing (which returns another FileImages over the
chosen files, decoding nothing), so splits, test carving and the shape checks treat both alike.
Pixels come only from `stream` (training batches, in the pipeline's order) and `decode` (a few
images, e.g. evaluation batches or the sample the normalisation is measured on).

Why files read by tf.data, and not tfds' ArrayRecord `data_source` or grain: a data source gives
random access through Python (`source[i]`), so inside tf.data it needs tf.py_function (one
Python thread under the GIL for all reading, and a graph that cannot be serialised for other
workers), and it first needs the dataset re-encoded by tfds in the array_record format (another
wheel, a second copy of the images). grain is a whole loader of its own (JAX-first, Python worker
processes) beside tf.data. Image files already are random access: tf.io.read_file and decode run
in tf.data's C++ threads, without the GIL, and the batch indices are ours (pipeline.py).

Damaged files met while training (a JPEG cut short whose header still reads, say) never stop a
run and never shift a batch: the image is replaced by a mid-grey stand-in at its place, and a
warning names the file each time a batch meets it. Files whose header does not read are skipped
when the folder is indexed, as before (custom.py).

`for_model` reads any list of image files for a classifier (ssl_ema.predict) by the same parallel
map (`loaded`), without stand-ins: the files missing from its batches are the damaged ones.
"""
import sys
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from ssl_ema.data import images as image_lib

# Decoded evaluation batches: big enough to keep the parallel decoder busy, small enough that an
# evaluation set of any size is held one batch at a time.
DECODE_BATCH = 256


def loaded(index_stream: tf.data.Dataset, load) -> tf.data.Dataset:
    """(position in `index_stream`, load(index)) for each index whose load succeeds, in order,
    loaded in parallel in tf.data's threads; a load that fails (a file that cannot be read or
    decoded) leaves its position out."""
    return index_stream.enumerate().map(lambda position, index: (position, load(index)),
                                        num_parallel_calls=tf.data.AUTOTUNE,
                                        deterministic=True).ignore_errors()


def in_order(index_stream: tf.data.Dataset, load, stand_in) -> tf.data.Dataset:
    """(load(index), ok) for each index of `index_stream`, in its order, loaded in parallel in
    tf.data's threads. Where load fails (a file that cannot be read or decoded) ok is False and
    `stand_in` (a structure of tensors like load's) takes its place: never a gap, so batches stay
    aligned with the indices that made them, to the last element of a finite stream."""
    # A sentinel after the last index (real=False: never loaded, never emitted) makes the scan
    # fill the gap that damaged files at the very end of a finite stream leave.
    sentinel = tf.data.Dataset.from_tensors((tf.zeros([], index_stream.element_spec.dtype), False))
    marked = index_stream.map(lambda index: (index, True)).concatenate(sentinel)

    def read(index_and_real):
        index, real = index_and_real
        return real, tf.cond(real, lambda: load(index), lambda: stand_in)

    def fill_gaps(expected, element):
        # ignore_errors dropped the positions expected..position-1: stand-ins take them.
        position, (real, value) = element
        missing = position - expected
        keep = missing + tf.cast(real, tf.int64)
        out = tf.nest.map_structure(
            lambda s, v: tf.concat([tf.repeat(s[None], missing, axis=0), v[None]], 0)[:keep],
            stand_in, value)
        ok = tf.concat([tf.zeros([missing], tf.bool), [True]], 0)[:keep]
        return position + 1, (out, ok)
    return loaded(marked, read).scan(tf.constant(0, tf.int64), fill_gaps).unbatch()


class FileImages:
    """N image files read at one size: uint8 [N, H, W, C] once decoded."""

    def __init__(self, root: str, paths: Sequence[str], size: Tuple[int, int], channels: int,
                 source: str = ''):
        self.root = str(root)                               # the folder the paths are under
        self.paths = np.asarray(paths, dtype=object)        # relative paths, '/'-separated
        self.size, self.channels, self.source = tuple(int(v) for v in size), channels, source

    def _like(self, paths):
        return FileImages(self.root, paths, self.size, self.channels, self.source)

    @property
    def shape(self):
        return (len(self.paths), *self.size, self.channels)

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index) -> 'FileImages':
        paths = self.paths[index]
        if not isinstance(paths, np.ndarray):   # one image: its pixels, as an array's x[i]
            return self._like([paths]).decode()[0]
        return self._like(paths)

    def concatenate(self, other: Optional['FileImages']) -> 'FileImages':
        if other is None or not len(other):
            return self
        if other.root != self.root:
            raise ValueError(f'cannot join files under {self.root} and {other.root}')
        return self._like(np.concatenate([self.paths, other.paths]))

    def __array__(self, dtype=None, copy=None):
        x = self.decode()
        return x if dtype is None else x.astype(dtype)

    # ---- pixels -----------------------------------------------------------------------------
    def _paths_tensor(self):
        return tf.constant(self.paths.astype(str) if len(self.paths) else np.zeros(0, str),
                           tf.string)

    def _prefix(self):
        return self.root.rstrip('/') + '/'

    def images(self, index_stream: tf.data.Dataset) -> tf.data.Dataset:
        """(uint8 image, ok) for each index of `index_stream`, in its order: decoded in parallel;
        a damaged file gives ok=False and a grey stand-in at its place (never a gap, so batches
        stay aligned with the indices that made them)."""
        paths, size, channels, prefix = self._paths_tensor(), self.size, self.channels, self._prefix()

        def load(index):
            contents = tf.io.read_file(prefix + tf.gather(paths, index))
            return image_lib.decode(contents, size, channels)
        grey = tf.fill([*size, channels], tf.constant(image_lib.GREY_LEVEL, tf.uint8))
        return in_order(index_stream, load, grey)

    def batches(self, steps: tf.data.Dataset, rows: int) -> tf.data.Dataset:
        """(step, indices, uint8 images) from `steps` of (step, indices [rows]) in order."""
        flat = steps.flat_map(lambda step, idx: tf.data.Dataset.from_tensor_slices(idx))
        pixels = self.images(flat).batch(rows, drop_remainder=True)
        paths = self._paths_tensor()

        def join(step_and_indices, images_and_ok):
            (step, idx), (images, ok) = step_and_indices, images_and_ok
            self._warn_damaged(paths, idx, ok)
            return step, idx, images
        return tf.data.Dataset.zip((steps, pixels)).map(join)

    def _warn_damaged(self, paths, idx, ok):
        """Names, on stderr, the files of a batch that did not decode (graph mode)."""
        names = tf.gather(paths, tf.boolean_mask(idx, tf.logical_not(ok)))

        def report():
            tf.print(f'warning: --dataset={self.source}: damaged image file(s) met while reading '
                     'a batch, each replaced by a grey image at its place:',
                     tf.strings.reduce_join(names, separator=', '), output_stream=sys.stderr)
            return tf.constant(0)
        tf.cond(tf.size(names) > 0, report, lambda: tf.constant(0))

    def decode(self, start: int = 0, stop: Optional[int] = None, with_ok: bool = False,
               warn: bool = True):
        """uint8 [n, H, W, C] of images start..stop (all by default), decoded in parallel;
        with `with_ok`, also a bool [n]: False where a damaged file's grey stand-in is."""
        stop = len(self) if stop is None else min(stop, len(self))
        n = max(0, stop - start)
        out = np.empty((n, *self.size, self.channels), np.uint8)
        ok = np.ones(n, bool)
        if n:
            indices = tf.data.Dataset.range(start, stop)
            for i, (x, good) in enumerate(self.images(indices).batch(DECODE_BATCH)):
                out[i * DECODE_BATCH:i * DECODE_BATCH + len(x)] = x.numpy()
                ok[i * DECODE_BATCH:i * DECODE_BATCH + len(x)] = good.numpy()
            if warn and not ok.all():
                names = self.paths[start:stop][~ok].astype(str)
                print(f'warning: --dataset={self.source}: damaged image file(s), each replaced '
                      f'by a grey image: {", ".join(names[:5])}'
                      f'{f" and {len(names) - 5} more" if len(names) > 5 else ""}',
                      file=sys.stderr)
        return (out, ok) if with_ok else out


class Normalized:
    """Evaluation images decoded and normalised one slice at a time: len() and x[a:b] as an array,
    so evaluation.accuracy reads a file-backed test set of any size in bounded memory."""

    def __init__(self, files: FileImages, normalize):
        self.files, self.normalize = files, normalize

    def __len__(self):
        return len(self.files)

    @property
    def shape(self):
        return self.files.shape

    def __getitem__(self, window: slice):
        if not isinstance(window, slice) or window.step not in (None, 1):
            raise TypeError('file-backed evaluation images are read by slices x[a:b]')
        start, stop, _ = window.indices(len(self))
        return np.asarray(self.normalize(self.files.decode(start, stop)))


def for_model(paths: Sequence[str], shape, resize: bool, batch: int) -> tf.data.Dataset:
    """Batches of up to `batch` of the image files `paths` that can be read, in order, decoded in
    parallel (a few batches in memory at a time): (indices into `paths` [n], uint8 images
    [n, H, W, C] for a model taking `shape`, each file's own size [n, 2] (height, width)); the
    indices missing are the files that cannot be read or decoded (predict). Channels converted
    and, with `resize`, sizes as images.to_shape; without it an image of another size is left
    unresized (zeros) for the caller to refuse. No stand-ins, so no scan per image (in_order's):
    predict went from 0.68x to 0.85x the training stream's images/s without it (runs/SPEED.md)."""
    h, w, c = shape
    names = tf.constant(np.asarray(paths, dtype=str) if len(paths) else np.zeros(0, str))

    def load(index):
        image = image_lib.decode_as_stored(tf.io.read_file(tf.gather(names, index)))
        size = tf.shape(image)[:2]
        fitted = image_lib.to_shape(image, shape, resize)
        if not resize:   # only images of the model's size go on; the caller names the others
            fitted = tf.cond(tf.reduce_all(size == [h, w]), lambda: fitted,
                             lambda: tf.zeros([h, w, c], tf.uint8))
        return tf.ensure_shape(fitted, [h, w, c]), size
    return loaded(tf.data.Dataset.range(len(paths)), load).map(
        lambda index, image_and_size: (index, *image_and_size)).batch(batch).prefetch(1)
