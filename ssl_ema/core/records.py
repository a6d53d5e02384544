"""What a training loop leaves in its run directory while it trains: checkpoints, the evaluation
history, accuracy.json and TensorBoard scalars, each write failure turned into one RunError.

Shared by every loop (the SSL Trainer, self-supervised pretraining): a loop says what to save
(a tf.train.Checkpoint) and hands over each evaluation; this module decides where it goes and in
which order, so that a run killed at any moment resumes from what is on disk.

Multi-worker (core/cluster.py): only the chief writes the run directory. Every worker still saves
each checkpoint, as TensorFlow asks (saving may read variables through collectives), the others
into a scratch directory removed when training ends.
"""
import contextlib
import glob
import os
import re
import shutil
import tempfile
import time
from typing import Optional

import tensorflow as tf

from ssl_ema.base.errors import RunError, one_line
from ssl_ema.core import run_dir


class RunRecords:
    def __init__(self, train_dir: str, checkpoint: tf.train.Checkpoint, chief: bool = True,
                 keep_checkpoints: int = 3, multi_worker: bool = False,
                 summarize=lambda history: {}, cpu_start: Optional[float] = None):
        """`cpu_start`: time.process_time() when the command's work on this run began (default:
        now), so a Python process that makes several runs counts each its own CPU."""
        self.train_dir, self.chief, self.summarize = train_dir, chief, summarize
        self.cpu_start = time.process_time() if cpu_start is None else cpu_start
        self.checkpoint_dir = os.path.join(train_dir, run_dir.CHECKPOINTS)
        self.scratch = tempfile.mkdtemp(prefix='ssl_ema_worker_') if multi_worker else None
        self.manager = tf.train.CheckpointManager(
            checkpoint, self.checkpoint_dir if chief else
            os.path.join(self.scratch, run_dir.CHECKPOINTS), keep_checkpoints)
        self.writer = (tf.summary.create_file_writer(os.path.join(train_dir, run_dir.TENSORBOARD))
                       if chief else tf.summary.create_noop_writer())
        self.history = []
        # Seconds before this process, from the history: training wall time, and CPU time
        # (every thread's, as /usr/bin/time's user + system) of the processes before this one.
        self.wall_time = self.cpu_time = 0.

    def restore(self, checkpoint) -> None:
        """Restore the latest checkpoint (the chief's, on every worker) if there is one, and
        drop the evaluations logged after it: the resumed run redoes them. `checkpoint`: the
        tf.train.Checkpoint to restore into, or a function of the latest checkpoint's path that
        returns it (a loop whose checkpoint gained objects since older run directories)."""
        latest = tf.train.latest_checkpoint(self.checkpoint_dir)
        if latest:
            if not isinstance(checkpoint, tf.train.Checkpoint):
                checkpoint = checkpoint(latest)
            checkpoint.restore(latest).assert_existing_objects_matched()

    def keep_history_up_to(self, step: int) -> None:
        if self.chief:
            self.history = run_dir.read_history(self.train_dir, up_to_step=step)
            with self.writing():
                run_dir.write_history(self.train_dir, self.history)
        if self.history:
            self.wall_time = self.history[-1]['wall_time_s']
            # The earlier process's CPU up to its last evaluation (absent in older runs: 0).
            self.cpu_time = self.history[-1].get('cpu_time_s', 0.)

    @contextlib.contextmanager
    def writing(self):
        """A failed write (full disk, read-only or vanished directory) becomes a one-line
        RunError; the files it was replacing and the checkpoints before it are left intact."""
        try:
            yield
        except (OSError, tf.errors.OpError) as e:
            if isinstance(e, OSError):
                what = f'{e.filename}: {e.strerror}' if e.filename else one_line(e)
            else:   # TensorFlow's message without its op and function names
                what = re.sub(r'\{\{.*?\}\}|\[Op:\w+\]', '', one_line(e)).strip()
            for partial in glob.glob(os.path.join(self.checkpoint_dir, '*_temp')):
                shutil.rmtree(partial, ignore_errors=True)   # a checkpoint that was never whole
            kept = self.manager.latest_checkpoint or 'none yet'
            raise RunError(f'cannot write in {self.train_dir} ({what}); the latest checkpoint '
                           f'({kept}) and the files before it are intact: make room, then run '
                           'the same command again to resume') from None

    def record(self, result: dict, scalars: dict) -> None:
        """An evaluation: the history first (a resumed run drops what is newer than its
        checkpoint), then the checkpoint, then accuracy.json, then TensorBoard's `scalars`."""
        if not self.chief:
            self.manager.save(checkpoint_number=result['step'])   # into the scratch directory
            return
        self.history.append(result)
        with self.writing():
            run_dir.write_history(self.train_dir, self.history)
            self.manager.save(checkpoint_number=result['step'])
            run_dir.write_summary(self.train_dir, self.summarize(self.history))
        self.scalars(result['step'], scalars)

    def scalars(self, step: int, values: dict) -> None:
        with self.writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def save(self, step: int) -> None:
        """A checkpoint between evaluations (an interrupt, a preemption)."""
        with self.writing():
            self.manager.save(checkpoint_number=step)

    def elapsed(self, start: float) -> float:
        """Training wall time of the run so far, this process having started at `start`."""
        return self.wall_time + time.time() - start

    def times(self, start: float) -> dict:
        """The evaluation record's clocks: `wall_time_s` (training, as `elapsed`) and
        `cpu_time_s`, the CPU-seconds of every thread of the processes that made the run so far,
        start-up, data loading and evaluations included (what /usr/bin/time counts as user +
        system), cumulative across resumes (each earlier process up to its last evaluation)."""
        return {'wall_time_s': self.elapsed(start),
                'cpu_time_s': self.cpu_time + time.process_time() - self.cpu_start}

    def close(self, log=print) -> None:
        """Flush TensorBoard and remove a worker's scratch directory."""
        try:
            self.writer.flush()
        except tf.errors.OpError as e:   # TensorBoard's scalars are not worth a traceback
            log(f'warning: TensorBoard summaries in {self.train_dir} not written: {one_line(e)}')
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def finish(self) -> dict:
        """accuracy.json once more (repairs a kill between a checkpoint and it); the summary."""
        if self.history and self.chief:
            with self.writing():
                run_dir.write_summary(self.train_dir, self.summarize(self.history))
        return self.summarize(self.history)
