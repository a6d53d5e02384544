"""Run directories written before the one engine (core/engine.py) resume with today's code to
the very tensors their uninterrupted runs ended with: a FixMatch run and a BYOL pretraining run,
each interrupted at step 3 of 4 by the code of commit f7c3b83 (tests/fixtures/old_runs/make.py
says how they were made). A SimMatch run with --teacher=ema interrupted the same way by the code
of commit a5aadac (make_simmatch_ema.py), before the averages carried its projection head,
resumes with averaged heads restarted from the student's."""
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


def _assert_uninterrupted_tensors(train_dir, name):
    with open(os.path.join(FIXTURES, 'uninterrupted_sha256.json')) as f:
        expected = json.load(f)[name]
    reader = tf.train.load_checkpoint(os.path.join(train_dir, 'checkpoints'))
    assert tf.train.latest_checkpoint(os.path.join(train_dir, 'checkpoints')).endswith('ckpt-4')
    got = {k: hashlib.sha256(np.ascontiguousarray(reader.get_tensor(k)).tobytes()).hexdigest()[:16]
           for k in expected}
    differ = sorted(k for k in expected if got[k] != expected[k])
    assert not differ, f'{len(differ)} of {len(expected)} tensors differ, e.g. {differ[:3]}'


def _records(train_dir):
    with open(os.path.join(train_dir, 'evaluations.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_an_old_training_run_resumes_bit_identically(tmp_path):
    from ssl_ema import algorithms
    from ssl_ema.base.config import TrainConfig
    from ssl_ema.core import fitting
    train_dir = _copy('fixmatch', tmp_path)
    before = _records(train_dir)
    lines = []
    cfg = TrainConfig(algorithm='fixmatch', uratio=2, train_dir=train_dir, **SETTINGS)
    fitting.fit(cfg, algorithms.ALGORITHMS['fixmatch'](), log=lines.append)
    assert f'Resuming {train_dir} at step 3/4' in lines
    _assert_uninterrupted_tensors(train_dir, 'fixmatch')
    after = _records(train_dir)
    assert after[:len(before)] == before and [r['step'] for r in after] == [2, 4]
    # the same record format, and the class metrics evaluations now add (balanced accuracy,
    # per-class recall)
    assert set(after[-1]) - set(before[-1]) == {'balanced_accuracy', 'recall'}
    assert set(before[-1]) <= set(after[-1])


def test_an_old_pretraining_run_resumes_bit_identically(tmp_path):
    from ssl_ema.algorithms import pretraining as methods
    from ssl_ema.base.pretraining_config import PretrainConfig
    from ssl_ema.core.pretraining import pretrain
    train_dir = _copy('byol', tmp_path)
    before = _records(train_dir)
    cfg = dataclasses.replace(PretrainConfig(method='byol', **SETTINGS), train_dir=train_dir)
    pretrain(cfg, methods.create('byol', hidden_dim=32, projection_dim=16), log=quiet)
    _assert_uninterrupted_tensors(train_dir, 'byol')
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
