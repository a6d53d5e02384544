"""The Python API (ssl_ema.fit, open_run, data.from_arrays): the same runs as the command line."""
import dataclasses
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import ssl_ema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(train_steps=20, batch=16, uratio=2, eval_every_kimg=0.3125, log_every_steps=10)


def quiet(*args):
    pass


def checkpoint_weights(train_dir):
    """{variable name: value} of the student and the EMA in the latest checkpoint."""
    reader = tf.train.load_checkpoint(os.path.join(train_dir, 'checkpoints'))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(('student/', 'teacher/'))}


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def digits_arrays():
    from sklearn.datasets import load_digits
    d = load_digits()
    return np.clip(d.images * 16, 0, 255).astype(np.uint8), d.target


def test_readme_python_example_runs(tmp_path):
    """The README's Python example, as written, in a fresh Python (no absl flags anywhere)."""
    readme = open(os.path.join(REPO, 'README.md')).read()
    example = re.search(r'## Python\n.*?```python\n(.*?)```', readme, re.S)[1]
    out = subprocess.run([sys.executable, '-c', example], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.path.isfile(tmp_path / 'runs' / 'digits_fixmatch' / 'export' / 'model.keras')


def test_readme_and_training_docs_name_every_algorithm():
    """Every --algorithm a user can give is named in the README's list and in docs/training.md."""
    from ssl_ema.algorithms import ALGORITHMS
    for page in ('README.md', os.path.join('docs', 'training.md')):
        text = open(os.path.join(REPO, page)).read()
        missing = [name for name in ALGORITHMS if f'`{name}`' not in text]
        assert not missing, f'{page} does not name {missing}'


def test_every_command_in_the_readme_table_exists():
    """Each module the README's command table names (`python -m ssl_ema.x`, or `bench_ema` short
    for ssl_ema.bench_ema) can be run."""
    import importlib.util
    readme = open(os.path.join(REPO, 'README.md')).read()
    rows = [line for line in readme.splitlines() if line.startswith('| `python -m ')]
    commands = [row.split(' | ')[0] for row in rows]
    names = [name if name.startswith('ssl_ema') else f'ssl_ema.{name}'
             for cell in commands for name in re.findall(r'`(?:python -m )?([\w.]+)`', cell)]
    assert len(names) >= 15, names
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    assert not missing, missing


def test_command_line_and_fit_give_the_same_weights(tmp_path):
    flags = dict(TINY, algorithm='fixmatch', arch='small_cnn')
    command = [sys.executable, '-m', 'ssl_ema.train', f'--train_dir={tmp_path / "cli"}']
    command += [f'--{k}={v}' for k, v in flags.items()]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    algorithm = flags.pop('algorithm')
    ssl_ema.fit(algorithm=algorithm, backbone=flags.pop('arch'), train_dir=str(tmp_path / 'py'),
                log=quiet, **flags)
    assert_same_weights(checkpoint_weights(tmp_path / 'cli'), checkpoint_weights(tmp_path / 'py'))
    # the same records too: the two directories hold the same run
    cli_config = ssl_ema.open_run(str(tmp_path / 'cli')).config
    py_config = ssl_ema.open_run(str(tmp_path / 'py')).config
    assert dataclasses.replace(cli_config, train_dir=None) == dataclasses.replace(py_config,
                                                                                  train_dir=None)


def own_backbone():
    """A functional feature extractor the user builds (no head: ssl_ema adds pooling + head)."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(32, 3, padding='same', activation='relu')(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(32, 3, padding='same', activation='relu')(x)
    return keras.Model(inputs, x, name='mine')


def test_a_users_keras_model_trains_resumes_and_exports(tmp_path):
    x, y = digits_arrays()
    data = ssl_ema.data.from_arrays(x[:1400], y[:1400], x_test=x[1400:], y_test=y[1400:])
    settings = dict(TINY, train_steps=100, labels=100, valid=50)
    keras.utils.set_random_seed(0)
    straight = ssl_ema.fit(data, 'fixmatch', backbone=own_backbone(), log=quiet,
                           train_dir=str(tmp_path / 'straight'), **settings)
    assert straight.summary['ema']['test']['last'] > 20   # chance is 10%
    assert len(straight.history) >= 2 and straight.history[-1]['step'] == 100

    def interrupt(line):
        if line.startswith('step 50/'):
            raise KeyboardInterrupt
    keras.utils.set_random_seed(0)
    backbone = own_backbone()
    with pytest.raises(KeyboardInterrupt):
        ssl_ema.fit(data, 'fixmatch', backbone=backbone, log=interrupt,
                    train_dir=str(tmp_path / 'resumed'), **settings)
    resumed = ssl_ema.fit(data, 'fixmatch', backbone=backbone, log=quiet,
                          train_dir=str(tmp_path / 'resumed'), **settings)
    assert_same_weights(checkpoint_weights(straight.train_dir),
                        checkpoint_weights(resumed.train_dir))
    # the exported EMA classifier loads in plain Keras and predicts probabilities
    model = keras.saving.load_model(os.path.join(resumed.train_dir, 'export', 'model.keras'))
    probabilities = model.predict(x[1400:1410], verbose=0)
    np.testing.assert_allclose(probabilities, resumed.classifier.predict(x[1400:1410]), atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)


def test_two_fits_in_one_process_leak_nothing(tmp_path):
    """A run, then another algorithm, backbone and precision, then the first run again in a
    new directory: the same weights as the first time, and the dtype policy back to float32."""
    first = ssl_ema.fit(algorithm='mean_teacher', backbone='small_cnn', log=quiet,
                        train_dir=str(tmp_path / 'a'), **TINY)
    ssl_ema.fit(algorithm='vat', backbone=own_backbone(), precision='mixed_bfloat16',
                seed=2, log=quiet, train_dir=str(tmp_path / 'b'), **TINY)
    assert keras.config.dtype_policy().name == 'float32'
    again = ssl_ema.fit(algorithm='mean_teacher', backbone='small_cnn', log=quiet,
                        train_dir=str(tmp_path / 'c'), **TINY)
    assert_same_weights(checkpoint_weights(first.train_dir), checkpoint_weights(again.train_dir))


def test_bad_arguments_raise_one_line_errors(tmp_path):
    with pytest.raises(ssl_ema.ConfigError, match=r'^fit\(vat_eps=\.\.\.\) is not a training '
                       r'setting nor a hyperparameter of fixmatch'):
        ssl_ema.fit(algorithm='fixmatch', vat_eps=6.)
    with pytest.raises(ssl_ema.ConfigError, match=r'^--ema_decay=1\.5 must be in \[0, 1\)'):
        ssl_ema.fit(ema_decay=1.5)
    with pytest.raises(ssl_ema.ConfigError, match='algorithm=nope is unknown'):
        ssl_ema.fit(algorithm='nope')
    with pytest.raises(ssl_ema.DataError, match='from_arrays y has 3'):
        ssl_ema.data.from_arrays(np.zeros((4, 8, 8), np.uint8), [0, 1, 0])
    with pytest.raises(ssl_ema.ConfigError, match='is a dict, not a keras.Model'):
        ssl_ema.fit(backbone={'layers': 3}, train_dir=str(tmp_path / 'dict'))
    with pytest.raises(ssl_ema.ConfigError, match='no flags.json'):
        os.makedirs(tmp_path / 'empty')
        ssl_ema.open_run(str(tmp_path / 'empty'))


def test_pretrain_then_fit_from_python(tmp_path):
    """ssl_ema.pretrain writes the backbone and its k-NN history as the command does, from
    arrays too; ssl_ema.fit(backbone=pretraining.arch) fine-tunes it."""
    x, y = digits_arrays()
    data = ssl_ema.data.from_arrays(x[:1200], y[:1200], x_test=x[1200:], y_test=y[1200:])
    pretraining = ssl_ema.pretrain(data, 'byol', arch='small_cnn', batch=16, train_steps=8,
                                   eval_every_kimg=0.0625, labels=50, hidden_dim=32,
                                   projection_dim=16, train_dir=str(tmp_path / 'byol'), log=quiet)
    assert os.path.isfile(pretraining.backbone_file)
    assert [h['step'] for h in pretraining.history] == [0, 4, 8]
    assert all(0 < h['raw']['test'] <= 100 for h in pretraining.history)
    run = ssl_ema.fit(data, 'fixmatch', backbone=pretraining.arch, labels=50, log=quiet,
                      train_dir=str(tmp_path / 'fixmatch'), **{**TINY, 'train_steps': 60})
    assert run.config.arch == pretraining.arch
    assert run.summary['raw']['test']['last'] > 30   # chance: 10
    with pytest.raises(ssl_ema.ConfigError, match=r'^pretrain\(uratio=\.\.\.\) is not a '
                       r'pretraining setting nor a hyperparameter of byol'):
        ssl_ema.pretrain(data, 'byol', uratio=7)
    with pytest.raises(ssl_ema.ConfigError, match='^method=simclr is unknown; valid: byol, dino'):
        ssl_ema.pretrain(data, 'simclr')
