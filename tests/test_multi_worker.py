"""Multi-worker training with real worker processes (python -m ssl_ema.launch, 2 CPU workers on
127.0.0.1): they train exactly like one process on the same global batch, only the chief writes
the run directory, and a lost worker stops the run with its name; the same command resumes it."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from ssl_ema import algorithms
from ssl_ema.core.loop import Trainer

FLAGS = ['--batch=16', '--uratio=2', '--arch=small_cnn', '--eval_every_kimg=0.0625',
         '--log_every_steps=4']   # evaluations and checkpoints every 4 steps
RUN_FILES = {'.lock', 'accuracy.json', 'checkpoints', 'classifier.json', 'evaluations.jsonl', 'export',
             'flagfile', 'flags.json', 'split.json', 'tensorboard'}
TIMEOUT_S = 240   # every process stops by itself; this only bounds a broken one


def launch(train_dir, algorithm, steps, **popen):
    command = [sys.executable, '-m', 'ssl_ema.launch', '--workers=2', '--stop_grace_s=20',
               f'--algorithm={algorithm}', f'--train_steps={steps}', f'--train_dir={train_dir}',
               *FLAGS]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def finish(process, timeout=TIMEOUT_S):
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()   # the workers die with it (the launcher's PR_SET_PDEATHSIG)
        out, err = process.communicate()
        pytest.fail(f'launcher still running after {timeout} s:\n{err[-3000:]}')
    return process.returncode, out, err


def single_process_run(digits_data, train_dir, algorithm, steps):
    """The same training in this process on one device: the reference weights."""
    cfg = tiny_config(algorithm=algorithm, train_steps=steps, eval_every_kimg=0.0625)
    Trainer(cfg, algorithms.ALGORITHMS[algorithm](), digits_data, str(train_dir)).train(
        log=lambda line: None)


def assert_same_weights(reference_dir, run_dir):
    """Student and EMA weights (batch-norm statistics included) of the latest checkpoints."""
    ref, run = (tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(d, 'checkpoints')))
                for d in (reference_dir, run_dir))
    names = sorted(n for n in ref.get_variable_to_shape_map()
                   if n.startswith(('student/', 'teacher/')) and 'OPTIMIZER_SLOT' not in n)
    assert len(names) > 20 and set(names) <= set(run.get_variable_to_shape_map())
    for name in names:
        # Float sums in another order (ring all-reduce): a few kernel entries of fixmatch differ
        # by ~4e-5 after 8 steps; a wrong share of the batch or unsynchronised batch norm, ~1e-2.
        np.testing.assert_allclose(run.get_tensor(name), ref.get_tensor(name), rtol=1e-3,
                                   atol=1e-4, err_msg=name)
    assert ref.get_tensor('step/.ATTRIBUTES/VARIABLE_VALUE') == run.get_tensor(
        'step/.ATTRIBUTES/VARIABLE_VALUE')


def assert_only_the_chiefs_files(run_dir, steps, launches=1):
    assert set(os.listdir(run_dir)) == RUN_FILES
    assert len(os.listdir(run_dir / 'tensorboard')) == launches   # one writer each: the chief's
    checkpoints = {f.split('.')[0] for f in os.listdir(run_dir / 'checkpoints')}
    kept = range(max(4, steps - 8), steps + 1, 4)   # the last 3 (--keep_checkpoints)
    assert checkpoints == {'checkpoint'} | {f'ckpt-{step}' for step in kept}


@pytest.mark.parametrize('algorithm', ['supervised', 'fixmatch'])
def test_two_workers_train_like_one_process(algorithm, digits_data, tmp_path):
    code, out, err = finish(launch(tmp_path / 'run', algorithm, 8))
    assert code == 0, err[-3000:]
    assert 'step 8/8' in out and 'accuracy (%)' in out   # the chief's output is streamed
    single_process_run(digits_data, tmp_path / 'one', algorithm, 8)
    assert_same_weights(tmp_path / 'one', tmp_path / 'run')
    assert_only_the_chiefs_files(tmp_path / 'run', 8)


def workers_of(launcher):
    """{worker index: pid} of the launcher's children."""
    pid = launcher.pid
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        children = [int(c) for c in f.read().split()]
    workers = {}
    for child in children:
        with open(f'/proc/{child}/environ', 'rb') as f:
            env = dict(v.split(b'=', 1) for v in f.read().split(b'\0') if b'=' in v)
        workers[int(env[b'TF_CONFIG'].split(b'"index": ')[1].split(b'}')[0])] = child
    return workers


def test_lost_worker_stops_the_run_and_the_same_command_resumes(digits_data, tmp_path):
    run_dir, steps = tmp_path / 'run', 24
    launcher = launch(run_dir, 'supervised', steps)
    deadline = time.time() + TIMEOUT_S
    while not (run_dir / 'checkpoints' / 'ckpt-8.index').exists():
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[1]
        time.sleep(0.1)
    os.kill(workers_of(launcher)[1], signal.SIGKILL)
    killed = time.time()
    code, _, err = finish(launcher, timeout=60)
    assert time.time() - killed < 60
    assert code != 0
    assert 'error: worker 1 (pid' in err and 'was killed by SIGKILL' in err   # the launcher
    assert 'error: lost worker 1 (' in err                                     # the chief
    assert not (run_dir / 'checkpoints' / f'ckpt-{steps}.index').exists()

    code, out, err = finish(launch(run_dir, 'supervised', steps))   # the same command
    assert code == 0, err[-3000:]
    assert f'Resuming {run_dir} at step ' in out and f'step {steps}/{steps}' in out
    single_process_run(digits_data, tmp_path / 'one', 'supervised', steps)
    assert_same_weights(tmp_path / 'one', run_dir)
    assert_only_the_chiefs_files(run_dir, steps, launches=2)


def test_each_replica_gets_its_rows_of_every_global_batch():
    from ssl_ema.data.pipeline import Share
    # worker 1 of 2, with 2 replicas each: replicas 2 and 3 of 4, rows [4, 6) and [6, 8)
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1,
                                         num_replicas_in_sync=4)
    share = Share.of(context)
    assert share.rows(8) == (4, 4)
    first, rows = share.rows(8)
    batches = tf.data.Dataset.range(16).batch(8).map(   # this worker's rows of two batches
        lambda x: (x[first:first + rows], -x[first:first + rows]))
    shares = [(x.tolist(), y.tolist())
              for x, y in share.per_replica(batches).as_numpy_iterator()]
    assert shares == [([4, 5], [-4, -5]), ([6, 7], [-6, -7]),
                      ([12, 13], [-12, -13]), ([14, 15], [-14, -15])]


def test_multi_worker_needs_a_cluster(monkeypatch):
    from ssl_ema.core import cluster
    from ssl_ema.base.errors import ConfigError
    for name in ('TF_CONFIG', 'SLURM_PROCID'):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r'needs a cluster: \$TF_CONFIG .* or a SLURM job step'):
        cluster.strategy()
    monkeypatch.setenv('TF_CONFIG', '{"cluster": ')
    with pytest.raises(ConfigError, match=r'\$TF_CONFIG does not describe a cluster'):
        cluster.strategy()


def test_launcher_refuses_another_strategy():
    out = subprocess.run([sys.executable, '-m', 'ssl_ema.launch', '--workers=2',
                          '--distribute=mirrored'], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == ('error: --distribute=mirrored: the launcher '
                                                   'trains with --distribute=multi_worker; drop it')


def test_each_local_process_gets_its_own_gpu():
    """ssl_ema.launch's workers and benchmark --jobs' trainings: one GPU each from what the
    parent sees (round-robin past the last), memory growth on unless the user chose; no GPU, the
    environment untouched."""
    from ssl_ema.base.machine import process_environments, visible_gpus
    assert visible_gpus({'CUDA_VISIBLE_DEVICES': '2,5'}) == ['2', '5']
    assert visible_gpus({'CUDA_VISIBLE_DEVICES': '2,5'}, gpus='1, 3') == ['1', '3']   # --gpus
    assert visible_gpus({'CUDA_VISIBLE_DEVICES': ''}) == []
    assert visible_gpus({'CUDA_VISIBLE_DEVICES': '-1'}) == []
    assert visible_gpus({}, device_files=['/dev/nvidia10', '/dev/nvidiactl', '/dev/nvidia2',
                                          '/dev/nvidia-uvm', '/dev/nvidia0']) == ['0', '2', '10']
    parent = {'CUDA_VISIBLE_DEVICES': '2,5', 'PATH': '/bin'}
    plan = process_environments(3, visible_gpus(parent), parent)
    assert [env['CUDA_VISIBLE_DEVICES'] for env in plan] == ['2', '5', '2']
    assert all(env['TF_FORCE_GPU_ALLOW_GROWTH'] == 'true' and env['PATH'] == '/bin'
               for env in plan)
    chosen = dict(parent, TF_FORCE_GPU_ALLOW_GROWTH='false')
    assert process_environments(1, ['0'], chosen)[0]['TF_FORCE_GPU_ALLOW_GROWTH'] == 'false'
    assert process_environments(2, visible_gpus({}, device_files=[]), {'PATH': '/bin'}) == [
        {'PATH': '/bin'}, {'PATH': '/bin'}]


def test_grid_jobs_take_the_gpu_of_their_slot(monkeypatch, tmp_path):
    """benchmark --jobs=2 over two GPUs: the runs alternate, a run taking the GPU that the
    finished one left (the environments each training process was started with)."""
    from ssl_ema.core import grid
    started = []

    class Finished:
        returncode = 0

        def __init__(self, command, env, **kwargs):
            started.append(env['CUDA_VISIBLE_DEVICES'])

        def poll(self):
            return 0

    monkeypatch.setattr(grid.subprocess, 'Popen', Finished)
    monkeypatch.setattr(grid, 'train_command', lambda run: ['true'])
    monkeypatch.setattr(grid, 'run_status', lambda *args: ('done', 1))
    monkeypatch.setattr(grid, '_ema_test', lambda train_dir: '')
    runs = [grid.GridRun(tiny_config(train_dir=str(tmp_path / str(i))), None, str(i), 'new')
            for i in range(3)]
    assert grid.run_grid(runs, jobs=2, log=lambda line: None, poll_seconds=0.,
                         gpus=['0', '1']) == []
    assert started == ['0', '1', '0']
