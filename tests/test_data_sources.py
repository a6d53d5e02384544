"""The public datasets offline: tiny archives written here in the official formats, read back through
tfds (when tfds accepts the files) or our readers of the official format; the real Fashion-MNIST
from Debian's package; the cache; and every missing/corrupt-file error."""
import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import socket
import tarfile

import numpy as np
import pytest

from ssl_ema.data import official
from ssl_ema.base.errors import DataError
from ssl_ema.data.datasets import load

FASHION_DIR = '/usr/share/datasets/fashion-mnist'


def _images(n, h, w, c, seed):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, c)).astype(np.uint8)


def _labels(n, k, seed):
    return (np.arange(n) + seed) % k   # every class present


def _tar_gz(path, members):
    with tarfile.open(path, 'w:gz') as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_cifar(manual, kind, fmt, n_train=10, n_test=4):
    """A CIFAR-10/100 archive in its official layout; returns the arrays it holds."""
    k = 10 if kind == 'cifar10' else 100
    batches = 5 if kind == 'cifar10' else 1
    x = _images(n_train * batches + n_test, 32, 32, 3, seed=1)
    y = _labels(len(x), k, seed=3)
    chw = x.transpose(0, 3, 1, 2).reshape(len(x), -1)    # the files store channel-major pixels
    if kind == 'cifar10':
        names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
        prefix = 'cifar-10-batches-bin/' if fmt == 'binary' else 'cifar-10-batches-py/'
    else:
        names = ['train', 'test']
        prefix = 'cifar-100-binary/' if fmt == 'binary' else 'cifar-100-python/'
    chunks = np.split(np.arange(len(x)), np.cumsum([n_train] * batches))
    members = {}
    for name, idx in zip(names, chunks):
        if fmt == 'binary':
            labels = [y[idx, None]] if k == 10 else [y[idx, None] // 5, y[idx, None]]  # coarse, fine
            members[prefix + name + '.bin'] = np.concatenate(labels + [chw[idx]], 1).astype(
                np.uint8).tobytes()
        else:
            key = b'labels' if k == 10 else b'fine_labels'
            members[prefix + name] = pickle.dumps({b'data': chw[idx], key: y[idx].tolist()})
    if fmt == 'binary':   # tfds reads the class names too
        names_file = 'batches.meta.txt' if k == 10 else 'fine_label_names.txt'
        members[prefix + names_file] = '\n'.join(f'class{i}' for i in range(k)).encode()
        if k == 100:
            members[prefix + 'coarse_label_names.txt'] = '\n'.join(
                f'super{i}' for i in range(20)).encode()
    archive = f'{"cifar-10" if k == 10 else "cifar-100"}-{fmt}.tar.gz'
    os.makedirs(manual, exist_ok=True)
    _tar_gz(os.path.join(manual, archive), members)
    n = n_train * batches
    return x[:n], y[:n], x[n:], y[n:]


def _idx(array):
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def write_mnist(manual, n_train=20, n_test=10):
    x = _images(n_train + n_test, 28, 28, 1, seed=2)[..., 0]
    y = _labels(n_train + n_test, 10, seed=1)
    os.makedirs(manual, exist_ok=True)
    for name, array in [('train-images-idx3-ubyte.gz', x[:n_train]),
                        ('train-labels-idx1-ubyte.gz', y[:n_train]),
                        ('t10k-images-idx3-ubyte.gz', x[n_train:]),
                        ('t10k-labels-idx1-ubyte.gz', y[n_train:])]:
        with open(os.path.join(manual, name), 'wb') as f:
            f.write(_idx(array))
    return x[:n_train, ..., None], y[:n_train], x[n_train:, ..., None], y[n_train:]


def write_svhn(manual, name, n, seed):
    scipy_io = pytest.importorskip('scipy.io')
    x = _images(n, 32, 32, 3, seed)
    y = _labels(n, 10, seed)
    os.makedirs(manual, exist_ok=True)
    # Official layout: X is [32, 32, 3, N]; y is [N, 1] with digit 0 stored as 10.
    scipy_io.savemat(os.path.join(manual, name), {'X': np.moveaxis(x, 0, -1),
                                                  'y': np.where(y == 0, 10, y)[:, None]})
    return x, y


def write_stl10(manual, n_train=4, n_test=3, n_unlabeled=5):
    x = _images(n_train + n_test + n_unlabeled, 96, 96, 3, seed=4)
    y = _labels(n_train + n_test, 10, seed=2)
    # STL-10 stores each image column-major: [3, W, H] per image.
    raw = x.transpose(0, 3, 2, 1)
    members = {
        'stl10_binary/train_X.bin': raw[:n_train].tobytes(),
        'stl10_binary/train_y.bin': (y[:n_train] + 1).astype(np.uint8).tobytes(),
        'stl10_binary/test_X.bin': raw[n_train:n_train + n_test].tobytes(),
        'stl10_binary/test_y.bin': (y[n_train:] + 1).astype(np.uint8).tobytes(),
        'stl10_binary/unlabeled_X.bin': raw[n_train + n_test:].tobytes(),
        'stl10_binary/class_names.txt': b'\n'.join(b'c%d' % i for i in range(10)),
    }
    os.makedirs(manual, exist_ok=True)
    _tar_gz(os.path.join(manual, 'stl10_binary.tar.gz'), members)
    return x[:n_train], y[:n_train], x[n_train:n_train + n_test], y[n_train:], x[n_train + n_test:]


def assert_arrays(arrays, x_train, y_train, x_test, y_test):
    np.testing.assert_array_equal(arrays.x_train, x_train)
    np.testing.assert_array_equal(arrays.y_train, y_train)
    np.testing.assert_array_equal(arrays.x_test, x_test)
    np.testing.assert_array_equal(arrays.y_test, y_test)
    assert arrays.x_train.dtype == np.uint8 and arrays.y_train.dtype == np.int64


@pytest.fixture
def root(tmp_path):
    return tmp_path / 'tfds'


def manual(root):
    return os.path.join(root, 'downloads', 'manual')


@pytest.mark.parametrize('kind', ['cifar10', 'cifar100'])
@pytest.mark.parametrize('fmt', ['binary', 'python'])
def test_cifar_archives_read_offline(root, kind, fmt):
    expected = write_cifar(manual(root), kind, fmt)
    arrays = load(kind, str(root), download=False)
    assert_arrays(arrays, *expected)
    assert arrays.num_classes == (10 if kind == 'cifar10' else 100) and arrays.flip


def _register_with_tfds(monkeypatch, tfds_name, manual_dir):
    """Make tfds' registered checksums those of the tiny files, as they are for the real ones."""
    import tensorflow_datasets as tfds
    builder_cls = type(tfds.builder(tfds_name))
    infos = {}
    for url, info in builder_cls.url_infos.items():
        path = os.path.join(manual_dir, info.filename)
        with open(path, 'rb') as f:
            data = f.read()
        infos[url] = type(info)(size=len(data), checksum=hashlib.sha256(data).hexdigest(),
                                filename=info.filename)
    monkeypatch.setattr(builder_cls, 'url_infos', infos)


def _write_svhn_all(manual_dir):
    x_train, y_train = write_svhn(manual_dir, 'train_32x32.mat', 12, seed=1)
    x_test, y_test = write_svhn(manual_dir, 'test_32x32.mat', 5, seed=2)
    x_extra, _ = write_svhn(manual_dir, 'extra_32x32.mat', 7, seed=3)
    return x_train, y_train, x_test, y_test, x_extra


TFDS_CASES = {   # --dataset: writer of its official files; tfds' MNIST hard-codes 60,000 images
    'cifar10': lambda m: write_cifar(m, 'cifar10', 'binary'),
    'cifar100': lambda m: write_cifar(m, 'cifar100', 'binary'),
    'svhn_extra': _write_svhn_all,
    'stl10': write_stl10,
}


@pytest.mark.parametrize('name', sorted(TFDS_CASES))
def test_official_files_go_through_tfds_when_checksums_match(root, monkeypatch, name):
    """Byte-identical official files are prepared by tfds itself (manual_dir), not our reader, and
    come out in the official order: the same arrays as our reader gives, so the same splits."""
    import tensorflow_datasets as tfds
    expected = TFDS_CASES[name](manual(root))
    spec = official.OFFICIAL[name]
    _register_with_tfds(monkeypatch, spec.tfds_name, manual(root))

    def refuse(paths):
        raise AssertionError('our reader ran although tfds accepts the files')
    monkeypatch.setitem(official.OFFICIAL, name, dataclasses.replace(
        spec, file_sets=((spec.file_sets[0][0], refuse),)))
    arrays = load(name, str(root), download=False)
    assert tfds.builder(spec.tfds_name, data_dir=str(root)).is_prepared()
    assert_arrays(arrays, *expected[:4])
    if len(expected) > 4:
        np.testing.assert_array_equal(arrays.x_extra, expected[4])


def test_mnist_idx_with_other_checksum_read_directly(root):
    expected = write_mnist(manual(root))
    arrays = load('mnist', str(root), download=False)
    assert_arrays(arrays, *expected)
    assert not arrays.flip   # digits must not be mirrored


def test_svhn_mat_files(root):
    x_train, y_train = write_svhn(manual(root), 'train_32x32.mat', 12, seed=1)
    x_test, y_test = write_svhn(manual(root), 'test_32x32.mat', 5, seed=2)
    arrays = load('svhn', str(root), download=False)
    assert_arrays(arrays, x_train, y_train, x_test, y_test)
    assert 0 in arrays.y_train and arrays.y_train.max() == 9   # label 10 means digit 0
    assert arrays.x_extra is None and not arrays.flip
    with pytest.raises(DataError, match='extra_32x32.mat'):
        load('svhn_extra', str(root), download=False)
    x_extra, _ = write_svhn(manual(root), 'extra_32x32.mat', 7, seed=3)
    with_extra = load('svhn_extra', str(root), download=False)
    np.testing.assert_array_equal(with_extra.x_extra, x_extra)
    assert_arrays(with_extra, x_train, y_train, x_test, y_test)


def test_stl10_binary_archive(root):
    x_train, y_train, x_test, y_test, x_unlabeled = write_stl10(manual(root))
    arrays = load('stl10', str(root), download=False)
    assert_arrays(arrays, x_train, y_train, x_test, y_test)
    np.testing.assert_array_equal(arrays.x_extra, x_unlabeled)
    assert arrays.image_shape == (96, 96, 3)


def test_decoded_arrays_are_cached_atomically(root):
    expected = write_mnist(manual(root))
    load('mnist', str(root), download=False)
    cached = os.listdir(os.path.join(root, 'ssl_ema'))
    assert cached == [f'mnist.v{official.CACHE_VERSION}.npz']      # no temporary left over
    for name in os.listdir(manual(root)):
        os.remove(os.path.join(manual(root), name))
    assert_arrays(load('mnist', str(root), download=False), *expected)   # from the cache alone


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR),
                    reason=f'{FASHION_DIR} absent: apt-get install -y dataset-fashion-mnist')
def test_fashion_mnist_from_debian_package(root):
    arrays = load('fashion_mnist', str(root), download=False)   # nothing under root: found itself
    assert arrays.x_train.shape == (60000, 28, 28, 1) and arrays.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(arrays.y_train).tolist() == [6000] * 10
    assert np.bincount(arrays.y_test).tolist() == [1000] * 10
    assert arrays.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]   # the official order
    assert arrays.x_train.max() == 255 and arrays.flip


def test_missing_archive_names_the_file_and_where(root):
    with pytest.raises(DataError) as err:
        load('cifar10', str(root), download=False)
    message = str(err.value)
    assert '\n' not in message
    assert 'cifar-10-binary.tar.gz' in message and manual(root) in message
    assert not os.path.exists(root) or not os.listdir(root) or 'ssl_ema' not in os.listdir(root)


def test_offline_download_fails_fast_and_leaves_nothing(root, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror('Name or service not known')
    monkeypatch.setattr(socket, 'getaddrinfo', no_dns)
    with pytest.raises(DataError, match=r'cannot be resolved \(offline\?\).*train_32x32.mat'):
        load('svhn', str(root), download=True)
    assert not os.path.exists(os.path.join(root, 'ssl_ema'))
    assert not os.path.exists(os.path.join(root, 'downloads', 'svhn_cropped'))


@pytest.mark.parametrize('damage', ['truncate', 'garbage'])
def test_corrupt_archive(root, damage):
    write_cifar(manual(root), 'cifar10', 'python')
    path = os.path.join(manual(root), 'cifar-10-python.tar.gz')
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2] if damage == 'truncate' else b'not an archive' * 100)
    with pytest.raises(DataError, match='cifar-10-python.tar.gz') as err:
        load('cifar10', str(root), download=False)
    assert '\n' not in str(err.value)
    assert not os.path.exists(os.path.join(root, 'ssl_ema'))   # nothing half-written


def test_corrupt_idx_and_mat(root):
    write_mnist(manual(root))
    path = os.path.join(manual(root), 'train-images-idx3-ubyte.gz')
    with open(path, 'wb') as f:
        f.write(gzip.compress(bytes([0, 0, 8, 3]) + np.asarray([5, 28, 28], '>u4').tobytes() + b'x'))
    with pytest.raises(DataError, match='train-images-idx3-ubyte.gz.*truncated'):
        load('mnist', str(root), download=False)
    os.makedirs(manual(root), exist_ok=True)
    for name in ('train_32x32.mat', 'test_32x32.mat'):
        with open(os.path.join(manual(root), name), 'wb') as f:
            f.write(b'MATLAB? no')
    with pytest.raises(DataError, match='train_32x32.mat'):
        load('svhn', str(root), download=False)
