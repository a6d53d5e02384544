"""Bad input: one clear line naming the flag and what is valid, before any training or writing."""
import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from ssl_ema import algorithms, backbones
from ssl_ema.config import ConfigError
from ssl_ema.data.datasets import DataError
from ssl_ema.train import run


def quiet(*args):
    pass


@pytest.mark.parametrize('overrides, flag', [
    (dict(batch=0), '--batch'), (dict(batch=-4), '--batch'), (dict(uratio=0), '--uratio'),
    (dict(ema_decay=1.0), '--ema_decay'), (dict(ema_decay=-0.5), '--ema_decay'),
    (dict(optimizer='rmsprop'), '--optimizer'), (dict(augment='heavy'), '--augment'),
    (dict(warmup_fraction=2.), '--warmup_fraction'), (dict(log_every_steps=0), '--log_every_steps'),
])
def test_bad_training_flags(overrides, flag):
    with pytest.raises(ConfigError, match=flag) as info:
        tiny_config(**overrides)
    assert '\n' not in str(info.value)


def test_unknown_algorithm_lists_the_valid_ones():
    with pytest.raises(ConfigError, match='--algorithm=nope is unknown; valid: .*mean_teacher.*vat'):
        algorithms.create('nope')


def test_unknown_arch():
    with pytest.raises(ConfigError, match='--arch=resnet9000 is unknown; valid: .*wrn28_2'):
        backbones.build('resnet9000', (8, 8, 1), 10)


@pytest.mark.parametrize('overrides, pattern', [
    (dict(dataset='imagenet21k'), '--dataset=imagenet21k is unknown; valid: .*digits'),
    (dict(labels=55), '--labels=55 must be a multiple of the 10 classes'),
    (dict(labels=5000), '--labels=5000'),
])
def test_bad_data_flags_write_nothing(overrides, pattern, tmp_path):
    cfg = tiny_config(train_dir=str(tmp_path / 'run'), **overrides)
    with pytest.raises(DataError, match=pattern):
        run(cfg, algorithms.ALGORITHMS['mean_teacher'](), log=quiet)
    assert not (tmp_path / 'run').exists()


def test_train_dir_of_another_run_is_refused_and_left_intact(tmp_path):
    train_dir = str(tmp_path / 'run')
    run(tiny_config(algorithm='supervised', train_steps=10, train_dir=train_dir),
        algorithms.ALGORITHMS['supervised'](), log=quiet)
    before = {f: os.path.getmtime(os.path.join(train_dir, f)) for f in os.listdir(train_dir)}
    with pytest.raises(ConfigError, match=r'--train_dir=.* holds a run made with '
                                          r'--algorithm=supervised, not --algorithm=mean_teacher'):
        run(tiny_config(algorithm='mean_teacher', train_steps=10, train_dir=train_dir),
            algorithms.ALGORITHMS['mean_teacher'](), log=quiet)
    with pytest.raises(ConfigError, match='--lr=0.1'):
        run(tiny_config(algorithm='supervised', train_steps=10, train_dir=train_dir, lr=0.1),
            algorithms.ALGORITHMS['supervised'](), log=quiet)
    assert before == {f: os.path.getmtime(os.path.join(train_dir, f)) for f in os.listdir(train_dir)}


def test_command_line_error_is_one_line_and_non_zero(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'ssl_ema.train', '--algorithm=nope',
                          f'--train_dir={tmp_path / "run"}'], capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith('error: --algorithm=nope is unknown')
    assert not (tmp_path / 'run').exists()


def test_algorithm_flags_are_listed_in_help():
    out = subprocess.run([sys.executable, '-m', 'ssl_ema.train', '--helpfull'],
                         capture_output=True, text=True)
    for flag in ('--vat_eps', '--entmin_weight', '--consistency_weight', '--ema_decay',
                 '--train_kimg', '--arch'):
        assert flag in out.stdout
