"""Label splits, the split export command, and the pipeline's batches as a function of (seed, step)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from ssl_ema.data import SSLData
from ssl_ema.data.datasets import Arrays
from ssl_ema.base.errors import DataError
from ssl_ema.data.splits import make_split

LABELS = np.repeat(np.arange(10), 100)[np.random.RandomState(0).permutation(1000)]


def test_split_is_class_balanced_and_disjoint_from_valid():
    split = make_split(LABELS, 250 // 5 * 2, 200, seed=1, num_classes=10)   # 100 labels
    assert np.bincount(LABELS[split.labeled], minlength=10).tolist() == [10] * 10
    assert len(np.intersect1d(split.labeled, split.valid)) == 0
    assert len(split.valid) == 200 and len(np.unique(split.labeled)) == 100
    # The unlabeled pool is everything outside validation, labeled images included.
    np.testing.assert_array_equal(np.sort(np.concatenate([split.unlabeled, split.valid])), np.arange(1000))
    assert np.isin(split.labeled, split.unlabeled).all()


def test_split_deterministic_per_seed_and_different_across_seeds():
    a, b = make_split(LABELS, 40, 100, 1, 10), make_split(LABELS, 40, 100, 1, 10)
    np.testing.assert_array_equal(a.labeled, b.labeled)
    c = make_split(LABELS, 40, 100, 2, 10)
    assert not np.array_equal(a.labeled, c.labeled)
    np.testing.assert_array_equal(a.valid, c.valid)      # validation is the same for every seed


@pytest.mark.parametrize('labels, valid, message', [
    (1010, 0, '--labels=1010 is larger than the training set: 1000 images'),
    (990, 100, 'larger than the training set'),
    (25, 0, 'must be a multiple of the 10 classes'),
    (0, 0, 'must be positive'),
    (20, 1000, '--valid=1000 must be in'),
])
def test_split_errors(labels, valid, message):
    with pytest.raises(DataError, match=message) as err:
        make_split(LABELS, labels, valid, 1, 10)
    assert '\n' not in str(err.value)


def test_class_too_small_for_the_labels():
    labels = np.array([0] * 50 + [1] * 5)
    with pytest.raises(DataError, match='class 1 has only 5.*--labels<=10'):
        make_split(labels, 20, 0, 1, 2)


def test_export_split_command(tmp_path):
    out = tmp_path / 'split.json'
    result = subprocess.run(
        [sys.executable, '-m', 'ssl_ema.data.export_split', '--dataset=digits', '--labels=30',
         '--valid=100', '--seed=2', f'--out={out}'],
        capture_output=True, text=True, timeout=120, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    from ssl_ema.data import load
    expected = make_split(load('digits').y_train, 30, 100, 2, 10)
    assert record['labeled'] == expected.labeled.tolist() and record['valid'] == expected.valid.tolist()
    assert record['labeled_per_class'] == [3] * 10 and '30 labeled' in result.stdout


def test_export_split_defaults_are_the_training_defaults(tmp_path):
    """Without flags, the exported split is the one `python -m ssl_ema.train` trains on."""
    out = tmp_path / 'split.json'
    result = subprocess.run(
        [sys.executable, '-m', 'ssl_ema.data.export_split', f'--out={out}'],
        capture_output=True, text=True, timeout=120, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    from ssl_ema.base.config import TrainConfig
    from ssl_ema.data import build
    cfg = TrainConfig()
    trained = build(cfg.dataset, cfg.labels, cfg.valid, cfg.seed).split.as_dict()
    assert (record['dataset'], record['num_labeled'], record['num_valid'], record['seed']) == (
        cfg.dataset, cfg.labels, cfg.valid, cfg.seed)
    assert {k: record[k] for k in trained} == trained


@pytest.fixture(scope='module')
def tiny_data():
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, (60, 8, 8, 3)).astype(np.uint8)
    y = np.arange(60) % 3
    arrays = Arrays('tiny', x, y, x[:6], y[:6], num_classes=3)
    return SSLData(arrays, make_split(y, 6, 6, seed=1, num_classes=3), seed=1, augment='weak')


def _take(dataset, n):
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in dataset.take(n)]


def test_batches_are_a_function_of_seed_and_step(tiny_data):
    """A stream started at step k is the tail of the stream started at 0 (exact resume)."""
    views = ('weak', 'strong')
    full = _take(tiny_data.train(batch=4, uratio=2, views=views), 6)
    resumed = _take(tiny_data.train(batch=4, uratio=2, views=views, start_step=3), 3)
    for a, b in zip(full[3:], resumed):
        for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
            np.testing.assert_array_equal(x, y)
    (x, labels), (weak, strong) = full[0]
    assert x.shape == (4, 8, 8, 3) and weak.shape == strong.shape == (8, 8, 8, 3)
    assert not np.array_equal(weak, strong)                 # independent views of the same images
    # Normalised with the training statistics: the range of (0..255 - mean) / std, not 0..1.
    lo, hi = (0 - tiny_data.mean) / tiny_data.std, (255 - tiny_data.mean) / tiny_data.std
    assert (weak >= lo.min() - 1e-4).all() and (strong <= hi.max() + 1e-4).all()
    assert strong.min() < -1 and strong.max() > 1


def test_labeled_stream_covers_labeled_images_each_epoch(tiny_data):
    batches = _take(tiny_data.labeled(batch=3), 2)          # 6 labeled images = one epoch
    labels = np.concatenate([b[1] for b in batches])
    assert sorted(labels.tolist()) == sorted(tiny_data.arrays.y_train[tiny_data.split.labeled].tolist())


def test_labeled_augment_changes_the_labeled_batch_alone(tiny_data):
    """--labeled_augment=strong: the labeled batch is the strong augmentation of the same images
    (same labels, same draws' seed), and the unlabeled views stay as --augment makes them."""
    views = ('weak', 'strong')
    (x, y), unlabeled = _take(tiny_data.train(batch=4, uratio=2, views=views), 1)[0]
    (xs, ys), unlabeled_s = _take(tiny_data.train(batch=4, uratio=2, views=views,
                                                  labeled_augment='strong'), 1)[0]
    np.testing.assert_array_equal(y, ys)
    for a, b in zip(unlabeled, unlabeled_s):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(x, xs)
    (none_x, none_y), = _take(tiny_data.labeled(batch=4, augment='none'), 1)
    np.testing.assert_array_equal(none_y, y)
    raw = tiny_data.arrays.x_train[tiny_data.split.labeled]
    # 'none' is the labeled images themselves, normalised: the augmentations start from them.
    assert any(np.allclose(none_x[0], tiny_data.normalize(r).numpy(), atol=1e-5) for r in raw)
    with pytest.raises(Exception, match='--labeled_augment=bogus is unknown'):
        tiny_data.labeled(batch=4, augment='bogus')


def test_augment_fill_edge_keeps_a_plain_background():
    """--augment_fill=edge on black images: every view, labeled and unlabeled, weak and strong,
    stays black, where the anchors' fills bring grey in (Cutout, RandAugment's geometric ops);
    an unknown fill is refused."""
    x = np.zeros((40, 8, 8, 1), np.uint8)
    y = np.arange(40) % 2
    data = SSLData(Arrays('black', x, y, x[:4], y[:4], num_classes=2),
                   make_split(y, 4, 0, seed=1, num_classes=2), seed=1)
    black = data.normalize(np.zeros(1, np.uint8)).numpy()[0]
    views = ('weak', 'strong')
    (lx, _), unlabeled = _take(data.train(batch=4, uratio=4, views=views, fill='edge',
                                          labeled_augment='strong'), 1)[0]
    for v in (lx,) + tuple(unlabeled):
        np.testing.assert_array_equal(v, black)
    (lx, _), (weak, strong) = _take(data.train(batch=4, uratio=4, views=views,
                                               labeled_augment='strong'), 1)[0]
    np.testing.assert_array_equal(weak, black)               # reflect padding of black is black
    assert (strong != black).any() and (lx != black).any()   # grey squares and corners
    with pytest.raises(Exception, match='--augment_fill=red is unknown'):
        data.labeled(batch=4, fill='red')
