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

class PoisonedSupervised(algorithms.ALGORITHMS['supervised']):
    """The supervised loss, NaN in one chosen step (1-based), as a diverging run's would be."""
    poisoned_step = 13

    def __call__(self, student, teacher, batch):
        out = super().__call__(student, teacher, batch)
        step = tf.round(batch.progress * 30.) + 1.   # batch.progress = steps done / 30
        poison = tf.where(tf.equal(step, self.poisoned_step), float('nan'), 0.)
        return type(out)(out.labeled + poison, out.unlabeled, out.metrics)


def test_nan_stops_the_run_and_the_last_good_checkpoint_resumes(digits_data, tmp_path):
    cfg = tiny_config(algorithm='supervised', train_steps=30, eval_every_kimg=EVERY_10_STEPS,
                      log_every_steps=5)
    train_dir = str(tmp_path / 'run')
    poisoned = Trainer(cfg, PoisonedSupervised(), digits_data, train_dir)
    with pytest.raises(RunError) as err:
        poisoned.train(log=quiet)
    message = str(err.value)
    assert '\n' not in message
    assert message.startswith('loss/labeled = nan at step 13:'), message
    assert 'ckpt-10' in message
    assert int(poisoned.step.numpy()) == 15   # read at the next progress line, not every step
    # Nothing from the bad state reached the disk: the checkpoint, evaluations and summary of
    # step 10 are the latest (without the guard, steps 20 and 30 are saved with NaN weights).
    assert latest_checkpoint(train_dir) == 'ckpt-10'
    assert evaluated_steps(train_dir) == [10]
    assert json.loads((tmp_path / 'run' / 'accuracy.json').read_text())['step'] == 10

    resumed = Trainer(cfg, algorithms.create('supervised'), digits_data, train_dir)   # no poison
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


# ---- a full disk or a read-only directory ------------------------------------------------------

@pytest.fixture
def after_step_20(monkeypatch):
    """(arm, log): `arm(fault)` runs fault() when the run logs step 20, just before that step's
    evaluations.jsonl, checkpoint and accuracy.json are written."""
    armed = []

    def log(line):
        if line.startswith('step 20/'):
            for fault in armed:
                fault()
    return armed.append, log


def _fail_writes_of(name, error, monkeypatch):
    """From now on, writing a file called `name` fails with `error` (as on a full disk) after
    its temporary file was opened, i.e. where a real ENOSPC strikes."""
    fsync = os.fsync

    def failing_fsync(fd):
        if name in os.readlink(f'/proc/self/fd/{fd}'):
            raise OSError(error, os.strerror(error))
        return fsync(fd)
    return lambda: monkeypatch.setattr('ssl_ema.files.os.fsync', failing_fsync)


def _file_size_limit(limit_bytes):
    """A real write failure from the kernel (EFBIG) for files over `limit_bytes`: root ignores
    permissions, and a tmpfs needs mount rights that CI does not have."""
    import resource

    def fault():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # else the kernel kills the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))
    return fault


def _snapshot(train_dir):
    """{relative path: bytes} of every file under train_dir but TensorBoard's."""
    out = {}
    for root, _, names in os.walk(train_dir):
        for name in names:
            path = os.path.join(root, name)
            if 'tensorboard' not in path:
                with open(path, 'rb') as f:
                    out[os.path.relpath(path, train_dir)] = f.read()
    return out


@pytest.mark.parametrize('fault', ['accuracy.json full', 'evaluations.jsonl read-only',
                                   'checkpoint too large'])
def test_failed_write_keeps_the_last_checkpoint_and_files(fault, digits_data, tmp_path,
                                                          after_step_20, monkeypatch):
    import resource
    arm, log = after_step_20
    cfg = tiny_config(algorithm='supervised', train_steps=20, eval_every_kimg=EVERY_10_STEPS,
                      log_every_steps=5)
    train_dir = str(tmp_path / 'run')
    trainer = Trainer(cfg, algorithms.create('supervised'), digits_data, train_dir)
    before = {}
    arm(lambda: before.update(_snapshot(train_dir)))   # the files of step 10
    if fault == 'accuracy.json full':
        arm(_fail_writes_of('accuracy.json', errno.ENOSPC, monkeypatch))
    elif fault == 'evaluations.jsonl read-only':
        arm(_fail_writes_of('evaluations.jsonl', errno.EROFS, monkeypatch))
    else:
        arm(_file_size_limit(64 * 1024))   # the checkpoint's weights are ~1.7 MB
    try:
        with pytest.raises(RunError) as err:
            trainer.train(log=log)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        monkeypatch.undo()
    message = str(err.value)
    assert '\n' not in message and f'cannot write in {train_dir}' in message, message
    after = _snapshot(train_dir)
    if fault == 'accuracy.json full':
        # Written in order: evaluations.jsonl, the checkpoint, accuracy.json. The first two are
        # complete (step 20); accuracy.json is the previous one, whole.
        assert f'{train_dir}/accuracy.json: No space left on device' in message
        assert latest_checkpoint(train_dir) == 'ckpt-20'
        assert after['accuracy.json'] == before['accuracy.json']
    else:
        reason = ('Read-only file system' if 'read-only' in fault else 'File too large')
        assert reason in message and 'ckpt-10' in message
        assert latest_checkpoint(train_dir) == 'ckpt-10'
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        assert changed <= {'evaluations.jsonl'}, changed   # only if it is the checkpoint that failed
        assert not [f for f in os.listdir(os.path.join(train_dir, 'checkpoints')) if 'temp' in f]
    assert not [f for f in os.listdir(train_dir) if f.endswith('.tmp')]

    if fault != 'checkpoint too large':
        return
    # Space again: the same run resumes from what is on disk and ends like an unbroken one.
    summary = Trainer(cfg, algorithms.create('supervised'), digits_data, train_dir).train(log=quiet)
    assert summary['step'] == 20 and evaluated_steps(train_dir) == [10, 20]
    assert latest_checkpoint(train_dir) == 'ckpt-20'


# ---- one writer per run directory --------------------------------------------------------------

def _hold_lock(train_dir):
    """Another process holding train_dir's lock, as a training does, until it is killed."""
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, time; from ssl_ema.files import lock_run_dir; '
         'lock = lock_run_dir(sys.argv[1]); print("locked", flush=True); time.sleep(600)',
         train_dir], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == 'locked\n'
    return holder


def test_a_locked_run_directory_is_refused_untouched_and_a_killed_holder_does_not_block(tmp_path):
    train_dir = str(tmp_path / 'run')
    cfg = tiny_config(algorithm='supervised', train_steps=20, eval_every_kimg=EVERY_10_STEPS,
                      log_every_steps=5, train_dir=train_dir)

    def interrupt_at_step_15(line):
        if line.startswith('step 15/'):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run(cfg, algorithms.create('supervised'), log=interrupt_at_step_15)
    holder = _hold_lock(train_dir)
    try:
        before = {**_snapshot(train_dir), 'listing': sorted(os.walk(train_dir))}
        with pytest.raises(ConfigError) as err:
            run(cfg, algorithms.create('supervised'), log=quiet)
        assert str(err.value) == (f'--train_dir={train_dir} is being trained by pid {holder.pid} '
                                  f'on {socket.gethostname()}; wait for it to finish (or stop it), '
                                  'or use another --train_dir')
        assert {**_snapshot(train_dir), 'listing': sorted(os.walk(train_dir))} == before
    finally:
        holder.send_signal(signal.SIGKILL)   # leaves its name in the lock file, but no lock
        holder.wait()
    assert f'pid {holder.pid}' in (tmp_path / 'run' / '.lock').read_text()
    logged = []
    summary = run(cfg, algorithms.create('supervised'), log=logged.append)
    assert f'Resuming {train_dir} at step 15/20' in logged and summary['step'] == 20


def _train_command(train_dir):
    return [sys.executable, '-m', 'ssl_ema.train', '--algorithm=supervised', '--train_steps=20',
            '--batch=16', f'--eval_every_kimg={EVERY_10_STEPS}', '--log_every_steps=10',
            '--arch=small_cnn', '--deterministic', f'--train_dir={train_dir}']


def _run_contents(train_dir):
    """What a run leaves, without what names its directory, process or clock."""
    files = sorted(os.path.relpath(os.path.join(root, name), train_dir).split('.out.tfevents')[0]
                   for root, _, names in os.walk(train_dir) for name in names)
    record = json.loads(open(os.path.join(train_dir, 'flags.json')).read())
    del record['config']['train_dir']
    history = [{k: h[k] for k in ('step', 'raw', 'ema')}
               for h in map(json.loads, open(os.path.join(train_dir, 'evaluations.jsonl')))]
    reader = tf.train.load_checkpoint(os.path.join(train_dir, 'checkpoints'))
    weights = {name: reader.get_tensor(name).tolist()
               for name in reader.get_variable_to_shape_map() if 'student' in name or 'teacher' in name}
    split = open(os.path.join(train_dir, 'split.json')).read()
    return files, record, history, weights, split


def test_two_trainings_on_one_directory(tmp_path):
    """Exactly one trains; the other stops with a one-line error naming it and leaves the
    directory as a single run would."""
    shared, single = str(tmp_path / 'shared'), str(tmp_path / 'single')
    first = subprocess.Popen(_train_command(shared), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    reference = subprocess.Popen(_train_command(single), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    try:
        lock = os.path.join(shared, '.lock')
        deadline = time.time() + 300
        while not (os.path.exists(lock) and open(lock).read().startswith(f'pid {first.pid} ')):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)   # holds the lock, however slowly the second starts
        second = subprocess.run(_train_command(shared), capture_output=True, text=True, timeout=300)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 1 and 'Traceback' not in second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith('error:')]
        assert errors == [f'error: --train_dir={shared} is being trained by pid {first.pid} on '
                          f'{socket.gethostname()}; wait for it to finish (or stop it), or use '
                          'another --train_dir'], second.stderr
        assert 'step ' not in second.stdout
        assert first.wait(timeout=300) == 0, first.stderr.read()
        assert reference.wait(timeout=300) == 0, reference.stderr.read()
    finally:
        for process in (first, reference):
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
    assert _run_contents(shared) == _run_contents(single)
