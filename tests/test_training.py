"""The shared loop: algorithms learn on tiny digits, resume equals an uninterrupted run."""
import json
import os

import numpy as np
import pytest

from conftest import quiet, straight_and_resumed, tiny_config, weights_of
from ssl_ema import algorithms
from conftest import run
from ssl_ema.core.loop import Trainer


@pytest.mark.parametrize('name', ['supervised', 'mean_teacher', 'vat'])
def test_algorithm_learns_on_tiny_digits(name, digits_data, tmp_path):
    cfg = tiny_config(algorithm=name, train_steps=300, eval_every_kimg=1.5625, log_every_steps=10)
    logged = []
    trainer = Trainer(cfg, algorithms.ALGORITHMS[name](), digits_data, str(tmp_path))
    summary = trainer.train(log=logged.append)
    losses = [float(line.split('labeled=')[1].split()[0]) for line in logged if 'labeled=' in line]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:2]), losses   # the labeled loss falls
    assert summary['ema']['test']['last'] > 60, summary                # chance is 10%
    assert summary['raw']['test']['last'] > 60, summary


def test_consistency_is_not_constant(digits_data, tmp_path):
    """USB's Mean Teacher shipped a consistency that was always zero: ours must move."""
    cfg = tiny_config(algorithm='mean_teacher', train_steps=20, log_every_steps=5)
    trainer = Trainer(cfg, algorithms.ALGORITHMS['mean_teacher'](), digits_data, str(tmp_path))
    iterator = trainer.batches(0)
    values = [float(trainer.train_step(iterator)['algorithm/consistency']) for _ in range(20)]
    assert min(values) > 0 and len(set(values)) > 10


def test_outputs_of_a_run(tmp_path):
    cfg = tiny_config(algorithm='mean_teacher', train_steps=40, train_dir=str(tmp_path / 'run'))
    summary = run(cfg, algorithms.ALGORITHMS['mean_teacher'](), log=quiet)
    files = set(os.listdir(tmp_path / 'run'))
    assert {'accuracy.json', 'evaluations.jsonl', 'flags.json', 'flagfile', 'split.json',
            'checkpoints', 'tensorboard'} <= files
    saved = json.loads((tmp_path / 'run' / 'accuracy.json').read_text())
    assert saved == json.loads(json.dumps(summary))
    history = [json.loads(l) for l in (tmp_path / 'run' / 'evaluations.jsonl').read_text().split('\n') if l]
    assert [h['step'] for h in history] == [20, 40]   # every 0.3125 kimg of 16-image batches
    assert saved['ema']['test']['median_last_10'] == pytest.approx(
        float(np.median([h['ema']['test'] for h in history])))
    assert os.listdir(tmp_path / 'run' / 'tensorboard')
    split = json.loads((tmp_path / 'run' / 'split.json').read_text())
    assert len(split['labeled']) == 50 and not set(split['labeled']) & set(split['valid'])


def test_interrupted_run_resumes_to_the_same_weights(digits_data, tmp_path):
    algorithm = algorithms.ALGORITHMS['vat']()   # VAT also draws noise from the checkpointed RNG
    # Every kind of average, re-estimated statistics, and post-hoc snapshots every 8 steps.
    cfg = tiny_config(algorithm='vat', train_steps=40, eval_every_kimg=0.25, ema_decays='0.99',
                      polyak_start_fraction=0.25, posthoc_snapshot_every_kimg=0.125,
                      ema_bn='recompute', ema_bn_batches=2)
    straight, second, summary = straight_and_resumed(cfg, algorithm, digits_data, tmp_path, 20)
    # The loop's step and the optimizer's (which drives the learning rate) move and restore
    # together: both are incremented in the same compiled step and saved in one checkpoint.
    assert int(second.optimizer.iterations.numpy()) == 40
    assert [a.name for a in second._all_averages()] == [
        'ema', 'ema_0.99', 'polyak', 'power_0.05', 'power_0.1']
    for x, y in zip(straight._all_averages(), second._all_averages()):
        assert int(x.updates.numpy()) == int(y.updates.numpy()) == 40
    for a, b in zip(weights_of(straight.student) + [w for x in straight._all_averages()
                                                     for w in weights_of(x.model)],
                    weights_of(second.student) + [w for x in second._all_averages()
                                                  for w in weights_of(x.model)]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert summary['evaluations'] == len(straight.history)
    snapshots = sorted(os.listdir(tmp_path / 'straight' / 'posthoc'))
    assert snapshots == sorted(os.listdir(tmp_path / 'resumed' / 'posthoc'))
    assert snapshots == [f'snapshot-{s:08d}.npz' for s in (8, 16, 24, 32, 40)]
    for name in snapshots:
        with np.load(tmp_path / 'straight' / 'posthoc' / name) as a, \
                np.load(tmp_path / 'resumed' / 'posthoc' / name) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5)


def evaluations(history):
    return [{k: h[k] for k in ('step', 'kimg', 'raw', 'ema')} for h in history]


def test_evaluation_interrupted_at_the_last_step_is_redone(digits_data, tmp_path, monkeypatch):
    algorithm = algorithms.ALGORITHMS['supervised']()
    cfg = tiny_config(algorithm='supervised', train_steps=40)   # evaluations at steps 20 and 40
    straight = Trainer(cfg, algorithm, digits_data, str(tmp_path / 'straight'))
    straight.train(log=quiet)
    assert [h['step'] for h in straight.history] == [20, 40]

    evaluate = Trainer.evaluate

    def interrupted_at_the_last_step(self):
        if int(self.step.numpy()) == 40:
            raise KeyboardInterrupt   # as SIGTERM does, while the final evaluation runs
        return evaluate(self)
    resumed_dir = tmp_path / 'resumed'
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, 'evaluate', interrupted_at_the_last_step)
        with pytest.raises(KeyboardInterrupt):
            Trainer(cfg, algorithm, digits_data, str(resumed_dir)).train(log=quiet)
    assert json.loads((resumed_dir / 'accuracy.json').read_text())['evaluations'] == 1

    logged = []
    summary = Trainer(cfg, algorithm, digits_data, str(resumed_dir)).train(log=logged.append)
    assert not any(line.startswith('step ') for line in logged)   # nothing retrained
    saved = json.loads((resumed_dir / 'accuracy.json').read_text())
    assert saved == json.loads(json.dumps(summary)) and saved['evaluations'] == 2
    history = [json.loads(line) for line in (resumed_dir / 'evaluations.jsonl').open()]
    assert evaluations(history) == evaluations(straight.history)

    # A kill after the last checkpoint but before accuracy.json was written: rerunning repairs it.
    (resumed_dir / 'accuracy.json').unlink()
    Trainer(cfg, algorithm, digits_data, str(resumed_dir)).train(log=quiet)
    assert json.loads((resumed_dir / 'accuracy.json').read_text()) == saved


def test_cpu_time_is_recorded_and_adds_up_across_resumes(digits_data, tmp_path):
    """cpu_time_s (every thread's CPU-seconds) beside wall_time_s: a resumed run's count goes on
    from the earlier process's, it does not restart at zero."""
    import time
    cfg = tiny_config(algorithm='supervised', train_steps=40)   # evaluations at steps 20 and 40

    def stop_after_first_evaluation(line):
        if line.startswith('step 30/'):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, algorithms.ALGORITHMS['supervised'](), digits_data,
                str(tmp_path)).train(log=stop_after_first_evaluation)
    first = json.loads((tmp_path / 'accuracy.json').read_text())['cpu_time_s']
    before = time.process_time()
    Trainer(cfg, algorithms.ALGORITHMS['supervised'](), digits_data, str(tmp_path),
            cpu_start=before).train(log=quiet)
    second_process = time.process_time() - before
    history = [json.loads(line) for line in (tmp_path / 'evaluations.jsonl').open()]
    assert [h['step'] for h in history] == [20, 40]
    assert history[0]['cpu_time_s'] == first > 0
    # The second process's own CPU, counted on top of the first's (and no more than it used).
    assert history[1]['cpu_time_s'] == pytest.approx(first + second_process, rel=0.1)
    assert json.loads((tmp_path / 'accuracy.json').read_text())['cpu_time_s'] == (
        history[1]['cpu_time_s'])


def test_finished_run_is_not_retrained(tmp_path):
    cfg = tiny_config(algorithm='supervised', train_steps=10, train_dir=str(tmp_path / 'run'))
    first = run(cfg, algorithms.ALGORITHMS['supervised'](), log=quiet)
    logged = []
    again = run(cfg, algorithms.ALGORITHMS['supervised'](), log=logged.append)
    assert again == first
    assert not any(line.startswith('step ') for line in logged)


@pytest.mark.parametrize('algorithm', ['vat', 'mean_teacher'])
def test_mirrored_strategy_on_two_logical_cpus(algorithm, tmp_path):
    """tf.distribute: two replicas (logical CPUs); per-replica RNG (VAT) and noisy teacher (Mean
    Teacher), EMA update in cross-replica context."""
    import subprocess
    import sys
    out = subprocess.run(
        [sys.executable, '-m', 'ssl_ema.train', '--distribute=mirrored', '--cpu_devices=2',
         f'--algorithm={algorithm}', '--train_steps=40', '--eval_every_kimg=0.625', '--log_every_steps=20',
         f'--train_dir={tmp_path / "run"}'], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / 'run' / 'accuracy.json').read_text())
    assert summary['step'] == 40
    assert summary['ema']['test']['last'] > 50 and summary['raw']['test']['last'] > 50
