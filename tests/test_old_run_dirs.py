"""Run directories written before the one engine (core/engine.py) resume with today's code to
the tensors their uninterrupted runs end with: a FixMatch run and a BYOL pretraining run, each
interrupted at step 3 of 4 by the code of commit f7c3b83 (tests/fixtures/old_runs/make.py says
how they were made). On the CPU that made them they are bit-identical to the old code's
uninterrupted run (uninterrupted_sha256.json); another CPU rounds the first three steps
differently (AVX2 against AVX-512: 76 of 90 FixMatch tensors' hashes differ), so the test
compares with today's code's uninterrupted run on this machine, to rounding. A SimMatch run with
--teacher=ema interrupted the same way by the code of commit a5aadac (make_simmatch_ema.py),
before the averages carried its projection head, resumes with averaged heads restarted from the
student's."""
import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np
import tensorflow as tf

from conftest import quiet

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'old_runs')
SETTINGS = dict(dataset='digits', labels=50, valid=200, seed=1, batch=8, train_steps=4,
                eval_every_kimg=2 * 8 / 1024, log_every_steps=1, arch='small_cnn')


def _copy(name, tmp_path):
    train_dir = str(tmp_path / name)
    shutil.copytree(os.path.join(FIXTURES, f'{name}_stopped_at_step_3'), train_dir)
    return train_dir


def _assert_uninterrupted_tensors(train_dir, name, straight_dir):
    """The resumed run's final tensors (those the old uninterrupted run's hashes name) are the
    ones the uninterrupted run in `straight_dir` ended with: the same bytes where the old code's
    hash matches (the fixtures' CPU), else equal to rounding."""
    with open(os.path.join(FIXTURES, 'uninterrupted_sha256.json')) as f:
        expected = json.load(f)[name]
    reader = tf.train.load_checkpoint(os.path.join(train_dir, 'checkpoints'))
    straight = tf.train.load_checkpoint(os.path.join(straight_dir, 'checkpoints'))
    assert tf.train.latest_checkpoint(os.path.join(train_dir, 'checkpoints')).endswith('ckpt-4')
    for key, digest in expected.items():
        got, want = reader.get_tensor(key), straight.get_tensor(key)
        scale = float(np.max(np.abs(want))) if np.size(want) else 0.
        # Each tensor to 3e-3 of its largest value (measured on AVX2: FixMatch's within 5e-5,
        # BYOL's within 1.5e-3, a batch-norm offset of its first layer; one wrong step, e.g. its
        # learning rate, moves the weights by ~3e-2 of theirs); tensors below 1e-3 are rounding
        # noise themselves (a bias before batch norm, whose gradient is 0 but for rounding, and
        # its optimizer slots), left to the hash.
        if (hashlib.sha256(np.ascontiguousarray(got).tobytes()).hexdigest()[:16] != digest
                and scale >= 1e-3):
            np.testing.assert_allclose(got, want, rtol=0, atol=3e-3 * scale, err_msg=key)


def _records(train_dir):
    with open(os.path.join(train_dir, 'evaluations.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_an_old_training_run_resumes_to_the_uninterrupted_tensors(tmp_path):
    from ssl_ema import algorithms
    from ssl_ema.base.config import TrainConfig
    from ssl_ema.core import fitting
    train_dir = _copy('fixmatch', tmp_path)
    before = _records(train_dir)
    lines = []
    cfg = TrainConfig(algorithm='fixmatch', uratio=2, train_dir=train_dir, **SETTINGS)
    fitting.fit(cfg, algorithms.ALGORITHMS['fixmatch'](), log=lines.append)
    assert f'Resuming {train_dir} at step 3/4' in lines
    straight = str(tmp_path / 'straight')
    fitting.fit(dataclasses.replace(cfg, train_dir=straight), algorithms.ALGORITHMS['fixmatch'](),
                log=quiet)
    _assert_uninterrupted_tensors(train_dir, 'fixmatch', straight)
    after = _records(train_dir)
    assert after[:len(before)] == before and [r['step'] for r in after] == [2, 4]
    # the same record format, and the class metrics evaluations now add (balanced accuracy,
    # per-class recall)
    assert set(after[-1]) - set(before[-1]) == {'balanced_accuracy', 'recall'}
    assert set(before[-1]) <= set(after[-1])


def test_an_old_pretraining_run_resumes_to_the_uninterrupted_tensors(tmp_path):
    from ssl_ema.algorithms import pretraining as methods
    from ssl_ema.base.pretraining_config import PretrainConfig
    from ssl_ema.core.pretraining import pretrain
    train_dir = _copy('byol', tmp_path)
    before = _records(train_dir)
    cfg = dataclasses.replace(PretrainConfig(method='byol', **SETTINGS), train_dir=train_dir)
    pretrain(cfg, methods.create('byol', hidden_dim=32, projection_dim=16), log=quiet)
    straight = str(tmp_path / 'straight')
    pretrain(dataclasses.replace(cfg, train_dir=straight),
             methods.create('byol', hidden_dim=32, projection_dim=16), log=quiet)
    _assert_uninterrupted_tensors(train_dir, 'byol', straight)
    after = _records(train_dir)
    assert after[:len(before)] == before and [r['step'] for r in after] == [0, 2, 4]
    assert set(after[-1]) == set(before[-1])
    assert os.path.exists(os.path.join(train_dir, 'backbone.keras'))


def test_an_old_simmatch_run_with_the_ema_teacher_resumes_its_averaged_head_from_the_students(
        tmp_path):
    """Its checkpoint has no average_heads: the run resumes from everything else, the averaged
    head starts at the student's restored head (trained at step 3, once the memory was full) and
    takes the EMA's step towards the student's next one (warm-up decay 4/13 at update 3); the
    new checkpoint holds it."""
    from ssl_ema import algorithms
    from ssl_ema.base.config import TrainConfig
    from ssl_ema.core import fitting, run_dir
    train_dir = _copy('simmatch_ema', tmp_path)
    checkpoints = os.path.join(train_dir, 'checkpoints')
    old = tf.train.load_checkpoint(checkpoints)
    assert not run_dir.checkpoint_holds(tf.train.latest_checkpoint(checkpoints),
                                        run_dir.AVERAGE_HEADS)
    before = _records(train_dir)
    lines = []
    cfg = TrainConfig(algorithm='simmatch', uratio=2, train_dir=train_dir,
                      **dict(SETTINGS, batch=32, eval_every_kimg=2 * 32 / 1024))
    fitting.fit(cfg, algorithms.ALGORITHMS['simmatch'](teacher='ema', projection_units=8),
                log=lines.append)
    assert f'Resuming {train_dir} at step 3/4' in lines
    assert tf.train.latest_checkpoint(checkpoints).endswith('ckpt-4')
    new = tf.train.load_checkpoint(checkpoints)
    assert int(new.get_tensor('step/.ATTRIBUTES/VARIABLE_VALUE')) == 4
    keep = min(cfg.ema_decay, 4 / 13)

    def head(reader, key, i):
        return reader.get_tensor(f'{key}/{i}/.ATTRIBUTES/VARIABLE_VALUE')
    for i in range(4):   # the projection head's two kernels and biases
        start, end = head(old, 'heads', i), head(new, 'heads', i)
        assert np.abs(end - start).max() > 1e-5   # the step trained the head
        # shadow = keep start + (1 - keep) end, to well within the step's size
        np.testing.assert_allclose(head(new, f'{run_dir.AVERAGE_HEADS}/ema', i) - start,
                                   (1. - keep) * (end - start), rtol=0, atol=1e-7)
    after = _records(train_dir)
    assert after[:len(before)] == before and [r['step'] for r in after] == [2, 4]
