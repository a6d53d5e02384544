"""The benchmark: the table from hand-made runs, flagfiles in runs/, a tiny real grid that is
interrupted, resumed without retraining, and collected again."""
import csv
import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from ssl_ema import benchmark
from ssl_ema.cli import define_train_flags
from ssl_ema.core import grid, report
from ssl_ema.algorithms import ALGORITHMS
from ssl_ema.base.errors import ConfigError, DataError
from ssl_ema.base.config import TrainConfig
from ssl_ema.core.accuracy import summarize

define_train_flags()   # as ssl_ema.train and ssl_ema.benchmark do

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(train_steps=10, batch=16, uratio=1, eval_every_kimg=0.078125, arch='small_cnn')


def cli(*args, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    return subprocess.run([sys.executable, '-m', 'ssl_ema.benchmark', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


# ---- the table from hand-made run directories ------------------------------------------------
def make_run(out, algorithm, labels, seed, ema_offset, evaluations=25, total_steps=250,
             averages=()):
    """A run directory as ssl_ema.train leaves it: EMA test accuracy ema_offset + i at the i-th
    evaluation (i = 0, 1, ...), raw test 10 points lower, validation 1 point higher; each of
    `averages` (other tracked averages, e.g. ema_0.99) k + 1 points above the EMA (k its index)."""
    cfg = TrainConfig(algorithm=algorithm, labels=labels, seed=seed, train_steps=total_steps,
                      arch='small_cnn', recipe='none')   # auto on digits, as training records it
    path = os.path.join(out, 'runs', f'digits.{labels}@{seed}', f'{algorithm}_small_cnn')
    os.makedirs(path)
    history = [{'step': 10 * (i + 1), 'kimg': 10 * (i + 1) * 32 / 1024,
                'ema': {'valid': ema_offset + i + 1., 'test': ema_offset + i},
                'raw': {'valid': ema_offset + i - 9., 'test': ema_offset + i - 10.},
                'images_per_sec': 1000. + i, 'wall_time_s': 2. * (i + 1),
                **{name: {'valid': ema_offset + i + k + 2., 'test': ema_offset + i + k + 1.}
                   for k, name in enumerate(averages)}}
               for i in range(evaluations)]
    with open(os.path.join(path, 'evaluations.jsonl'), 'w') as f:
        f.writelines(json.dumps(h) + '\n' for h in history)
    with open(os.path.join(path, 'accuracy.json'), 'w') as f:
        json.dump(summarize(history), f)
    with open(os.path.join(path, 'flags.json'), 'w') as f:
        json.dump({'config': dataclasses.asdict(cfg),
                   'algorithm': dataclasses.asdict(ALGORITHMS[algorithm]())}, f)


@pytest.fixture
def hand_made(tmp_path):
    out = str(tmp_path / 'bench')
    # EMA medians of the last 20 of 25 evaluations: offset + median(5..24) = offset + 14.5.
    for seed, offset in ((1, 60.), (2, 62.), (3, 67.)):
        make_run(out, 'mean_teacher', 50, seed, offset)       # 74.5, 76.5, 81.5
        make_run(out, 'supervised', 50, seed, offset - 20.)  # 54.5, 56.5, 61.5
    make_run(out, 'mean_teacher', 100, 1, 70.)               # 84.5
    make_run(out, 'mean_teacher', 100, 2, 72.)               # 86.5
    make_run(out, 'mean_teacher', 100, 3, 0., evaluations=10)  # stopped at step 100 of 250
    return out


def test_mean_and_sample_std():
    mean, std = report.mean_std([80., 82., 87.])
    assert mean == pytest.approx(83.)
    assert std == pytest.approx(np.sqrt((9 + 1 + 16) / 2))   # 3.606, not the population 2.944
    assert report.mean_std([70.])[1] is None


def test_median_of_last_20_in_accuracy_json(hand_made):
    path = os.path.join(hand_made, 'runs', 'digits.50@1', 'mean_teacher_small_cnn', 'accuracy.json')
    with open(path) as f:
        summary = json.load(f)
    assert summary['ema']['test']['median_last_20'] == 74.5     # median of 65..84
    assert summary['ema']['test']['last'] == 84.


def table_cells(markdown):
    rows = [line for line in markdown.splitlines() if line.startswith('| ')]
    header = [c.strip() for c in rows[0].strip('|').split('|')]
    return {cells[0]: dict(zip(header[1:], cells[1:]))
            for cells in ([c.strip() for c in row.strip('|').split('|')] for row in rows[1:])}


def test_table_from_hand_made_runs(hand_made):
    report.write_results(hand_made, log=lambda *a: None)
    with open(os.path.join(hand_made, 'results.md')) as f:
        markdown = f.read()
    sample_std = np.sqrt((9 + 1 + 16) / 2)   # seeds at 74.5, 76.5, 81.5 (mean 77.5)
    assert table_cells(markdown) == {
        'mean_teacher': {'50 labels': f'77.50 ± {sample_std:.2f} (raw 67.50 ± {sample_std:.2f})',
                         '100 labels': f'85.50 ± {np.sqrt(2):.2f} (raw 75.50 ± {np.sqrt(2):.2f})'
                                       ' [2 seeds]'},
        'supervised': {'50 labels': f'57.50 ± {sample_std:.2f} (raw 47.50 ± {sample_std:.2f})',
                       '100 labels': '–'}}
    assert 'sample standard deviation (n - 1)' in markdown
    assert 'Not finished, left out of the table: digits.100@3/mean_teacher_small_cnn ' \
           '(step 100/250)' in markdown

    with open(os.path.join(hand_made, 'results.csv')) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9
    for row in rows:
        with open(os.path.join(hand_made, 'runs', row['run'], 'accuracy.json')) as f:
            summary = json.load(f)
        for model in ('raw', 'ema'):
            for split in ('valid', 'test'):
                for stat in ('last', 'median_last_20'):
                    assert float(row[f'{model}_{split}_{stat}']) == summary[model][split][stat]
        assert float(row['images_per_sec']) == summary['images_per_sec']
        assert row['finished'] == str(row['run'] != 'digits.100@3/mean_teacher_small_cnn')
    assert 'consistency_weight' in rows[0]   # differs: mean_teacher's, none for supervised
    assert 'batch' not in rows[0]            # the same for every run
    assert os.path.getsize(os.path.join(hand_made, 'curves.png')) > 10000
    assert sorted(os.listdir(hand_made)) == sorted(report.RESULT_FILES + ('runs',))  # no temps


def test_every_tracked_average_reaches_the_csv_and_the_curves(tmp_path):
    """Runs with --ema_decays and Polyak: results.csv has their columns, curves.png their lines."""
    out = str(tmp_path / 'bench')
    for seed in (1, 2):
        make_run(out, 'mean_teacher', 50, seed, 60., averages=('ema_0.99', 'polyak'))
    make_run(out, 'supervised', 50, 1, 40.)   # without: its panel shows EMA and raw only
    records = report.load_runs(out)
    assert report.models_of(records) == ['raw', 'ema', 'ema_0.99', 'polyak']
    columns, rows = report.csv_rows(records)
    assert {'ema_0.99_test_median_last_20', 'polyak_valid_last'} <= set(columns)
    teacher = next(r for r in rows if r['algorithm'] == 'mean_teacher')
    assert teacher['ema_0.99_test_median_last_20'] == 75.5    # 60 + 1 + median(5..24)
    assert teacher['polyak_test_last'] == 86.                 # 60 + 2 + 24
    assert next(r for r in rows if r['algorithm'] == 'supervised')['polyak_test_last'] == ''
    drawn = report.plot_curves(records, str(tmp_path / 'curves.png'))
    assert drawn == {'mean_teacher': ['50 labels, raw', '50 labels, EMA', '50 labels, ema_0.99',
                                      '50 labels, polyak'],
                     'supervised': ['50 labels, raw', '50 labels, EMA']}


def test_an_interrupted_run_resumes_from_its_latest_checkpoint_not_its_last_evaluation(tmp_path):
    """An interrupted run saves a checkpoint past its last evaluation; the grid says where the
    trainer will really resume."""
    out = str(tmp_path / 'bench')
    make_run(out, 'mean_teacher', 50, 1, 0., evaluations=10)   # last evaluation at step 100
    checkpoints = os.path.join(out, 'runs', 'digits.50@1', 'mean_teacher_small_cnn', 'checkpoints')
    os.makedirs(checkpoints)
    for step in (90, 100, 117):   # ckpt-117: saved by the interrupt
        open(os.path.join(checkpoints, f'ckpt-{step}.index'), 'w').close()
    with open(os.path.join(checkpoints, 'checkpoint'), 'w') as f:   # tf.train's state file
        f.write('model_checkpoint_path: "ckpt-117"\n' + ''.join(
            f'all_model_checkpoint_paths: "ckpt-{step}"\n' for step in (90, 100, 117)))
    [run] = grid.plan(['mean_teacher'], [50], [1], out, settings={'train_steps': 250})
    assert (run.status, run.step) == ('resume', 117)


def test_collect_rebuilds_the_same_files(hand_made):
    report.write_results(hand_made, log=lambda *a: None)
    before = {}
    for name in ('results.csv', 'results.md'):
        with open(os.path.join(hand_made, name)) as f:
            before[name] = f.read()
        os.remove(os.path.join(hand_made, name))
    os.remove(os.path.join(hand_made, 'curves.png'))
    result = cli('--collect', hand_made)
    assert result.returncode == 0, result.stderr
    for name, text in before.items():
        with open(os.path.join(hand_made, name)) as f:
            assert f.read() == text
    assert os.path.exists(os.path.join(hand_made, 'curves.png'))


def test_collect_names_a_damaged_flags_json(hand_made):
    path = os.path.join(hand_made, 'runs', 'digits.50@2', 'supervised_small_cnn', 'flags.json')
    with open(path, 'w') as f:
        f.write('{"config": ')   # cut short
    result = cli('--collect', hand_made)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f'error: {path} is damaged or from an older version (JSONDecodeError: ')
    assert 'Traceback' not in result.stderr


# ---- flags -----------------------------------------------------------------------------------
def test_every_flagfile_in_runs_parses(monkeypatch):
    monkeypatch.chdir(REPO)   # nested --flagfile paths are relative to the repository
    paths = sorted(glob.glob('runs/**/*.flags', recursive=True))
    assert len(paths) >= 4 + len(ALGORITHMS) - 1
    for path in paths:
        assert benchmark.parse_flagfile(path), path
    for path in glob.glob('runs/algorithms/*.flags'):
        assert os.path.basename(path)[:-len('.flags')] in ALGORITHMS, path
    assert benchmark.parse_flagfile('runs/protocols/cifar10.flags')['ema_warmup'] is False
    budget = benchmark.parse_flagfile('runs/protocols/cpu_digits.flags')
    assert budget['train_kimg'] == 64 and budget['dataset'] == 'digits'
    for script in glob.glob('runs/*.sh'):
        with open(script) as f:
            for path in __import__('re').findall(r'--(?:flagfile|algorithm_flags)=(\S+)', f.read()):
                assert os.path.exists(path), (script, path)


@pytest.mark.parametrize('line, message', [
    ('--lables=50', "Unknown command line flag 'lables'"),
    ('--seed=1', "Unknown command line flag 'seed'"),   # the grid's: --seeds on the benchmark
    ('--batch=many', 'batch'),
])
def test_bad_flagfile_fails(tmp_path, line, message):
    path = tmp_path / 'bad.flags'
    path.write_text(f'--dataset=digits\n{line}\n')
    with pytest.raises(ConfigError, match=message) as info:
        benchmark.parse_flagfile(str(path))
    assert '\n' not in str(info.value)


def test_bad_values_fail_before_anything_is_written(tmp_path):
    out = str(tmp_path / 'bench')
    with pytest.raises(ConfigError, match=r'--algorithms=supervised,nope: nope is unknown; '
                                          r'valid: .*mean_teacher'):
        grid.plan(['supervised', 'nope'], [50], [1], out, settings=TINY)
    with pytest.raises(ConfigError, match='--labels=50,5x must be comma-separated integers'):
        benchmark.parse_counts('labels', ['50', '5x'])
    with pytest.raises(DataError, match='--labels=55 must be a multiple'):
        grid.plan(['supervised'], [50, 55], [1], out, settings=TINY)
    with pytest.raises(ConfigError, match='--arch=resnet9000 is unknown'):
        grid.plan(['supervised'], [50], [1], out, settings=dict(TINY, arch='resnet9000'))
    assert not os.path.exists(out)


def test_cli_error_is_one_line(tmp_path):
    result = cli('--algorithms=supervised,nope', '--labels=50', f'--out={tmp_path / "b"}')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        'error: --algorithms=supervised,nope: nope is unknown; valid: ')
    assert not (tmp_path / 'b').exists()


def test_algorithm_flags_are_layered_over_the_shared_ones(tmp_path):
    runs = grid.plan(['mean_teacher', 'vat'], [50], [1, 2], str(tmp_path),
                          settings=dict(TINY, uratio=2),
                          per_algorithm={'vat': {'uratio': 3, 'consistency_weight': 0.5}})
    assert [(r.cfg.algorithm, r.cfg.seed, r.cfg.uratio, r.algorithm.consistency_weight)
            for r in runs] == [('mean_teacher', 1, 2, 50.), ('mean_teacher', 2, 2, 50.),
                               ('vat', 1, 3, 0.5), ('vat', 2, 3, 0.5)]
    assert runs[2].name == 'digits.50@1/vat_small_cnn_batch16_consistency_weight0.5_uratio3'
    assert {r.status for r in runs} == {'new'}
    command = grid.train_command(runs[2])
    assert '--uratio=3' in command and '--consistency_weight=0.5' in command
    assert f'--train_dir={runs[2].cfg.train_dir}' in command and '--ema_warmup' in command


# ---- a tiny real grid ------------------------------------------------------------------------
def test_tiny_grid_interrupted_resumed_and_not_retrained(tmp_path):
    out = str(tmp_path / 'bench')
    grid_flags = ['--algorithms=supervised,mean_teacher', '--labels=50', '--seeds=1,2', f'--out={out}',
            '--dataset=digits'] + [f'--{k}={v}' for k, v in TINY.items()]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    first = subprocess.Popen([sys.executable, '-m', 'ssl_ema.benchmark', *grid_flags], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    printed = []
    for line in first.stdout:   # kill the benchmark once its first run has finished
        printed.append(line)
        if line.startswith('[1/4] finished'):
            first.send_signal(signal.SIGTERM)
            break
    printed += first.stdout.readlines()
    assert first.wait(timeout=120) == 130, printed
    assert any(line.startswith('Interrupted') for line in printed), printed
    first_run = os.path.join(out, 'runs', 'digits.50@1', 'supervised_small_cnn_batch16_uratio1')
    mtime = os.path.getmtime(os.path.join(first_run, 'accuracy.json'))

    second = cli(*grid_flags)
    assert second.returncode == 0, second.stdout + second.stderr
    lines = second.stdout.splitlines()
    assert lines[0].startswith('4 runs in') and '1 done' in lines[0]
    assert any(line.startswith('[1/4] done ') for line in lines), lines
    assert sum(line.split()[1:2] == ['finished'] for line in lines) == 3, lines
    assert os.path.getmtime(os.path.join(first_run, 'accuracy.json')) == mtime
    with open(os.path.join(out, 'results.csv')) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(row['finished'] == 'True' for row in rows)
    assert all(os.path.exists(os.path.join(out, name)) for name in report.RESULT_FILES)

    again = grid.plan(['supervised', 'mean_teacher'], [50], [1, 2], out, settings=TINY)
    assert [r.status for r in again] == ['done'] * 4   # a third run would train nothing


def test_an_interrupt_as_a_training_starts_stops_that_training(tmp_path, monkeypatch):
    """Ctrl-C landing inside Popen (the training started, not yet recorded) is held until the
    training is recorded: run_grid then stops it and re-raises, never leaving it to train on."""
    runs = grid.plan(['supervised'], [50], [1], str(tmp_path / 'bench'), settings=TINY)
    monkeypatch.setattr(grid, 'train_command',
                        lambda run: [sys.executable, '-c', 'import time; time.sleep(120)'])
    started = []
    popen = subprocess.Popen

    def interrupted_popen(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        os.kill(os.getpid(), signal.SIGINT)   # delivered before Popen returns
        return started[-1]
    monkeypatch.setattr(grid.subprocess, 'Popen', interrupted_popen)
    with pytest.raises(KeyboardInterrupt):
        grid.run_grid(runs, log=lambda line: None)
    assert len(started) == 1 and started[0].poll() is not None   # stopped, not training on
