"""Fuzzing `python -m ssl_ema.train` (flags and damaged data) with hypothesis.

The property, for every example: the command either trains, or exits with exactly one line
`error: ...`; it never raises (a traceback), and a run directory it refused is left exactly as
it was (contents and modification times). Runs go through the command's own `main` in this
process (a subprocess per example would spend its time importing TensorFlow), with a fixed seed
and a stated number of examples; nothing trains more than 3 steps.
"""
import dataclasses
import os
import shutil
import signal
import tempfile

import numpy as np
import pytest
from absl import flags
from hypothesis import HealthCheck, given, seed, settings, strategies as st

from ssl_ema import algorithms, cli, train
from ssl_ema.base import hparams
from ssl_ema.base.config import TrainConfig

cli.define_train_flags()   # as ssl_ema.train and ssl_ema.benchmark do

FLAGS = flags.FLAGS
FUZZ = settings(max_examples=20, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))


def run_command(argv):
    """(exit: 0 or the SystemExit message, stdout+stderr) of `python -m ssl_ema.train argv`."""
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        cli.main(train.main, TrainConfig)(hparams.parse_flags(['ssl_ema.train'] + argv))
        return 0
    except SystemExit as e:
        return e.code
    finally:
        FLAGS.unparse_flags()   # the next example, and the other tests, start from defaults
        signal.signal(signal.SIGTERM, sigterm)


def check_outcome(code, train_dir, before):
    """`before`: snapshot(train_dir) before the run, None if it did not exist (a run that stops
    with an error after it started may leave a directory to resume)."""
    if code == 0:
        return
    assert isinstance(code, str) and code.startswith('error: ') and '\n' not in code, code
    if before is not None:
        assert snapshot(train_dir) == before, f'{code}: refused but changed {train_dir}'


def snapshot(train_dir):
    out = {}
    for root, dirs, names in os.walk(train_dir):
        for name in dirs + names:
            path = os.path.join(root, name)
            stat = os.stat(path)
            with open(path, 'rb') if name in names else open(os.devnull, 'rb') as f:
                out[os.path.relpath(path, train_dir)] = (stat.st_mtime_ns, f.read())
    return out


SHORT = ['--train_steps=2', '--batch=4', '--uratio=1', '--log_every_steps=1']


@pytest.fixture(scope='module')
def existing_run():
    """A finished run directory (the default algorithm, 2 steps), for examples to be refused by."""
    directory = tempfile.mkdtemp(prefix='fuzz_existing_')
    assert run_command(SHORT + [f'--train_dir={directory}/run', '--labels=10',
                                '--eval_every_kimg=0.004']) == 0
    yield f'{directory}/run'
    shutil.rmtree(directory)


# ---- flags ---------------------------------------------------------------------------------------

JUNK = st.sampled_from(['', 'nan', '-inf', 'abc', 'True', 'None', '1e40', '0x10', ' 3', '1,2', 'é'])
FLOATS = st.one_of(st.floats(-1., 2.), st.sampled_from([0., 1., 1e9, -1e9, 1e-30]),
                   st.sampled_from([float('nan'), float('inf'), float('-inf')]))
BY_TYPE = {'int': st.integers(-3, 300), 'float': FLOATS, 'bool': st.booleans(),
           'string': st.sampled_from(['', 'bogus'])}
CHOICES = {'optimizer': ['sgd', 'adam'], 'lr_decay': ['cosine', 'constant'],
           'augment': ['weak', 'strong', 'none'], 'augment_fill': ['anchors', 'edge'],
           'vat_target': ['ema', 'student'],
           'tsa': ['none', 'linear', 'exp', 'log'],
           'algorithm': sorted(algorithms.ALGORITHMS),
           'arch': ['small_cnn', 'auto', 'cnn13', 'wrn10_1', 'wrn28_0', 'wrn11_1', 'wrn_2'],
           'dataset': ['digits', 'imagenet', 'npz:/nonexistent.npz', 'folder:/nonexistent',
                       'npz:', 'folder:']}
# Flags that decide the cost of a step stay small when they are valid.
BOUNDED = {'batch': st.integers(-2, 32), 'uratio': st.integers(-2, 4),
           'label_guess_views': st.integers(-1, 3), 'valid': st.integers(-5, 2000),
           'labels': st.sampled_from([10, 20, 50, 100, 1000, 5000, 7, 0, -10])}
# Left out: flags that change the process, not the run (TensorFlow's devices and determinism
# are set once per process), and the length (added to every example).
FIXED = {'distribute', 'cpu_devices', 'deterministic', 'train_dir', 'train_steps', 'data_dir'}
NAMES = sorted({f.name for f in dataclasses.fields(TrainConfig)} - FIXED
               | {f.name for cls in algorithms.ALGORITHMS.values() for f in dataclasses.fields(cls)})
UNKNOWN = ['bogus', 'lables', 'ema', 'flagfile']   # flagfile: a file that does not exist


def value(name):
    """Mostly a value of the flag's type (in or out of its valid range), sometimes junk."""
    if name in CHOICES:
        typed = st.sampled_from(CHOICES[name] + ['bogus'])
    else:
        typed = BOUNDED.get(name, BY_TYPE[FLAGS[name].flag_type()])
    return st.one_of(typed.map(str), typed.map(str), typed.map(str), JUNK)


@st.composite
def flag_lists(draw):
    names = draw(st.lists(st.sampled_from(NAMES), max_size=4, unique=True))
    argv = [f'--{name}={draw(value(name))}' for name in names]
    if draw(st.integers(0, 9)) == 0:
        argv.append(f'--{draw(st.sampled_from(UNKNOWN))}={draw(JUNK)}')
    return argv, draw(st.integers(1, 3)), draw(st.booleans())


@seed(15)
@FUZZ
@given(example=flag_lists())
def test_random_flags_train_or_exit_with_one_line(example, existing_run):
    argv, steps, into_existing = example
    directory = tempfile.mkdtemp(prefix='fuzz_')
    train_dir = existing_run if into_existing else os.path.join(directory, 'run')
    before = snapshot(train_dir) if into_existing else None
    try:
        code = run_command(argv + SHORT[1:] + [f'--train_steps={steps}',
                                               f'--train_dir={train_dir}'])
        check_outcome(code, train_dir, before)
    finally:
        shutil.rmtree(directory)


# ---- damaged data --------------------------------------------------------------------------------

def _png(image):
    import tensorflow as tf
    return tf.io.encode_png(image).numpy()


GOOD = ['rgb', 'grey', 'rgba']
BAD = ['other_size', 'cut', 'junk.png', 'empty.png', 'notes.txt', '.DS_Store', 'dangling', 'loop',
       'subfolder']


def write_file(folder, index, kind, rng):
    path = os.path.join(folder, f'{index}_{kind}')
    size = 5 if kind == 'other_size' else 6
    image = rng.randint(0, 256, (size, size, {'grey': 1, 'rgba': 4}.get(kind, 3))).astype(np.uint8)
    if kind in ('rgb', 'grey', 'rgba', 'other_size', 'cut'):
        data = _png(image)
        with open(path + '.png', 'wb') as f:
            f.write(data[:len(data) // 2] if kind == 'cut' else data)
    elif kind == 'dangling':
        os.symlink('missing.png', path + '.png')
    elif kind == 'loop':
        os.symlink(f'{index}_{kind}.png', path + '.png')
    elif kind == 'subfolder':
        os.makedirs(path)
    else:
        with open(os.path.join(folder, kind if kind == '.DS_Store' else f'{index}_{kind}'), 'wb') as f:
            f.write(b'' if kind == 'empty.png' else b'\x89PNG not really')


@st.composite
def folders(draw):
    """(write(directory) -> --dataset value): class folders of random, partly damaged files."""
    def files(size):   # mostly good images, a damaged or odd one in about one folder of two
        return st.tuples(st.lists(st.sampled_from(GOOD), min_size=size, max_size=size + 2),
                         st.lists(st.sampled_from(BAD), max_size=1)).map(lambda t: t[0] + t[1])
    classes = [draw(files(3)) for _ in range(draw(st.sampled_from([2, 2, 2, 1, 3])))]
    unlabeled = draw(files(0))
    split = draw(st.booleans())   # train/ and test/ sub-folders

    def write(directory):
        rng = np.random.RandomState(0)
        for part in ('train', 'test') if split else ('',):
            for c, kinds in enumerate(classes + [unlabeled]):
                name = 'unlabeled' if c == len(classes) else f'class{c}'
                folder = os.path.join(directory, 'images', part, name)
                os.makedirs(folder, exist_ok=True)
                for i, kind in enumerate(kinds):
                    write_file(folder, i, kind, rng)
        return f'folder:{directory}/images'
    return write


@st.composite
def npz_files(draw):
    """(write(directory) -> --dataset value): arrays of random shapes, types and labels, some
    with the .npz itself damaged."""
    def mostly(good, *bad):   # the first value three times in four
        return st.sampled_from([good] * 3 * len(bad) + list(bad))
    n = draw(mostly(24, 0, 1, 7))
    shape = (n, draw(mostly(6, 0, 1)), 6) + draw(mostly((3,), (), (1,), (4,), (5,)))
    dtype = draw(mostly('uint8', 'float32', 'int64', 'uint16', 'bool', 'U1'))
    classes = draw(mostly(2, 1, 3))
    label_count = n + draw(mostly(0, -1, 1))
    label_dtype = draw(mostly('int64', 'float32', 'uint8'))
    parts = draw(mostly(('x_test', 'y_test'), (), ('x_unlabeled',), ('x_test',), ('y_test',)))
    nan = draw(st.booleans())
    damage = draw(mostly(None, 'truncate', 'flip', 'junk'))

    def write(directory):
        rng = np.random.RandomState(0)
        x = (rng.rand(*shape) * (255 if dtype != 'float32' else 1)).astype(dtype)
        if nan and dtype == 'float32' and x.size:
            x.flat[0] = np.nan
        arrays = {'x_train': x, 'y_train': (np.arange(label_count) % classes).astype(label_dtype)}
        arrays.update({k: arrays[k.replace('test', 'train').replace('unlabeled', 'train')]
                       for k in parts})
        path = os.path.join(directory, 'data.npz')
        np.savez(path, **arrays)
        if damage:
            with open(path, 'rb') as f:
                data = bytearray(f.read())
            if damage == 'flip':
                data[len(data) // 2] ^= 0xFF
            with open(path, 'wb') as f:
                f.write(b'junk' if damage == 'junk' else
                        bytes(data[:len(data) // 2] if damage == 'truncate' else data))
        return f'npz:{path}'
    return write


@seed(15)
@FUZZ
@given(make=st.one_of(folders(), npz_files()), labels=st.sampled_from([2, 4, 50]),
       valid=st.sampled_from([0, 2]))
def test_damaged_data_trains_or_exits_with_one_line(make, labels, valid):
    directory = tempfile.mkdtemp(prefix='fuzz_data_')
    try:
        dataset = make(directory)
        code = run_command(SHORT + [f'--dataset={dataset}', f'--labels={labels}',
                                    f'--valid={valid}', f'--train_dir={directory}/run'])
        check_outcome(code, f'{directory}/run', None)
    finally:
        shutil.rmtree(directory)
