"""The one training loop shared by every algorithm.

Per step: the algorithm's loss on a labeled batch and its unlabeled views (the student in
training mode; whether targets come from the student or the EMA teacher is the algorithm's
choice), one optimizer step on the student, one update of every average (the EMA teacher, extra
horizons, Polyak, post-hoc EMA profiles; core/ema.py). Every `eval_every_steps`: accuracy of
the raw student and of every average but the post-hoc profiles on validation and test, a
checkpoint, TensorBoard scalars and accuracy.json; every `posthoc_snapshot_every_kimg` a
snapshot of the post-hoc profiles (core/snapshots.py). The data stream is a pure function of
(seed, step), so restoring the checkpoint's step, weights, optimizer and RNG state resumes a run
exactly where it stopped.
"""
import contextlib
import os
import time

import keras
import tensorflow as tf

from ssl_ema.algorithms import Batch, base
from ssl_ema.base.config import TrainConfig
from ssl_ema.base.errors import ConfigError
from ssl_ema.core import accuracy, cluster, run_dir, snapshots
from ssl_ema.core.ema import averages_of, describe_averages, posthoc_profiles, statistics_batches
from ssl_ema.core.guard import NonFiniteGuard
from ssl_ema.core.optimization import decayed_variables, l2_penalty, learning_rate, make_optimizer
from ssl_ema.core.records import RunRecords
from ssl_ema.data import pipeline
from ssl_ema.nn import backbones, custom_backbones, losses


def _shrink(variable, factor):
    variable.assign(variable * factor)


class Trainer:
    def __init__(self, cfg: TrainConfig, algorithm, data, train_dir: str, strategy=None,
                 backbone=None, cpu_start=None):
        self.cfg, self.algorithm, self.data, self.train_dir = cfg, algorithm, data, train_dir
        self.strategy = strategy or tf.distribute.get_strategy()
        replicas = self.strategy.num_replicas_in_sync
        if cfg.batch % replicas:   # every replica gets an equal share of the global batch
            raise ConfigError(f'--batch={cfg.batch} must be a multiple of the {replicas} replicas '
                              f'of --distribute={cfg.distribute}')
        keras.utils.set_random_seed(cfg.seed)
        with self.strategy.scope():
            self.student = backbones.for_run(cfg, data.image_shape, data.num_classes,
                                             (data.mean, data.std), model=backbone)
            self.averages = averages_of(self.student, cfg)   # name -> average; 'ema': the teacher
            self.ema = self.averages['ema']
            self.profiles = posthoc_profiles(self.student, cfg)
            self._build_algorithm_state(data)
            self.learning_rate = learning_rate(cfg)
            self.optimizer = make_optimizer(cfg, self.learning_rate)
            # Per-variable learning-rate multipliers (1 unless --layer_decay or --head_lr).
            self.lr_multipliers = custom_backbones.lr_multipliers(
                self.student, self.trainable, cfg.layer_decay,
                cfg.head_lr / cfg.lr if cfg.head_lr else 1.)
            if hasattr(self.optimizer, 'set_multipliers'):
                self.optimizer.set_multipliers(self.lr_multipliers)
            if cfg.precision == 'mixed_float16':   # float16 gradients underflow without it
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(self.trainable)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
            self.rng = tf.random.Generator.from_seed(cfg.seed)
            self.guard = NonFiniteGuard()
        self.decayed = decayed_variables(self.student) if cfg.weight_decay else []
        # Model-input units per unit of the anchors' [-1, 1] pixel scale, per channel.
        self.pixel_scale = tf.constant(getattr(data, 'pixel_scale', 1.), tf.float32)
        # Model variables are listed explicitly: this includes the dropout seed generators,
        # which Keras models do not expose to tf.train.Checkpoint themselves.
        self.checkpoint = tf.train.Checkpoint(
            step=self.step, student=list(self.student.variables),
            teacher=list(self.ema.model.variables), ema_updates=self.ema.updates,
            optimizer=self.optimizer, rng=self.rng, algorithm_state=self.state,
            heads=self.head_variables,
            averages={a.name: list(a.model.variables) + [a.updates]
                      for a in self._all_averages() if a is not self.ema})
        # Multi-worker (core/cluster.py): only the chief writes train_dir and evaluates.
        self.chief = self.strategy.extended.should_checkpoint
        self.records = RunRecords(train_dir, self.checkpoint, self.chief, cfg.keep_checkpoints,
                                  cfg.distribute == 'multi_worker', accuracy.summarize,
                                  cpu_start)
        self.predict = {'raw': accuracy.make_predict(self.student, data.image_shape)}
        self.predict.update({name: accuracy.make_predict(a.model, data.image_shape)
                             for name, a in self.averages.items()})
        self._statistics_batches = None   # --ema_bn=recompute's, made at the first evaluation
        self.eval_arrays = data.eval_arrays()
        self.images_per_step = cfg.batch * (1 + (cfg.uratio if algorithm.views else 0))
        # XLA compiles each replica's step (the iterator and the cross-replica EMA update stay
        # outside it); runs/SPEED.md has the measurements behind --jit_compile's default.
        self._compiled_replica_step = (tf.function(self._replica_step, jit_compile=True)
                                       if cfg.jit_compile else self._replica_step)

    # ---- the averages -----------------------------------------------------------------------
    def _all_averages(self):
        return list(self.averages.values()) + self.profiles

    def _evaluation_statistics(self, name):
        """The context in which model `name` is evaluated (--ema_bn=recompute's statistics)."""
        average = self.averages.get(name)
        if average is None or average.bn != 'recompute':
            return contextlib.nullcontext()
        if self._statistics_batches is None:
            self._statistics_batches = statistics_batches(self.data, self.cfg,
                                                          bool(self.algorithm.views))
        return average.statistics_for_evaluation(self._statistics_batches)

    def _snapshot_due(self, step) -> bool:
        every = self.cfg.posthoc_snapshot_every_kimg
        if not self.profiles:
            return False
        every_steps = max(1, round(every * 1024 / self.cfg.batch))
        return step % every_steps == 0 or step == self.cfg.total_steps

    # ---- the algorithm's own state and heads ------------------------------------------------
    def _build_algorithm_state(self, data):
        """Variables for the algorithm's declared state (checkpointed; every replica keeps the
        first replica's update, which the algorithm computes from cross-replica statistics) and
        its extra heads (trained with the student, not part of the EMA or the evaluation)."""
        initial = base.initial_state(self.algorithm, data.num_classes, data.unlabeled_size)
        self.state = {name: tf.Variable(value, trainable=False, name=f'algorithm_state_{name}',
                                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                      for name, value in initial.items()}
        self.heads = (base.with_heads(self.student, self.algorithm.heads)
                      if self.algorithm.heads else None)
        own = {id(v) for v in self.student.trainable_variables}
        self.head_variables = [v for v in (self.heads.trainable_variables if self.heads else [])
                               if id(v) not in own]
        self.trainable = list(self.student.trainable_variables) + self.head_variables

    # ---- state ------------------------------------------------------------------------------
    def restore(self) -> int:
        """Restore the latest checkpoint if any; returns the step to continue from."""
        self.records.restore(self.checkpoint)
        step = int(self.step.numpy())
        if self.chief:
            snapshots.remove_snapshots_after(self.train_dir, step)   # the resumed run redoes them
        self.records.keep_history_up_to(step)
        return step

    @property
    def history(self) -> list:
        """Every evaluation so far (evaluations.jsonl)."""
        return self.records.history

    # ---- one step ---------------------------------------------------------------------------
    def _replica_step(self, labeled_x, labels, unlabeled):
        progress = tf.cast(self.step, tf.float32) / self.cfg.total_steps
        ramp = losses.RAMPUPS[self.algorithm.ramp_up](progress, self.cfg.warmup_fraction)
        index = None
        if self.algorithm.needs_indices:
            unlabeled, index = unlabeled[:-1], unlabeled[-1]
        state = {k: tf.identity(v) for k, v in self.state.items()}
        batch = Batch(labeled_x, labels, tuple(unlabeled), ramp, self.rng, progress,
                      self.pixel_scale, state, index, self.heads)
        l2 = self.cfg.weight_decay_type == 'l2' and bool(self.decayed)
        with tf.GradientTape() as tape:
            out = self.algorithm(self.student, self.ema, batch)
            total = out.labeled + out.unlabeled
            if l2:   # through the optimizer's momentum, as the anchors' SGD algorithms
                decay = self.cfg.weight_decay * l2_penalty(self.decayed)
            # Each replica averages over its share of the batch; the optimizer sums replicas.
            scaled = (total + decay if l2 else total) / self.strategy.num_replicas_in_sync
            # The loss scale of --precision=mixed_float16 (identity otherwise).
            scaled = self.optimizer.scale_loss(scaled)
        grads = tape.gradient(scaled, self.trainable)
        self.optimizer.apply(grads, self.trainable)
        for name, value in out.state.items():
            self.state[name].assign(value)
        metrics = {'loss/total': total, 'loss/labeled': out.labeled, 'loss/unlabeled': out.unlabeled,
                   'consistency_weight': ramp * self.algorithm.consistency_weight}
        if l2:
            metrics['loss/weight_decay'] = decay
        metrics.update({f'algorithm/{k}': v for k, v in out.metrics.items()})
        return metrics

    @tf.function
    def train_step(self, iterator):
        (labeled_x, labels), unlabeled = next(iterator)
        per_replica = self.strategy.run(self._compiled_replica_step,
                                        args=(labeled_x, labels, unlabeled))
        if self.cfg.weight_decay_type == 'decoupled' and self.decayed:
            # After the optimizer step, with this step's lr, as the anchors' vat.py and ict.py.
            # Each variable's own lr (--layer_decay, --head_lr), as USB's AdamW parameter groups.
            rate = self.cfg.weight_decay * self.learning_rate(self.step)
            multiplier = {id(v): m for v, m in zip(self.trainable, self.lr_multipliers)}
            for v in self.decayed:
                m = multiplier.get(id(v), 1.)
                cluster.update_every_copy(self.strategy, v, _shrink,
                                          1. - (rate if m == 1. else rate * m))
        for average in self._all_averages():
            average.update(self.strategy)   # each replica its own copy, from its own weights
        self.step.assign_add(1)
        metrics = {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                   for k, v in per_replica.items()}
        self.guard.observe(metrics, self.step)
        return metrics

    def batches(self, start_step):
        cfg, views = self.cfg, tuple(self.algorithm.views)

        def replica_batches(context):   # called once per worker: it builds only its share
            share = pipeline.Share.of(context)
            if views:
                ds = self.data.train(cfg.batch, cfg.uratio, views, start_step,
                                     self.algorithm.needs_indices, share=share)
            else:   # supervised: never touch the unlabeled pool
                ds = self.data.labeled(cfg.batch, start_step, share=share)
            ds = share.per_replica(ds)
            if not views:
                ds = ds.map(lambda x, y: ((x, y), ()))
            return ds.prefetch(tf.data.AUTOTUNE)
        return iter(self.strategy.distribute_datasets_from_function(replica_batches))

    # ---- the loop ---------------------------------------------------------------------------
    def evaluate(self) -> dict:
        step = int(self.step.numpy())
        result = {'step': step, 'kimg': step * self.cfg.batch / 1024}
        for model, predict in self.predict.items():
            with self._evaluation_statistics(model):
                result[model] = {split: accuracy.accuracy(predict, x, y)
                                 for split, (x, y) in self.eval_arrays.items()}
        return result

    def _check_finite(self, saving=True):
        """RunError if the state turned NaN/Inf (see core/guard.py): called before a save."""
        models = {'student': self.student, 'EMA': self.ema.model} if saving else {}
        self.guard.check(int(self.step.numpy()), models, self.records.manager.latest_checkpoint)

    def _record(self, result):
        self.records.record(result, {f'accuracy/{model}/{split}': acc for model in self.predict
                                     if model in result for split, acc in result[model].items()})

    def _log_progress(self, step, metrics, speed, log):
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics['lr'] = float(self.optimizer.learning_rate)
        metrics['images_per_sec'] = speed
        self.records.scalars(step, metrics)
        total = self.cfg.total_steps
        eta = (total - step) * self.images_per_step / speed
        log(f'step {step}/{total} '
            + ' '.join(f'{k[5:]}={v:.4g}' for k, v in metrics.items() if k.startswith('loss/'))
            + f' | {speed:.0f} img/s | ETA {time.strftime("%H:%M:%S", time.gmtime(eta))}')

    def _evaluate_and_record(self, start, log, images_per_sec=None):
        self._check_finite()
        if not self.chief:   # evaluation happens once, on the chief
            return self._record({'step': int(self.step.numpy())})
        result = self.evaluate()
        if images_per_sec is not None:
            result['images_per_sec'] = images_per_sec
        result.update(self.records.times(start))
        self._record(result)
        log(f'kimg {result["kimg"]:.1f} accuracy raw/ema: ' + ', '.join(
            f'{s} {result["raw"][s]:.2f}/{result["ema"][s]:.2f}' for s in result['raw'])
            + ''.join(f' | {m} ' + '/'.join(f'{v:.2f}' for v in result[m].values())
                      for m in self.predict if m not in ('raw', 'ema')))

    def train(self, log=print):
        """Train to cfg.total_steps (resuming from the last checkpoint); returns the summary."""
        cfg, total = self.cfg, self.cfg.total_steps
        step = self.restore()
        if step:
            log(f'Resuming {self.train_dir} at step {step}/{total}')
        log(describe_averages(self.averages, self.profiles, cfg,
                              os.path.join(self.train_dir, run_dir.SNAPSHOTS)))
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
            if (step and (step % cfg.eval_every_steps == 0 or step == total)
                    and (not self.history or self.history[-1]['step'] != step)):
                self._evaluate_and_record(start, log)
                log_mark = eval_mark = (time.time(), step)
            while step < total:
                if preemption:
                    preemption.save_checkpoint_if_preempted()
                metrics = self.train_step(iterator)
                step += 1
                if self.chief and self._snapshot_due(step):
                    snapshots.save_snapshot(self.train_dir, step, self.profiles)
                if step % cfg.log_every_steps == 0 or step == total:
                    self._check_finite(saving=False)
                    self._log_progress(step, metrics, self._speed(log_mark, step), log)
                    log_mark = (time.time(), step)
                if step % cfg.eval_every_steps == 0 or step == total:
                    self._evaluate_and_record(start, log, self._speed(eval_mark, step))
                    # Speeds count training only: both marks restart after an evaluation.
                    log_mark = eval_mark = (time.time(), step)
        except KeyboardInterrupt as interrupt:
            if not isinstance(interrupt, cluster.Preempted):   # which has saved already
                self._save()
            log(f'Interrupted: saved step {int(self.step.numpy())} in {self.train_dir}; '
                'run the same command again to resume.')
            raise
        finally:
            self.records.close(log)
        return self.records.finish()

    def _save(self):
        """Checkpoint the current step (interrupts, preemption): never a non-finite state."""
        self._check_finite()
        self.records.save(int(self.step.numpy()))

    def _speed(self, mark, step):
        """Training images (labeled + unlabeled) per second since `mark` = (time, step)."""
        return self.images_per_step * (step - mark[1]) / max(time.time() - mark[0], 1e-9)
