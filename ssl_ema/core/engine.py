"""The one training engine: what every loop does whatever it trains, written once.

A driver (core/loop.py's Trainer: SSL training and the self-training rounds of
core/distilling.py; core/pretraining.py's Pretrainer: BYOL, DINO) subclasses Engine, builds its
models, optimizer and tf.train.Checkpoint, and supplies its step and its evaluation:

    batches(start_step)     the distributed iterator (usually `distributed_batches`)
    train_step(iterator)    one compiled step; it calls `self.guard.observe(metrics, self.step)`
                            and advances `self.step`; returns the logged metrics
    evaluate()              the evaluation record of the current step (the chief's)
    evaluation_scalars(result), evaluation_line(result), progress_line(step, metrics)
    guarded_models()        name -> Keras model whose weights the NaN guard checks before a save

The engine owns the rest: restoring the latest checkpoint and the history up to it, the loop to
cfg.total_steps with a progress line every `log_every_steps` and an evaluation every
`eval_every_steps` (checkpoint, evaluations.jsonl, accuracy.json, TensorBoard: core/records.py),
the NaN/Inf guard (core/guard.py) before anything is saved, a checkpoint on Ctrl-C, SIGTERM or a
multi-worker preemption (core/cluster.py), and the wall and CPU time every record carries. The
data stream is a pure function of (seed, step), so restoring the step resumes a run exactly.

Every driver reads data the same way (`distributed_batches`): each input pipeline (one per
worker) builds only its share of each global batch (data/pipeline.py Share), one element per
local replica.
"""
import time

import keras
import tensorflow as tf

from ssl_ema.base.errors import ConfigError
from ssl_ema.core import accuracy, cluster
from ssl_ema.core.guard import NonFiniteGuard
from ssl_ema.core.records import RunRecords
from ssl_ema.data import pipeline


class Engine:
    # Also evaluate before the first step (the record of the initialisation: pretraining's).
    evaluates_initialisation = False
    # Evaluations record the training speed since the previous one (images_per_sec).
    records_speed = True

    def __init__(self, cfg, train_dir: str, strategy=None):
        """Before the driver builds its models: the strategy, the batch's check, the seed, the
        step counter and the guard."""
        self.cfg, self.train_dir = cfg, train_dir
        self.strategy = strategy or tf.distribute.get_strategy()
        replicas = self.strategy.num_replicas_in_sync
        if cfg.batch % replicas:   # every replica gets an equal share of the global batch
            raise ConfigError(f'--batch={cfg.batch} must be a multiple of the {replicas} replicas '
                              f'of --distribute={cfg.distribute}')
        keras.utils.set_random_seed(cfg.seed)
        with self.strategy.scope():
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
            self.guard = NonFiniteGuard()

    def open_records(self, checkpoint: tf.train.Checkpoint, cpu_start=None) -> None:
        """After the driver built what it saves: its checkpoint and the run's records. In a
        multi-worker run only the chief writes train_dir and evaluates."""
        self.checkpoint = checkpoint
        self.chief = self.strategy.extended.should_checkpoint
        self.records = RunRecords(self.train_dir, checkpoint, self.chief,
                                  self.cfg.keep_checkpoints, self.cfg.distribute == 'multi_worker',
                                  accuracy.summarize, cpu_start)

    # ---- what a driver supplies --------------------------------------------------------------
    def batches(self, start_step):
        raise NotImplementedError

    def train_step(self, iterator):
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def evaluation_scalars(self, result: dict) -> dict:
        raise NotImplementedError

    def evaluation_line(self, result: dict) -> str:
        raise NotImplementedError

    def progress_line(self, step: int, metrics: dict) -> str:
        raise NotImplementedError

    def guarded_models(self) -> dict:
        raise NotImplementedError

    def start_lines(self) -> list:
        """Lines logged when training starts (after a resume's)."""
        return []

    def checkpoint_to_restore(self, path: str) -> tf.train.Checkpoint:
        """The tf.train.Checkpoint that restores the saved checkpoint `path`: the loop's own, or
        one of fewer objects for a run directory older than some of them (core/loop.py)."""
        return self.checkpoint

    def on_restore(self, step: int) -> None:
        """After the checkpoint of `step` was restored (before the history is cut to it)."""

    def before_step(self, step: int) -> None:
        """Before the update of step `step` + 1 (e.g. a pass over the whole pool on a schedule)."""

    def after_step(self, step: int) -> None:
        """After every step, before its progress line and evaluation."""

    # ---- data --------------------------------------------------------------------------------
    def distributed_batches(self, share_batches):
        """The distributed iterator over `share_batches(share)`: an input pipeline's rows of
        every global batch (data/pipeline.py SSLData.train, labeled, unlabeled with `share=`),
        called once per worker, cut into one element per local replica and prefetched."""
        def replica_batches(context):
            share = pipeline.Share.of(context)
            return share.per_replica(share_batches(share)).prefetch(tf.data.AUTOTUNE)
        return iter(self.strategy.distribute_datasets_from_function(replica_batches))

    # ---- state -------------------------------------------------------------------------------
    def restore(self) -> int:
        """Restore the latest checkpoint if any; returns the step to continue from."""
        self.records.restore(self.checkpoint_to_restore)
        step = int(self.step.numpy())
        self.on_restore(step)
        self.records.keep_history_up_to(step)
        return step

    @property
    def history(self) -> list:
        """Every evaluation so far (evaluations.jsonl)."""
        return self.records.history

    def _check_finite(self, saving=True):
        """RunError if the state turned NaN/Inf (core/guard.py): called before a save."""
        self.guard.check(int(self.step.numpy()), self.guarded_models() if saving else {},
                         self.records.manager.latest_checkpoint)

    def _save(self):
        """Checkpoint the current step (interrupts, preemption): never a non-finite state."""
        self._check_finite()
        self.records.save(int(self.step.numpy()))

    # ---- the loop ----------------------------------------------------------------------------
    def _evaluate_and_record(self, start, log, images_per_sec=None):
        self._check_finite()
        if not self.chief:   # evaluation happens once, on the chief
            return self.records.record({'step': int(self.step.numpy())}, {})
        result = self.evaluate()
        if images_per_sec is not None and self.records_speed:
            result['images_per_sec'] = images_per_sec
        result.update(self.records.times(start))
        self.records.record(result, self.evaluation_scalars(result))
        log(self.evaluation_line(result))

    def _log_progress(self, step, metrics, speed, log):
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics['lr'] = float(self.optimizer.learning_rate)
        metrics['images_per_sec'] = speed
        self.records.scalars(step, metrics)
        log(self.progress_line(step, metrics))

    def _speed(self, mark, step):
        """Training images per second since `mark` = (time, step)."""
        return self.images_per_step * (step - mark[1]) / max(time.time() - mark[0], 1e-9)

    def _due(self, step, every) -> bool:
        return step % every == 0 or step == self.cfg.total_steps

    def train(self, log=print) -> dict:
        """Train to cfg.total_steps (resuming from the last checkpoint); returns the summary."""
        cfg, total = self.cfg, self.cfg.total_steps
        step = self.restore()
        if step:
            log(f'Resuming {self.train_dir} at step {step}/{total}')
        for line in self.start_lines():
            log(line)
        iterator = self.batches(step) if step < total else None
        start = time.time()
        log_mark = eval_mark = (start, step)   # (time, step) of the last progress line / eval
        preemption = None
        try:
            if self.records.scratch and step < total:   # multi-worker: SIGTERM saves on all
                preemption = cluster.preemption_handler(self.strategy, self._save,
                                                        self.records.scratch)
            # An interrupt during an evaluation checkpoints its step without recording it, and
            # the loop below evaluates only at later steps: evaluate the restored step now (its
            # training speed died with the interrupted process).
            if ((step or self.evaluates_initialisation) and self._due(step, cfg.eval_every_steps)
                    and (not self.history or self.history[-1]['step'] != step)):
                self._evaluate_and_record(start, log)
                log_mark = eval_mark = (time.time(), step)
            while step < total:
                if preemption:
                    preemption.save_checkpoint_if_preempted()
                self.before_step(step)
                metrics = self.train_step(iterator)
                step += 1
                self.after_step(step)
                if self._due(step, cfg.log_every_steps):
                    self._check_finite(saving=False)
                    self._log_progress(step, metrics, self._speed(log_mark, step), log)
                    log_mark = (time.time(), step)
                if self._due(step, cfg.eval_every_steps):
                    self._evaluate_and_record(start, log, self._speed(eval_mark, step))
                    # Speeds count training only: both marks restart after an evaluation.
                    log_mark = eval_mark = (time.time(), step)
        except KeyboardInterrupt as interrupt:   # Ctrl-C, SIGTERM: save the step reached
            if not isinstance(interrupt, cluster.Preempted):   # which has saved already
                self._save()
            log(f'Interrupted: saved step {int(self.step.numpy())} in {self.train_dir}; '
                'run the same command again to resume.')
            raise
        finally:
            self.records.close(log)
        return self.records.finish()
