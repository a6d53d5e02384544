"""The public benchmarks (--dataset=cifar10, cifar100, svhn, svhn_extra, stl10, mnist, fashion_mnist).

Where the data comes from, first match wins:
  1. `<root>/ssl_ema/<name>.npz`: the decoded arrays this module cached on an earlier run.
  2. A tensorflow-datasets copy already prepared in `<root>` (`tfds.builder(..).is_prepared()`).
  3. The official files on disk, under their official names, in `<root>/downloads/manual/` (tfds'
     manual directory) or a dataset's system directory (Debian's `dataset-fashion-mnist` package
     installs /usr/share/datasets/fashion-mnist/). If they are byte-identical to the files tfds
     registers (sha256), tfds prepares them (`DownloadConfig(manual_dir=...)`); otherwise (e.g.
     Debian recompressed Fashion-MNIST, or the python-pickle CIFAR archives that tfds does not read)
     our own reader of the official format decodes them: the decoded arrays are the same.
  4. tfds downloads and prepares the dataset (needs the internet; `download=False` forbids it).
`<root>` is --data_dir, or tfds' default (`$TFDS_DATA_DIR`, else ~/tensorflow_datasets).

Any failure raises a one-line DataError naming the file and what was expected, and leaves no
half-written file behind: caches are written to a temporary name and renamed, and what a failed
tfds download created is removed again.

(Longer than our usual ~300 lines on purpose: one short reader per official format, CIFAR's two,
SVHN's .mat, STL-10's binary, the IDX of MNIST and Fashion-MNIST, all behind the one lookup order
above, which is the single idea of the module.)
"""
import dataclasses
import gzip
import hashlib
import logging
import os
import pathlib
import pickle
import shutil
import socket
import tarfile
import urllib.parse
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ssl_ema.data.datasets import Arrays, register
from ssl_ema.base.errors import DataError, one_line
from ssl_ema.base.files import write_atomically

CACHE_VERSION = 1   # bump when the cached arrays' layout changes, so stale caches are rebuilt


# ----------------------------------------------------------------------------------------------
# Readers of the official file formats. Each takes {official file name: path} and returns the
# arrays as uint8 NHWC images and int64 labels, exactly as the tfds builders decode them.

def _tar_members(path: pathlib.Path, wanted: Sequence[str]) -> Dict[str, bytes]:
    """The bytes of the archive members whose base name is in `wanted` (any directory prefix)."""
    found = {}
    with tarfile.open(path, 'r:*') as tar:
        for member in tar:
            base = os.path.basename(member.name)
            if member.isfile() and base in wanted:
                found[base] = tar.extractfile(member).read()
    missing = [w for w in wanted if w not in found]
    if missing:
        raise DataError(f'{path} lacks {", ".join(missing)}: not the official archive')
    return found


def _cifar_binary(data: bytes, label_bytes: int, label_index: int, where: str):
    """CIFAR binary batches: per image `label_bytes` label bytes then 3x32x32 channel-major pixels."""
    record = label_bytes + 3 * 32 * 32
    if len(data) % record:
        raise DataError(f'{where}: {len(data)} bytes is not a whole number of {record}-byte records')
    rows = np.frombuffer(data, np.uint8).reshape(-1, record)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, rows[:, label_index].astype(np.int64)


def _cifar_pickle(data: bytes, label_key: str, where: str):
    """CIFAR python batches: a pickled dict with b'data' [N, 3072] and the labels under label_key."""
    batch = pickle.loads(data, encoding='bytes')
    if not isinstance(batch, dict) or b'data' not in batch or label_key.encode() not in batch:
        raise DataError(f'{where}: not a CIFAR python batch (needs data and {label_key})')
    images = np.asarray(batch[b'data'], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(batch[label_key.encode()], np.int64)


def _concat(parts):
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _cifar_reader(train: Sequence[str], test: Sequence[str], decode: Callable):
    def read(paths):
        (path,) = paths.values()
        members = _tar_members(path, list(train) + list(test))
        x_train, y_train = _concat([decode(members[m], f'{path}:{m}') for m in train])
        x_test, y_test = _concat([decode(members[m], f'{path}:{m}') for m in test])
        return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return read


def read_idx(path: pathlib.Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not: big-endian magic, dimensions, then uint8 data."""
    with open(path, 'rb') as f:
        data = f.read()
    if data[:2] == b'\x1f\x8b':
        data = gzip.decompress(data)
    if len(data) < 4 or data[:3] != b'\x00\x00\x08':
        raise DataError(f'{path}: not an IDX file of uint8 data (magic {data[:4].hex()})')
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, '>u4', ndim, 4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f'{path}: header says {shape} but holds {body.size} bytes (truncated?)')
    return body.reshape(shape)


def _read_mnist(paths):
    def pair(images, labels):
        x, y = read_idx(paths[images]), read_idx(paths[labels])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f'{paths[images]} and {paths[labels]}: {x.shape} images do not match '
                            f'{y.shape} labels')
        return x[..., None], y.astype(np.int64)
    x_train, y_train = pair('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz')
    x_test, y_test = pair('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def read_svhn_mat(path: pathlib.Path):
    """SVHN cropped digits: a MATLAB file with X [32, 32, 3, N] and y [N, 1] in 1..10 (10 is 0)."""
    import scipy.io   # only this reader needs scipy
    try:
        mat = scipy.io.loadmat(path)
        x, y = mat['X'], mat['y']
    except Exception as e:  # scipy raises several types for a damaged file
        raise DataError(f'{path}: not an SVHN .mat file with X and y ({one_line(e)})')
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.size:
        raise DataError(f'{path}: X has shape {x.shape}, expected (32, 32, 3, N) with N={y.size}')
    return np.moveaxis(x, -1, 0).astype(np.uint8), y.reshape(-1).astype(np.int64) % 10


def _svhn_reader(extra: bool):
    def read(paths):
        x_train, y_train = read_svhn_mat(paths['train_32x32.mat'])
        x_test, y_test = read_svhn_mat(paths['test_32x32.mat'])
        out = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
        if extra:
            out['x_extra'] = read_svhn_mat(paths['extra_32x32.mat'])[0]
        return out
    return read


def _read_stl10(paths):
    """STL-10 binary: column-major 3x96x96 images, labels 1..10; transposed as tfds does."""
    (path,) = paths.values()
    names = ['train_X.bin', 'train_y.bin', 'test_X.bin', 'test_y.bin', 'unlabeled_X.bin']
    members = _tar_members(path, names)

    def images(name):
        data = members[name]
        if len(data) % (3 * 96 * 96):
            raise DataError(f'{path}:{name}: {len(data)} bytes is not a whole number of images')
        return np.frombuffer(data, np.uint8).reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)

    def labels(name):
        return np.frombuffer(members[name], np.uint8).astype(np.int64) - 1
    return dict(x_train=images('train_X.bin'), y_train=labels('train_y.bin'),
                x_test=images('test_X.bin'), y_test=labels('test_y.bin'),
                x_extra=images('unlabeled_X.bin'))


# ----------------------------------------------------------------------------------------------
# The datasets.

@dataclasses.dataclass(frozen=True)
class Official:
    name: str                  # the --dataset value
    tfds_name: str
    num_classes: int
    flip: bool                 # horizontal flip is label-preserving (not for digits)
    # Alternative sets of official files and the reader for each; the first complete set is used.
    file_sets: Tuple[Tuple[Tuple[str, ...], Callable], ...]
    extra_split: Optional[str] = None   # tfds split that becomes the unlabeled-only x_extra
    system_dirs: Tuple[str, ...] = ()   # where a distribution package installs the files
    class_names: Optional[Tuple[str, ...]] = None   # the dataset's own names of labels 0..K-1

    def expected(self) -> str:
        return ' or '.join('+'.join(files) for files, _ in self.file_sets)


_CIFAR10_TRAIN = [f'data_batch_{i}' for i in range(1, 6)]
# Label names as the datasets publish them (CIFAR-10's batches.meta, STL-10's class_names.txt,
# Fashion-MNIST's README); the digit datasets' labels are the digits. CIFAR-100's are left out:
# its classes are reported by id.
_DIGITS = tuple(map(str, range(10)))
_CIFAR10_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                  'ship', 'truck')
_STL10_NAMES = ('airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse', 'monkey', 'ship',
                'truck')
_FASHION_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                  'Sneaker', 'Bag', 'Ankle boot')
OFFICIAL = {o.name: o for o in [
    Official('cifar10', 'cifar10', 10, True, (
        (('cifar-10-binary.tar.gz',), _cifar_reader(
            [b + '.bin' for b in _CIFAR10_TRAIN], ['test_batch.bin'],
            lambda d, w: _cifar_binary(d, 1, 0, w))),
        (('cifar-10-python.tar.gz',), _cifar_reader(
            _CIFAR10_TRAIN, ['test_batch'], lambda d, w: _cifar_pickle(d, 'labels', w)))),
        class_names=_CIFAR10_NAMES),
    Official('cifar100', 'cifar100', 100, True, (
        (('cifar-100-binary.tar.gz',), _cifar_reader(
            ['train.bin'], ['test.bin'], lambda d, w: _cifar_binary(d, 2, 1, w))),
        (('cifar-100-python.tar.gz',), _cifar_reader(
            ['train'], ['test'], lambda d, w: _cifar_pickle(d, 'fine_labels', w))))),
    Official('svhn', 'svhn_cropped', 10, False, (
        (('train_32x32.mat', 'test_32x32.mat'), _svhn_reader(extra=False)),),
        class_names=_DIGITS),
    Official('svhn_extra', 'svhn_cropped', 10, False, (
        (('train_32x32.mat', 'test_32x32.mat', 'extra_32x32.mat'), _svhn_reader(extra=True)),),
        extra_split='extra', class_names=_DIGITS),
    Official('stl10', 'stl10', 10, True, ((('stl10_binary.tar.gz',), _read_stl10),),
             extra_split='unlabelled', class_names=_STL10_NAMES),
    Official('mnist', 'mnist', 10, False, (
        (('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
          't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'), _read_mnist),),
        class_names=_DIGITS),
    Official('fashion_mnist', 'fashion_mnist', 10, True, (
        (('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
          't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'), _read_mnist),),
        system_dirs=('/usr/share/datasets/fashion-mnist',), class_names=_FASHION_NAMES),
]}


def data_root(data_dir: Optional[str]) -> pathlib.Path:
    """--data_dir, else tfds' default data directory."""
    if data_dir:
        return pathlib.Path(data_dir).expanduser()
    return pathlib.Path(os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')).expanduser()


def manual_dir(root: pathlib.Path) -> pathlib.Path:
    """Where a user puts the official files: tfds' own manual directory."""
    return root / 'downloads' / 'manual'


def _find_files(spec: Official, root: pathlib.Path):
    """(directory, files, reader) of the first complete set of official files, else None."""
    for directory in [manual_dir(root), *map(pathlib.Path, spec.system_dirs)]:
        for files, reader in spec.file_sets:
            if all((directory / f).is_file() for f in files):
                return directory, files, reader
    return None


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _tfds_accepts(builder_cls, directory: pathlib.Path) -> bool:
    """True when every file the tfds builder downloads is in `directory` with its registered sha256."""
    infos = builder_cls.url_infos or {}
    if not infos:
        return False
    for info in infos.values():
        path = directory / (info.filename or '')
        if not info.filename or not path.is_file() or path.stat().st_size != info.size:
            return False
        if _sha256(path) != info.checksum:
            logging.info('%s differs from the file tfds registers; reading it directly', path)
            return False
    return True


def _tfds_positions(split: str, n: int) -> np.ndarray:
    """For each example in tfds' stored order, its index in the official files.

    tfds stores a split sorted by md5(split name + str(key)) (tensorflow_datasets/core/hashing.py,
    shuffle.py) and these builders key each example by its index in the official files. Undoing
    that order makes the arrays, and so every label split, identical whichever way the data
    arrived (tfds download, tfds manual_dir, or our own reader).
    """
    salted = hashlib.md5(split.encode())
    keys = []
    for index in range(n):
        md5 = salted.copy()
        md5.update(str(index).encode())
        keys.append(int(md5.hexdigest(), 16))
    return np.asarray(sorted(range(n), key=keys.__getitem__), np.int64)


def _from_tfds(builder, spec: Official) -> dict:
    import tensorflow_datasets as tfds

    def split(name):
        x, y = tfds.as_numpy(builder.as_dataset(split=name, batch_size=-1, as_supervised=True,
                                                shuffle_files=False))
        x_official, y_official = np.empty_like(x), np.empty(len(y), np.int64)
        positions = _tfds_positions(name, len(y))
        x_official[positions], y_official[positions] = x, y
        return x_official, y_official
    x_train, y_train = split('train')
    x_test, y_test = split('test')
    out = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    if spec.extra_split:
        out['x_extra'] = split(spec.extra_split)[0]
    return out


def _hosts_resolve(builder_cls) -> Optional[str]:
    """The first download host that does not resolve, if any: offline, fail now, not after retries."""
    for url in (builder_cls.url_infos or {}):
        host = urllib.parse.urlparse(url).hostname
        try:
            socket.getaddrinfo(host, 443)
        except OSError:
            return host
    return None


def _prepare_cleanly(builder, **kwargs):
    """download_and_prepare, removing what it created if it fails (tfds leaves *.tmp.* downloads)."""
    root = pathlib.Path(builder.data_dir_root)
    watched = [root / 'downloads', root / 'downloads' / 'extracted', root / builder.name]
    before = {d: set(os.listdir(d)) if d.is_dir() else None for d in watched}
    try:
        builder.download_and_prepare(**kwargs)
    except BaseException:
        for d, old in before.items():
            if old is None:
                shutil.rmtree(d, ignore_errors=True)
            elif d.is_dir():
                for entry in set(os.listdir(d)) - old:
                    p = d / entry
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise


def _decode(spec: Official, root: pathlib.Path, download: bool) -> dict:
    import tensorflow_datasets as tfds

    def builder():
        return tfds.builder(spec.tfds_name, data_dir=str(root))
    builder_cls = tfds.builder_cls(spec.tfds_name)   # its checksums, without touching root
    if (root / spec.tfds_name).is_dir() and builder().is_prepared():
        return _from_tfds(builder(), spec)
    found = _find_files(spec, root)
    if found:
        directory, files, reader = found
        if _tfds_accepts(builder_cls, directory):
            try:
                _prepare_cleanly(builder(), download_config=tfds.download.DownloadConfig(
                    manual_dir=str(directory)))
            except Exception as e:
                raise DataError(f'--dataset={spec.name}: tfds could not prepare the files in '
                                f'{directory} ({one_line(e)})')
            return _from_tfds(builder(), spec)
        try:
            return reader({f: directory / f for f in files})
        except DataError:
            raise
        except Exception as e:  # tarfile/gzip/pickle/zlib errors from a damaged file
            raise DataError(f'--dataset={spec.name}: cannot read {", ".join(files)} in {directory} '
                            f'({one_line(e)}); '
                            f'expected the official files, unmodified')
    where = f'put {spec.expected()} in {manual_dir(root)}/ (see README, "Datasets")'
    if not download:
        raise DataError(f'--dataset={spec.name}: no data under {root}; {where}')
    unreachable = _hosts_resolve(builder_cls)
    if unreachable:
        raise DataError(f'--dataset={spec.name}: no data under {root} and {unreachable} cannot be '
                        f'resolved (offline?); {where}')
    try:
        _prepare_cleanly(builder())
    except Exception as e:
        raise DataError(f'--dataset={spec.name}: tfds download failed ({one_line(e)}); {where}')
    return _from_tfds(builder(), spec)


def _check(spec: Official, arrays: dict, source: str) -> dict:
    for part in ('train', 'test'):
        x, y = arrays[f'x_{part}'], arrays[f'y_{part}']
        if len(x) != len(y) or x.ndim != 4 or x.dtype != np.uint8:
            raise DataError(f'{source}: {part} images {x.shape} {x.dtype} and labels {y.shape} '
                            f'do not form a uint8 NHWC dataset')
        if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
            raise DataError(f'{source}: {part} labels span {y.min()}..{y.max()}, expected '
                            f'0..{spec.num_classes - 1}')
    return arrays


def load_official(name: str, data_dir: Optional[str] = None, download: bool = True) -> Arrays:
    spec = OFFICIAL[name]
    root = data_root(data_dir)
    cache = root / 'ssl_ema' / f'{name}.v{CACHE_VERSION}.npz'
    if cache.is_file():
        try:
            with np.load(cache) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as e:
            raise DataError(f'{cache} is damaged ({type(e).__name__}); delete it to rebuild')
    else:
        arrays = _check(spec, _decode(spec, root, download), f'--dataset={name}')
        try:
            write_atomically(cache, lambda f: np.savez(f, **arrays))
        except OSError as e:   # a read-only data_dir still trains, just without the cache
            logging.warning('cannot cache %s at %s: %s', name, cache, e)
    return Arrays(name, arrays['x_train'], arrays['y_train'], arrays['x_test'], arrays['y_test'],
                  num_classes=spec.num_classes, x_extra=arrays.get('x_extra'), flip=spec.flip,
                  class_names=spec.class_names)


def _register(name):
    def loader(data_dir=None, download=True):
        return load_official(name, data_dir, download)
    loader.__doc__ = f'{name} through tensorflow-datasets or its official files (module docstring).'
    register(name)(loader)


for _name in OFFICIAL:
    _register(_name)
