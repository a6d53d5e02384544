"""--dataset=npz:PATH and --dataset=folder:PATH: they load, carve a reproducible test part when
there is none, train a few steps, and every bad input gets its one-line message."""
import os

import numpy as np
import pytest
import tensorflow as tf

from ssl_ema.data.custom import carve_test
from ssl_ema.base.errors import DataError
from ssl_ema.data.datasets import load


def _save_npz(path, **arrays):
    np.savez(path, **arrays)
    return f'npz:{path}'


def _images(n, h=8, w=8, c=3, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, c)).astype(np.uint8)


def test_npz_with_all_parts(tmp_path):
    x, y = _images(30), np.arange(30) % 3
    name = _save_npz(tmp_path / 'd.npz', x_train=x, y_train=y, x_test=_images(6, seed=1),
                     y_test=np.arange(6) % 3, x_unlabeled=_images(9, seed=2))
    arrays = load(name)
    np.testing.assert_array_equal(arrays.x_train, x)
    assert arrays.num_classes == 3 and arrays.x_extra.shape == (9, 8, 8, 3)
    assert arrays.x_test.shape == (6, 8, 8, 3) and arrays.y_train.dtype == np.int64


def test_npz_without_test_part_carves_ten_percent_per_class(tmp_path):
    x, y = _images(120, c=1)[..., 0], np.arange(120) % 4        # [N, H, W] grey images
    name = _save_npz(tmp_path / 'd.npz', x_train=x, y_train=y)
    first, second = load(name), load(name)
    assert first.x_train.shape == (108, 8, 8, 1) and first.x_test.shape == (12, 8, 8, 1)
    np.testing.assert_array_equal(first.y_test, second.y_test)          # reproducible
    np.testing.assert_array_equal(first.x_test, second.x_test)
    assert np.bincount(first.y_test).tolist() == [3, 3, 3, 3]   # 10% of each class's 30
    assert first.x_extra is None


def test_carve_test_is_disjoint_and_keeps_singletons_in_training():
    labels = np.array([0] * 20 + [1] * 20 + [2])
    train, test = carve_test(labels)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(labels)
    assert 40 in train and np.bincount(labels[test]).tolist() == [2, 2]


def test_npz_float_images_in_unit_range(tmp_path):
    x = np.random.RandomState(0).rand(20, 4, 4, 3).astype(np.float32)
    arrays = load(_save_npz(tmp_path / 'f.npz', x_train=x, y_train=np.arange(20) % 2,
                            x_test=x[:4], y_test=np.arange(4) % 2))
    np.testing.assert_array_equal(arrays.x_train, np.round(x * 255).astype(np.uint8))


def _write_png(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(str(path), tf.io.encode_png(image))


def _folder(root, classes=('cat', 'dog'), per_class=6, size=8, unlabeled=3):
    rng = np.random.RandomState(0)
    for c in classes:
        for i in range(per_class):
            _write_png(os.path.join(root, c, f'{i}.png'), rng.randint(0, 256, (size, size, 3), np.uint8))
    for i in range(unlabeled):
        _write_png(os.path.join(root, 'unlabeled', f'u{i}.png'), rng.randint(0, 256, (size, size, 3), np.uint8))
    return f'folder:{root}'


def test_folder_classes_unlabeled_and_carved_test(tmp_path):
    arrays = load(_folder(tmp_path / 'pets'))
    assert arrays.num_classes == 2
    assert len(arrays.y_train) + len(arrays.y_test) == 12 and len(arrays.y_test) == 2
    assert arrays.x_extra.shape == (3, 8, 8, 3) and arrays.x_train.dtype == np.uint8
    first_cat = tf.io.decode_png(tf.io.read_file(str(tmp_path / 'pets' / 'cat' / '0.png'))).numpy()
    assert any(np.array_equal(first_cat, x) for x in np.concatenate([arrays.x_train, arrays.x_test]))


def test_folder_with_train_and_test(tmp_path):
    _folder(tmp_path / 'd' / 'train', unlabeled=2)
    _folder(tmp_path / 'd' / 'test', per_class=2, unlabeled=0)
    arrays = load(f'folder:{tmp_path / "d"}')
    assert len(arrays.y_train) == 12 and arrays.y_test.tolist() == [0, 0, 1, 1]
    assert arrays.x_extra.shape == (2, 8, 8, 3)


@pytest.mark.parametrize('kind', ['npz', 'folder'])
def test_custom_data_trains_a_few_steps(tmp_path, kind):
    from conftest import tiny_config
    from ssl_ema import algorithms
    from conftest import run
    if kind == 'npz':
        name = _save_npz(tmp_path / 'd.npz', x_train=_images(40), y_train=np.arange(40) % 2)
    else:
        name = _folder(tmp_path / 'pets', per_class=20)
    cfg = tiny_config(dataset=name, labels=4, valid=4, train_steps=4, batch=4, eval_every_kimg=0.016,
                      log_every_steps=2, train_dir=str(tmp_path / 'run'))
    summary = run(cfg, algorithms.create('mean_teacher'), log=lambda *a: None)
    assert 0 <= summary['ema']['test']['last'] <= 100
    assert os.path.exists(tmp_path / 'run' / 'split.json')


# ---- bad input -----------------------------------------------------------------------------------

def _message(name, **kwargs):
    with pytest.raises(DataError) as err:
        load(name, **kwargs)
    assert '\n' not in str(err.value)
    return str(err.value)


def test_folder_with_a_single_class(tmp_path):
    msg = _message(_folder(tmp_path / 'one', classes=('cat',)))
    assert 'has 1 class folder' in msg and 'at least 2' in msg and str(tmp_path / 'one') in msg


def test_folder_with_mixed_sizes_reads_them_at_the_median_size(tmp_path, capsys):
    name = _folder(tmp_path / 'mixed')
    _write_png(tmp_path / 'mixed' / 'dog' / 'big.png', np.zeros((10, 12, 3), np.uint8))
    arrays = load(name)   # (issue 20: it used to be refused, with no way to resize)
    assert arrays.image_shape == (8, 8, 3) and len(arrays.y_train) + len(arrays.y_test) == 13
    assert 'mixed sizes' in capsys.readouterr().err
    assert load(name, image_size=(6, 4)).image_shape == (6, 4, 3)


def test_folder_missing(tmp_path):
    assert 'no such directory' in _message(f'folder:{tmp_path / "nope"}')


def test_npz_missing_arrays(tmp_path):
    msg = _message(_save_npz(tmp_path / 'bad.npz', images=_images(4), y_train=np.arange(4)))
    assert 'lacks x_train' in msg and 'bad.npz' in msg
    msg = _message(_save_npz(tmp_path / 'half.npz', x_train=_images(4), y_train=np.arange(4) % 2,
                             x_test=_images(2)))
    assert 'lacks y_test' in msg


def test_npz_mixed_sizes_and_bad_labels(tmp_path):
    msg = _message(_save_npz(tmp_path / 'm.npz', x_train=_images(4), y_train=np.arange(4) % 2,
                             x_unlabeled=_images(3, h=9)))
    assert 'mixed sizes' in msg
    msg = _message(_save_npz(tmp_path / 'one.npz', x_train=_images(4), y_train=np.zeros(4, int)))
    assert 'at least 2' in msg
    msg = _message(_save_npz(tmp_path / 'n.npz', x_train=_images(4), y_train=np.arange(3)))
    assert 'expected 4 integer labels' in msg


def test_npz_empty_arrays(tmp_path):
    msg = _message(_save_npz(tmp_path / 'e.npz', x_train=np.zeros((0, 8, 8, 3), np.float32),
                             y_train=np.zeros(0, np.int64)))
    assert 'x_train is empty (shape (0, 8, 8, 3))' in msg and 'e.npz' in msg
    msg = _message(_save_npz(tmp_path / 'u.npz', x_train=_images(4), y_train=np.arange(4) % 2,
                             x_unlabeled=np.zeros((0, 8, 8, 3), np.float32)))
    assert 'x_unlabeled is empty' in msg


def test_npz_not_a_file(tmp_path):
    assert 'no such file' in _message(f'npz:{tmp_path / "missing.npz"}')
    (tmp_path / 'junk.npz').write_bytes(b'not a zip')
    assert 'not a readable .npz' in _message(f'npz:{tmp_path / "junk.npz"}')


def test_unknown_dataset_lists_the_valid_ones():
    msg = _message('imagenet')
    assert 'cifar10' in msg and 'fashion_mnist' in msg and 'npz:' in msg


HOST_ARRAYS = '''
import tensorflow as tf
cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from ssl_ema import data
with tf.device('/cpu:1'):   # a default device that is not the host's, as the first GPU is
    dataset = data.build('digits', labels=50, valid=200, seed=1)
print(dataset._labels.device, dataset._labeled_x.device, dataset._unlabeled_x.device)
'''


def test_in_memory_images_stay_on_the_host():
    """The in-memory source's eager tensors (the whole labeled and unlabeled parts) are made on
    the host's CPU:0, not on the default device (a GPU's memory); one process, since the CPU
    must be split into two logical devices before TensorFlow starts."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, '-c', HOST_ARRAYS], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    devices = result.stdout.split()
    assert len(devices) == 3 and all(d.endswith('/device:CPU:0') for d in devices), devices
