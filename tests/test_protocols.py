"""Split protocols (data/splits.py): long-tailed parts and class mismatch over any source."""
import os

import numpy as np
import pytest

from ssl_ema.base.errors import ConfigError
from ssl_ema.data.datasets import Arrays
from ssl_ema.data.splits import (Protocol, known_arrays, long_tail_counts, make_split,
                                 protocol_split)

# 10 classes of 400 images each, shuffled.
LABELS = np.repeat(np.arange(10), 400)[np.random.RandomState(0).permutation(4000)]


def test_long_tail_counts_follow_the_formula():
    # N_c = 1500 * 100^(-(c-1)/9), rounded down: 100^(-1/9) = 0.59948 -> 899.2 -> 899, ...
    assert long_tail_counts(1500, 100, 10) == [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15]
    assert long_tail_counts(3000, 100, 10)[-1] == 30   # the tail is exactly M_1 / gamma
    assert long_tail_counts(100, 4, 3) == [100, 50, 25]


@pytest.mark.parametrize('pool_order, pool', [
    ('consistent', [200, 100, 50]), ('uniform', [200, 200, 200]), ('reversed', [50, 100, 200])])
def test_long_tailed_split_counts_and_disjoint_pool(pool_order, pool):
    labels = LABELS % 3   # three classes
    protocol = Protocol(labeled_head=100, unlabeled_head=200, imbalance_ratio=4,
                        class_order='2,0,1', pool_order=pool_order)
    split = protocol_split(labels, 175, 100, 1, 3, protocol)
    # class_order 2,0,1: class 2 is the head (100 labeled), class 0 next (50), class 1 tail (25).
    assert np.bincount(labels[split.labeled], minlength=3).tolist() == [50, 25, 100]
    assert np.bincount(labels[split.unlabeled], minlength=3).tolist() == [pool[1], pool[2],
                                                                          pool[0]]
    assert not np.intersect1d(split.labeled, split.unlabeled).size
    assert not np.intersect1d(split.valid, np.concatenate([split.labeled, split.unlabeled])).size
    record = split.as_dict()['protocol']
    assert record['labeled_per_class'] == [50, 25, 100] and record['class_order'] == [2, 0, 1]


def test_mismatch_keeps_the_pool_size_and_the_fraction():
    protocol = dict(known_classes='0-5', pool_size=1000)
    pools = {m: protocol_split(LABELS, 60, 200, 1, 10, Protocol(mismatch=m, **protocol))
             for m in (0., 0.25, 0.5, 1.)}
    for m, split in pools.items():
        assert len(split.unlabeled) == 1000
        assert (LABELS[split.unlabeled] >= 6).sum() == m * 1000
        assert set(LABELS[split.labeled]) <= set(range(6)) and (LABELS[split.valid] < 6).all()
        assert not np.intersect1d(split.labeled, split.unlabeled).size
        assert np.bincount(LABELS[split.labeled]).tolist() == [10] * 6
    np.testing.assert_array_equal(pools[0.].labeled, pools[1.].labeled)   # same labeled set
    # The default size is the largest every level can supply: the 4 other classes' 1600 images.
    default = protocol_split(LABELS, 60, 200, 1, 10, Protocol(known_classes='0-5'))
    assert len(default.unlabeled) == 1600


def test_default_protocol_is_the_balanced_split():
    a = make_split(LABELS, 40, 100, 3, 10)
    b = protocol_split(LABELS, 40, 100, 3, 10, Protocol())
    assert a.as_dict() == b.as_dict() and 'protocol' not in b.as_dict()


@pytest.mark.parametrize('flags, message', [
    (dict(labeled_head=100), '--labeled_head=100 needs --unlabeled_head'),
    (dict(labeled_head=100, unlabeled_head=10, imbalance_ratio=4), r'makes 547 labeled .*: give '
                                                                   r'--labels=547$'),
    (dict(labeled_head=4, unlabeled_head=390, imbalance_ratio=1), 'class 0 .* needs 4 labeled '
                                                                  r'\+ 390 pool'),
    (dict(mismatch=0.5), '--mismatch and --pool_size need --known_classes'),
    (dict(known_classes='0-10'), '--known_classes=0-10 must name distinct classes among 0..9'),
    (dict(known_classes='0-9'), 'names every class'),
    (dict(known_classes='0-4', pool_size=5000), '--pool_size=5000 .* has only'),
    (dict(pool_order='random'), '--pool_order=random is unknown; valid: consistent'),
    (dict(pool_order='reversed'), '--pool_order need --labeled_head'),
    (dict(known_classes='0-4', unlabeled_head=10), 'need --labeled_head'),
])
def test_protocol_errors_are_one_line(flags, message):
    with pytest.raises(ConfigError, match=message) as err:
        protocol_split(LABELS, 40, 100, 1, 10, Protocol(**flags))
    assert '\n' not in str(err.value)


def test_extra_unlabeled_images_cannot_be_profiled():
    with pytest.raises(ConfigError, match='extra unlabeled images have none'):
        protocol_split(LABELS, 60, 0, 1, 10, Protocol(known_classes='0-5'),
                       extra=np.zeros((3, 2, 2, 1)))


def test_known_arrays_renumber_and_mark_unknown():
    y = np.array([0, 3, 5, 1, 4])
    arrays = Arrays('t', np.zeros((5, 2, 2, 1), np.uint8), y, np.zeros((5, 2, 2, 1), np.uint8),
                    y, 6, class_names=tuple('abcdef'))
    known = known_arrays(arrays, [5, 3, 0])
    assert known.y_train.tolist() == [2, 1, 0, 3, 3] and known.num_classes == 3
    assert known.class_names == ('f', 'd', 'a')


def test_runs_made_before_the_protocol_flags_resume_under_the_same_name(tmp_path):
    import dataclasses
    import json
    from ssl_ema.algorithms import ALGORITHMS
    from ssl_ema.base.config import TrainConfig
    from ssl_ema.core import run_dir
    cfg, algorithm = TrainConfig(algorithm='fixmatch', recipe='none'), ALGORITHMS['fixmatch']()
    assert run_dir.default_train_dir(cfg, algorithm, 'small_cnn') == os.path.join(
        'experiments', 'digits.50@1', 'fixmatch_small_cnn')
    record = run_dir.run_record(cfg, algorithm)
    old = json.loads(json.dumps(record))
    for f in dataclasses.fields(Protocol):
        del old['config'][f.name]   # a flags.json written before these flags existed
    (tmp_path / 'flags.json').write_text(json.dumps(old))
    assert run_dir.check_compatible(str(tmp_path), record)
    mismatch = dataclasses.replace(cfg, known_classes='0-5', mismatch=0.5)
    assert run_dir.default_train_dir(mismatch, algorithm, 'small_cnn').endswith(
        'fixmatch_small_cnn_known_classes0-5_mismatch0.5')
    with pytest.raises(ConfigError, match='--known_classes='):
        run_dir.check_compatible(str(tmp_path), run_dir.run_record(mismatch, algorithm))
