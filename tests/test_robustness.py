"""Nothing lost, nothing silent: a NaN stops a run before it saves anything from it, a full disk
leaves the last checkpoint and files intact, one process trains a run directory at a time, and
damaged images and arrays get a warning or a one-line error naming them."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config, weights_of
from ssl_ema import algorithms
from ssl_ema.algorithms.mean_teacher import MeanTeacher
from ssl_ema.config import ConfigError
from ssl_ema.files import RunError
from ssl_ema.train import run
from ssl_ema.trainer import Trainer

EVERY_10_STEPS = 10 * 16 / 1024   # --eval_every_kimg for checkpoints every 10 steps of 16 images


def quiet(*args):
    pass


def latest_checkpoint(train_dir):
    return os.path.basename(tf.train.latest_checkpoint(os.path.join(train_dir, 'checkpoints')))


def evaluated_steps(train_dir):
    with open(os.path.join(train_dir, 'evaluations.jsonl')) as f:
        return [json.loads(line)['step'] for line in f]


# ---- NaN / Inf ---------------------------------------------------------------------------------

class PoisonedMeanTeacher(MeanTeacher):
    """Mean Teacher whose unlabeled loss is NaN in one chosen step (1-based), as a diverging run's."""
    poisoned_step = 13

    def __call__(self, student, teacher, batch):
        out = super().__call__(student, teacher, batch)
        step = tf.round(batch.progress * 30.) + 1.   # batch.progress = steps done / 30
        poison = tf.where(tf.equal(step, self.poisoned_step), float('nan'), 0.)
        return type(out)(out.labeled, out.unlabeled + poison, out.metrics)


def test_nan_stops_the_run_and_the_last_good_checkpoint_resumes(digits_data, tmp_path):
    cfg = tiny_config(algorithm='mean_teacher', train_steps=30, eval_every_kimg=EVERY_10_STEPS,
                      log_every_steps=5)
    train_dir = str(tmp_path / 'run')
    poisoned = Trainer(cfg, PoisonedMeanTeacher(), digits_data, train_dir)
    with pytest.raises(RunError) as err:
        poisoned.train(log=quiet)
    message = str(err.value)
    assert '\n' not in message
    assert message.startswith('loss/unlabeled = nan at step 13:'), message
    assert 'ckpt-10' in message
    assert int(poisoned.step.numpy()) == 15   # read at the next progress line, not every step
    # Nothing from the bad state reached the disk: the checkpoint, evaluations and summary of
    # step 10 are the latest (without the guard, steps 20 and 30 are saved with NaN weights).
    assert latest_checkpoint(train_dir) == 'ckpt-10'
    assert evaluated_steps(train_dir) == [10]
    assert json.loads((tmp_path / 'run' / 'accuracy.json').read_text())['step'] == 10

    resumed = Trainer(cfg, MeanTeacher(), digits_data, train_dir)   # the poison removed
    summary = resumed.train(log=quiet)
    assert summary['step'] == 30 and evaluated_steps(train_dir) == [10, 20, 30]
    assert latest_checkpoint(train_dir) == 'ckpt-30'
    assert all(np.isfinite(w).all() for w in weights_of(resumed.student) + weights_of(resumed.ema.model))


@pytest.mark.parametrize('then', ['evaluation', 'interrupt'])
def test_nonfinite_weight_is_caught_before_any_save(then, digits_data, tmp_path):
    """A weight the loss does not see (here the EMA model's, with the supervised loss) is checked
    before the evaluation and before the checkpoint an interrupt saves."""
    cfg = tiny_config(algorithm='supervised', train_steps=20, eval_every_kimg=EVERY_10_STEPS,
                      log_every_steps=5)
    trainer = Trainer(cfg, algorithms.create('supervised'), digits_data, str(tmp_path))

    def poison_at_step_15(line):
        if line.startswith('step 15/'):
            kernel = next(v for v in trainer.ema.model.weights if 'kernel' in v.path)
            kernel.assign(tf.fill(kernel.shape, float('inf')))
            if then == 'interrupt':
                raise KeyboardInterrupt
    with pytest.raises(RunError) as err:
        trainer.train(log=poison_at_step_15)
    step = 15 if then == 'interrupt' else 20
    assert f'of the EMA model = inf at step {step}:' in str(err.value)
    assert latest_checkpoint(str(tmp_path)) == 'ckpt-10' and evaluated_steps(str(tmp_path)) == [10]
