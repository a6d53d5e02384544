"""Bad input: one clear line naming the flag and what is valid, before any training or writing."""
import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from ssl_ema import algorithms
from ssl_ema.nn import backbones
from ssl_ema.base.errors import ConfigError, DataError
from ssl_ema.base.files import write_json
from conftest import run
from ssl_ema.core.run_dir import check_compatible, run_record


def quiet(*args):
    pass


@pytest.mark.parametrize('overrides, flag', [
    (dict(batch=0), '--batch'), (dict(batch=-4), '--batch'), (dict(uratio=0), '--uratio'),
    (dict(ema_decay=1.0), '--ema_decay'), (dict(ema_decay=-0.5), '--ema_decay'),
    (dict(optimizer='rmsprop'), '--optimizer'), (dict(augment='heavy'), '--augment'),
    (dict(labeled_augment='heavy'), '--labeled_augment'), (dict(augment_fill='red'), '--augment_fill'),
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


def _made_with(train_dir, **overrides):
    """train_dir as a run made with tiny_config(**overrides) leaves it, as far as resuming goes."""
    write_json(os.path.join(train_dir, 'flags.json'),
               run_record(tiny_config(**overrides), algorithms.create('mean_teacher')))


def _resumes(train_dir, log=quiet, **overrides):
    return check_compatible(str(train_dir), run_record(tiny_config(**overrides),
                                                       algorithms.create('mean_teacher')), log)


def test_another_training_length_is_refused(tmp_path):
    _made_with(tmp_path, train_steps=40)
    assert _resumes(tmp_path, train_steps=40)
    with pytest.raises(ConfigError, match=r'holds a run of 40 steps \(--train_steps=40\), not 80 '
                                          r'\(--train_steps=80\); resume it with --train_steps=40 '
                                          r'or use another --train_dir') as info:
        _resumes(tmp_path, train_steps=80)
    assert '\n' not in str(info.value)
    _made_with(tmp_path, train_steps=0, train_kimg=0.625)   # 40 steps of 16 images
    assert _resumes(tmp_path, train_steps=40)               # the same length, said in steps
    with pytest.raises(ConfigError, match=r'run of 40 steps \(--train_kimg=0.625\), not 64 '
                                          r'\(--train_kimg=1.0\)'):
        _resumes(tmp_path, train_steps=0, train_kimg=1.)


def test_another_device_layout_resumes_with_a_warning(tmp_path):
    _made_with(tmp_path)
    logged = []
    assert _resumes(tmp_path, logged.append, distribute='mirrored')
    assert logged == [f'warning: {tmp_path} was trained with --distribute=default and resumes '
                      'with --distribute=mirrored --cpu_devices=2: the run will not be '
                      'bit-identical to an uninterrupted one']
    assert _resumes(tmp_path, logged.append) and len(logged) == 1   # same layout: no warning


@pytest.mark.parametrize('content', ['{"config": {"batch": 1', '{"algorithm": {}}'])
def test_damaged_flags_json_is_one_line_on_the_command_line(tmp_path, content):
    (tmp_path / 'flags.json').write_text(content)
    out = subprocess.run([sys.executable, '-m', 'ssl_ema.train', '--train_steps=10',
                          f'--train_dir={tmp_path}'], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in out.stderr, out.stderr
    assert errors[0].startswith(f'error: {tmp_path / "flags.json"} is damaged or from an older '
                                'version (')
    assert errors[0].endswith(f'move {tmp_path} away or use another --train_dir')


def test_unwritable_train_dir_is_one_line(tmp_path):
    (tmp_path / 'a_file').write_text('')
    train_dir = str(tmp_path / 'a_file' / 'run')
    with pytest.raises(ConfigError, match=f'--train_dir={train_dir} cannot be written: Not a '
                                          f'directory'):
        run(tiny_config(train_dir=train_dir), algorithms.create('mean_teacher'), log=quiet)


def test_command_line_error_is_one_line_and_non_zero(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'ssl_ema.train', '--algorithm=nope',
                          f'--train_dir={tmp_path / "run"}'], capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith('error: --algorithm=nope is unknown')
    assert not (tmp_path / 'run').exists()


def test_another_algorithms_flag_is_named_as_ignored(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'ssl_ema.train', '--algorithm=fixmatch',
                          '--vat_eps=3', '--temperature=0.5', '--consistency_weight=2', '--dataset=nope',
                          f'--train_dir={tmp_path / "run"}'], capture_output=True, text=True)
    warnings = [line for line in out.stderr.splitlines() if line.startswith('warning:')]
    assert warnings == [f'warning: --{name} is ignored: --algorithm=fixmatch does not use it (its '
                        'own flags: consistency_weight, confidence_threshold, teacher, student_weak_pass)'
                        for name in ('temperature', 'vat_eps')], out.stderr
    assert out.returncode == 1   # and the bad --dataset still stops it


def test_algorithm_flags_are_listed_in_help():
    out = subprocess.run([sys.executable, '-m', 'ssl_ema.train', '--helpfull'],
                         capture_output=True, text=True)
    for flag in ('--vat_eps', '--entmin_weight', '--consistency_weight', '--ema_decay',
                 '--train_kimg', '--arch'):
        assert flag in out.stdout
