"""Multi-worker training on one machine: `python -m ssl_ema.launch --workers=N [training flags]`.

Starts N `python -m ssl_ema.train --distribute=multi_worker [training flags]` processes, each with
a $TF_CONFIG that names all of them on free ports of 127.0.0.1 (worker 0 is the chief: the only
one that evaluates and writes the run directory). The chief's output is streamed; each other
worker's goes to a temporary log, shown if that worker fails. When a worker fails, the others are
stopped and the launcher exits non-zero naming it; Ctrl-C stops them all (a SIGTERM each, which
makes them save a checkpoint together first). The same command then resumes from the last
checkpoint. Each worker sees one GPU of its own (--gpus; memory growth on). On a cluster, run the
training command itself on every machine (docs/distributed.md: SLURM).
"""
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from ssl_ema.base.machine import process_environments, visible_gpus

flags.DEFINE_integer('workers', 2, 'Worker processes to start on this machine.')
flags.DEFINE_string('gpus', None, 'Comma-separated GPU ids the workers are spread over, one '
                    'each (round-robin; default: $CUDA_VISIBLE_DEVICES, else every GPU of this '
                    'machine; none: the environment is left as it is).')
flags.DEFINE_float('stop_grace_s', 60., 'Seconds a worker gets to exit (after Ctrl-C: to save '
                   'a checkpoint) before it is killed.')
FLAGS = flags.FLAGS
POLL_S = 0.2


def free_ports(n: int) -> list:
    """n distinct free TCP ports on 127.0.0.1 (bound together, so they differ, then released)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(('127.0.0.1', 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_configs(ports: list) -> list:
    """The $TF_CONFIG of each worker of a local cluster (worker 0, with no `chief` job, is the
    chief of tf.distribute.MultiWorkerMirroredStrategy)."""
    cluster = {'worker': [f'127.0.0.1:{port}' for port in ports]}
    return [json.dumps({'cluster': cluster, 'task': {'type': 'worker', 'index': i}})
            for i in range(len(ports))]


def _die_with_parent():
    """In the child: SIGTERM when the launcher dies (even by SIGKILL), so no worker is orphaned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG (Linux)
    except (AttributeError, OSError):
        pass


def start_workers(train_args: list, log_dir: str) -> list:
    command = [sys.executable, '-m', 'ssl_ema.train', *train_args, '--distribute=multi_worker']
    workers = []
    # One GPU per worker: all of them on every GPU would each take every GPU's memory.
    environments = process_environments(FLAGS.workers, visible_gpus(gpus=FLAGS.gpus))
    for index, tf_config in enumerate(tf_configs(free_ports(FLAGS.workers))):
        log = None if index == 0 else open(os.path.join(log_dir, f'worker{index}.log'), 'wb')
        # A worker's scratch files go under log_dir, removed at the end even if it was killed.
        tmp = os.path.join(log_dir, f'worker{index}.tmp')
        os.mkdir(tmp)
        workers.append(subprocess.Popen(
            command, env=dict(environments[index], TF_CONFIG=tf_config, TMPDIR=tmp), stdout=log,
            stderr=subprocess.STDOUT if log else None, start_new_session=True,
            preexec_fn=_die_with_parent))
        if log:
            log.close()   # the worker holds its own copy
    return workers


def describe(index: int, worker, code: int) -> str:
    how = (f'was killed by {signal.Signals(-code).name}' if code < 0
           else f'exited with code {code}')
    return f'worker {index} (pid {worker.pid}) {how}'


def stop(workers: list, grace_s: float, signal_first=signal.SIGTERM) -> set:
    """Send `signal_first` to every running worker (None: nothing), SIGKILL those still running
    after grace_s seconds; returns the indices of the workers it had to kill."""
    for w in workers:
        if w.poll() is None and signal_first:
            w.send_signal(signal_first)
    deadline = time.time() + grace_s
    while any(w.poll() is None for w in workers) and time.time() < deadline:
        time.sleep(POLL_S)
    forced = set()
    for index, w in enumerate(workers):
        if w.poll() is None:
            w.kill()
            w.wait()
            forced.add(index)
    return forced


def supervise(workers: list):
    """Wait until every worker has succeeded (None) or one has failed: (index, exit code)."""
    while True:
        for index, w in enumerate(workers):
            code = w.poll()
            if code:
                return index, code
        if all(w.poll() == 0 for w in workers):
            return None
        time.sleep(POLL_S)


def tail(path: str, lines: int = 20) -> str:
    with open(path, 'rb') as f:
        return b''.join(f.readlines()[-lines:]).decode(errors='replace')


def main(argv):
    train_args = argv[1:]
    if FLAGS.workers < 1:
        sys.exit(f'error: --workers={FLAGS.workers} must be a positive integer')
    for arg in train_args:
        if arg.startswith('--distribute=') and arg != '--distribute=multi_worker':
            sys.exit(f'error: {arg}: the launcher trains with --distribute=multi_worker; drop it')

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    with tempfile.TemporaryDirectory(prefix='ssl_ema_launch_') as log_dir:
        workers = start_workers(train_args, log_dir)
        try:
            failed = supervise(workers)
        except KeyboardInterrupt:
            print(f'Stopping {len(workers)} workers (each saves a checkpoint first)...',
                  file=sys.stderr)
            stop(workers, FLAGS.stop_grace_s)
            sys.exit(130)
        if failed is None:
            return
        index, code = failed
        # The others notice the lost worker themselves within seconds (and say so); a SIGTERM
        # would only make them try to save a checkpoint together with it.
        forced = stop(workers, FLAGS.stop_grace_s, signal_first=None)
        # Name the cause: a worker killed by a signal (not by us) if there is one. Its loss makes
        # the others exit with code 1 within seconds, and one of those may be seen first.
        killed = [i for i, w in enumerate(workers) if w.returncode < 0 and i not in forced]
        if killed and index not in killed:
            index, code = killed[0], workers[killed[0]].returncode
        if index:   # the chief's output was streamed already
            log = os.path.join(log_dir, f'worker{index}.log')
            print(f'--- last lines of worker {index}:\n{tail(log)}', file=sys.stderr)
        sys.exit(f'error: {describe(index, workers[index], code)}; stopped the other workers. '
                 'Running the same command again resumes from the last checkpoint.')


if __name__ == '__main__':
    app.run(main, flags_parser=lambda argv: FLAGS(argv, known_only=True))
