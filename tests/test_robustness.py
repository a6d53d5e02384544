"""Nothing lost, nothing silent: a NaN stops a run before it saves anything from it, a full disk
leaves the last checkpoint and files intact, one process trains a run directory at a time, and
damaged images and arrays get a warning or a one-line error naming them."""
import errno
import json
import os
import re
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
from ssl_ema.base.errors import ConfigError, RunError
from conftest import run
from ssl_ema.core.loop import Trainer

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
    # inf, or nan once the EMA update has subtracted inf from inf
    assert re.search(f'of the EMA model = (inf|nan) at step {step}:', str(err.value)), err.value
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
    return lambda: monkeypatch.setattr('ssl_ema.base.files.os.fsync', failing_fsync)


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
        [sys.executable, '-c', 'import sys, time; from ssl_ema.base.files import lock_run_dir; '
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


# ---- images and arrays from the wild -----------------------------------------------------------

def _encode(image, fmt):
    import io
    from PIL import Image
    f = io.BytesIO()
    image.save(f, format=fmt)
    return f.getvalue()


def test_folder_from_the_wild_converts_skips_and_names(tmp_path, capsys):
    from PIL import Image
    from ssl_ema.data.datasets import load
    rng = np.random.RandomState(0)
    colour = [rng.randint(0, 256, (8, 8, 3)).astype(np.uint8) for _ in range(6)]
    root = tmp_path / 'wild'
    for d in ('cat', 'dog', 'cat/sub', '.ipynb_checkpoints'):
        (root / d).mkdir(parents=True)
    for i in range(3):
        (root / 'cat' / f'{i}.png').write_bytes(_encode(Image.fromarray(colour[i]), 'PNG'))
    grey = rng.randint(0, 256, (8, 8)).astype(np.uint8)
    sixteen = np.tile(np.array([0, 257 * 7, 65535], np.uint16), (8, 3))[:, :8]
    files = {'grey.png': _encode(Image.fromarray(grey), 'PNG'),
             'rgba.png': _encode(Image.fromarray(colour[3]).convert('RGBA'), 'PNG'),
             'palette.gif': _encode(Image.fromarray(colour[4]).quantize(16), 'GIF'),
             'sixteen.png': tf.io.encode_png(sixteen[..., None]).numpy(),
             'photo.JPG': _encode(Image.fromarray(colour[5]), 'JPEG')}
    for name, data in files.items():
        (root / 'dog' / name).write_bytes(data)
    jpeg = _encode(Image.fromarray(rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)), 'JPEG')
    (root / 'cat' / 'cut.jpg').write_bytes(jpeg[:len(jpeg) // 2])          # truncated
    (root / 'cat' / 'fake.png').write_bytes(b'<html>not an image</html>')   # misnamed
    (root / 'cat' / 'notes.txt').write_text('taken in 2019')
    (root / 'cat' / '.DS_Store').write_bytes(b'\0\0\0\1Bud1')
    (root / 'cat' / '._0.png').write_bytes(b'\0\5\26\7 AppleDouble')
    (root / 'README.md').write_text('my pets')
    os.symlink('loop.png', root / 'cat' / 'loop.png')         # a link to itself
    os.symlink('gone.png', root / 'dog' / 'dangling.png')     # to nothing
    os.symlink('..', root / 'cat' / 'sub' / 'up')            # a loop through a folder

    arrays = load(f'folder:{root}')
    assert arrays.num_classes == 2 and arrays.image_shape == (8, 8, 3)
    images = np.concatenate([arrays.x_train, arrays.x_test])
    labels = np.concatenate([arrays.y_train, arrays.y_test])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 1, 1]

    def found(expected):
        return any(np.array_equal(expected, x) for x in images)
    assert found(colour[0]) and found(colour[3])                 # RGBA: alpha dropped
    assert found(np.repeat(grey[..., None], 3, -1))              # grey widened to RGB
    assert found(np.repeat((sixteen // 257).astype(np.uint8)[..., None], 3, -1))   # 16 -> 8 bits
    palette = np.asarray(Image.fromarray(colour[4]).quantize(16).convert('RGB'))
    assert found(palette)

    warnings = capsys.readouterr().err.strip().splitlines()
    source = f'warning: --dataset=folder:{root}: skipped'
    assert warnings == [
        f'{source} 2 damaged image file(s) that do not decode: cat/cut.jpg, cat/fake.png',
        f'{source} 2 file(s) or folder(s) that are not images (.bmp, .gif, .jpeg, .jpg, .png, '
        '.webp): cat/notes.txt, cat/sub',
        f'{source} 2 broken or looping symbolic link(s): cat/loop.png, dog/dangling.png'], warnings


def _message(name):
    from ssl_ema.base.errors import DataError
    from ssl_ema.data.datasets import load
    with pytest.raises(DataError) as err:
        load(name)
    assert '\n' not in str(err.value)
    return str(err.value)


def test_folder_refusals_name_the_file(tmp_path, monkeypatch):
    from PIL import Image
    from ssl_ema.data import custom
    root = tmp_path / 'pets'
    for c in ('cat', 'dog'):
        (root / c).mkdir(parents=True)
        for i in range(2):
            (root / c / f'{i}.png').write_bytes(_encode(Image.new('RGB', (8, 8)), 'PNG'))
    unreadable = root / 'dog' / '1.png'
    real_open = open

    def open_as_a_stranger(path, *args, **kwargs):   # tests run as root, whom chmod never stops
        if str(path) == str(unreadable):
            raise PermissionError(errno.EACCES, 'Permission denied', str(path))
        return real_open(path, *args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(custom, 'open', open_as_a_stranger, raising=False)
        assert _message(f'folder:{root}') == (
            f'--dataset=folder:{root}: cannot read {unreadable}: Permission denied; fix its '
            'permissions or move it away')
    for i in range(2):
        (root / 'dog' / f'{i}.png').write_bytes(b'\x89PNG\r\n\x1a\n cut short')
    assert _message(f'folder:{root}') == (f"--dataset=folder:{root}: class folder(s) ['dog'] in "
                                          f'{root} hold no readable image (.bmp, .gif, .jpeg, '
                                          '.jpg, .png, .webp)')


def test_npz_from_the_wild(tmp_path):
    from ssl_ema.data.datasets import load
    rng = np.random.RandomState(0)
    rgba = rng.randint(0, 256, (20, 8, 8, 4)).astype(np.uint8)
    np.savez(tmp_path / 'rgba.npz', x_train=rgba, y_train=np.arange(20) % 2,
             x_unlabeled=rgba[:5].astype(np.int64))   # 0..255 in int64: converted
    arrays = load(f'npz:{tmp_path / "rgba.npz"}')
    assert arrays.image_shape == (8, 8, 3) and arrays.x_extra.dtype == np.uint8
    np.testing.assert_array_equal(arrays.x_extra, rgba[:5, ..., :3])

    np.savez(tmp_path / 'sixteen.npz', x_train=rgba[..., 0].astype(np.uint16) * 257,
             y_train=np.arange(20) % 2)
    assert 'x_train is uint16 in [0, 65535]' in _message(f'npz:{tmp_path / "sixteen.npz"}')
    nan = rng.rand(20, 8, 8).astype(np.float32)
    nan[3, 4, 5] = np.nan
    np.savez(tmp_path / 'nan.npz', x_train=nan, y_train=np.arange(20) % 2)
    assert 'x_train is float32 in [nan, nan]' in _message(f'npz:{tmp_path / "nan.npz"}')
    np.savez(tmp_path / 'pickled.npz', x_train=np.array([rgba[0], 'x'], dtype=object),
             y_train=np.arange(2))
    msg = _message(f'npz:{tmp_path / "pickled.npz"}')
    assert msg.startswith(f'--dataset=npz:{tmp_path / "pickled.npz"}: not a readable .npz') and 'pickle' in msg

    # A bit flipped inside a stored (uncompressed) member: the zip's CRC check catches it.
    data = bytearray((tmp_path / 'rgba.npz').read_bytes())
    data[len(data) // 3] ^= 0xFF
    (tmp_path / 'flipped.npz').write_bytes(bytes(data))
    msg = _message(f'npz:{tmp_path / "flipped.npz"}')
    assert 'not a readable .npz' in msg and 'CRC' in msg, msg
    (tmp_path / 'cut.npz').write_bytes(bytes(data[:len(data) // 2]))
    assert 'not a readable .npz' in _message(f'npz:{tmp_path / "cut.npz"}')


def test_weak_augmentation_of_one_pixel_wide_images():
    """Found by the fuzz test: reflect padding needs fewer pixels than the side."""
    from ssl_ema.data import augment
    images = tf.random.uniform([2, 1, 6, 3])
    out = augment.weak(images, tf.constant([1, 2], tf.int64), flip=False)
    assert out.shape == (2, 1, 6, 3)
    assert set(np.unique(out)) <= set(np.unique(images))   # moved and reflected, not made up
