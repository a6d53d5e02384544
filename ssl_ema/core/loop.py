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
import shutil
import tempfile
import time

import keras
import tensorflow as tf

from ssl_ema.nn import backbones, losses
from ssl_ema.core import accuracy, cluster, run_dir, snapshots
from ssl_ema.algorithms import Batch, base
from ssl_ema.base.errors import ConfigError, one_line
from ssl_ema.base.config import TrainConfig
from ssl_ema.base.hparams import parse_floats
from ssl_ema.data import pipeline
from ssl_ema.core.ema import EMA, Polyak, PowerEMA, scaled_decay
from ssl_ema.core.guard import NonFiniteGuard

class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """Peak `lr`, then the anchors' cosine decay lr * cos(7 pi t / 16 T) (or constant)."""

    def __init__(self, lr, total_steps, decay='cosine'):
        self.lr, self.total_steps, self.decay = lr, total_steps, decay

    def __call__(self, step):
        if self.decay == 'constant':
            return tf.constant(self.lr, tf.float32)
        progress = tf.minimum(tf.cast(step, tf.float32) / self.total_steps, 1.)
        return self.lr * losses.fixmatch_cosine(progress)


def make_optimizer(cfg: TrainConfig, schedule=None):
    """SGD with Nesterov momentum or Adam, as the anchors' tf.compat.v1 MomentumOptimizer
    (use_nesterov) and AdamOptimizer (epsilon 1e-8). Weight decay is not the optimizer's: the
    Trainer applies it (`--weight_decay_type`)."""
    lr = schedule or LearningRate(cfg.lr, cfg.total_steps, cfg.lr_decay)
    if cfg.optimizer == 'sgd':
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=True)
    return keras.optimizers.Adam(lr, beta_1=cfg.momentum, epsilon=1e-8)


def decayed_variables(model):
    """The variables weight decay shrinks: kernels of convolutions and dense layers, not biases
    or batch norm (the anchors select `'kernel' in v.name`)."""
    return [v for v in model.trainable_variables if v.name.endswith('kernel')]


def l2_penalty(variables):
    """sum over variables of sum(v^2) / 2 (tf.nn.l2_loss), the anchors' `loss_wd`."""
    return tf.add_n([tf.nn.l2_loss(v) for v in variables])


def statistics_batches(data, cfg: TrainConfig, unlabeled: bool) -> list:
    """The fixed training batches over which --ema_bn=recompute re-estimates batch-norm
    statistics: the first --ema_bn_batches of the unlabeled stream (weak view), or of the labeled
    one for an algorithm that never reads the unlabeled pool."""
    if unlabeled:
        ds = data.unlabeled(cfg.batch * cfg.uratio, ('weak',)).map(lambda *views: views[0])
    else:
        ds = data.labeled(cfg.batch).map(lambda x, y: x)
    return list(ds.take(cfg.ema_bn_batches))


class Trainer:
    def __init__(self, cfg: TrainConfig, algorithm, data, train_dir: str, strategy=None,
                 backbone=None):
        self.cfg, self.algorithm, self.data, self.train_dir = cfg, algorithm, data, train_dir
        self.strategy = strategy or tf.distribute.get_strategy()
        replicas = self.strategy.num_replicas_in_sync
        if cfg.batch % replicas:   # every replica gets an equal share of the global batch
            raise ConfigError(f'--batch={cfg.batch} must be a multiple of the {replicas} replicas '
                              f'of --distribute={cfg.distribute}')
        keras.utils.set_random_seed(cfg.seed)
        with self.strategy.scope():
            self.student = backbones.build(cfg.arch, data.image_shape, data.num_classes,
                                           conv_bias=cfg.wrn_conv_bias, precision=cfg.precision,
                                           model=backbone)
            self.averages = self._build_averages()   # name -> average; 'ema' is the teacher
            self.ema = self.averages['ema']
            self.profiles = [PowerEMA(self.student, s, cfg.ema_bn, f'power_{s:g}')
                             for s in parse_floats(cfg.posthoc_sigma_rels)
                             ] if cfg.posthoc_snapshot_every_kimg else []
            self._build_algorithm_state(data)
            self.learning_rate = LearningRate(cfg.lr, cfg.total_steps, cfg.lr_decay)
            self.optimizer = make_optimizer(cfg, self.learning_rate)
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
        # Multi-worker (cluster.py): only the chief writes train_dir (and evaluates). Every
        # worker still saves each checkpoint, as TensorFlow asks (saving may read variables
        # through collectives), the others into a scratch directory removed when training ends.
        self.chief = self.strategy.extended.should_checkpoint
        self.checkpoint_dir = os.path.join(train_dir, run_dir.CHECKPOINTS)
        self._scratch = (tempfile.mkdtemp(prefix='ssl_ema_worker_')
                         if cfg.distribute == 'multi_worker' else None)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self.checkpoint_dir if self.chief else
            os.path.join(self._scratch, run_dir.CHECKPOINTS), cfg.keep_checkpoints)
        self.predict = {'raw': accuracy.make_predict(self.student, data.image_shape)}
        self.predict.update({name: accuracy.make_predict(a.model, data.image_shape)
                             for name, a in self.averages.items()})
        self._statistics_batches = None   # --ema_bn=recompute's, made at the first evaluation
        self.eval_arrays = data.eval_arrays()
        self.writer = (tf.summary.create_file_writer(os.path.join(train_dir, run_dir.TENSORBOARD))
                       if self.chief else tf.summary.create_noop_writer())
        self.history = []
        self._wall_time = 0.
        self.images_per_step = cfg.batch * (1 + (cfg.uratio if algorithm.views else 0))
        # XLA compiles each replica's step (the iterator and the cross-replica EMA update stay
        # outside it); runs/SPEED.md has the measurements behind --jit_compile's default.
        self._compiled_replica_step = (tf.function(self._replica_step, jit_compile=True)
                                       if cfg.jit_compile else self._replica_step)

    # ---- the averages -----------------------------------------------------------------------
    def _decay(self, decay):
        """The EMA scaling rule, if on (--ema_reference_batch)."""
        if not self.cfg.ema_reference_batch:
            return decay
        return scaled_decay(decay, self.cfg.batch, self.cfg.ema_reference_batch)

    def _build_averages(self) -> dict:
        cfg = self.cfg
        averages = {'ema': EMA(self.student, self._decay(cfg.ema_decay), cfg.ema_warmup, cfg.ema_bn)}
        for decay in cfg.extra_ema_decays:
            name = f'ema_{decay:g}'
            averages[name] = EMA(self.student, self._decay(decay), cfg.ema_warmup, cfg.ema_bn, name)
        if cfg.polyak_start_fraction >= 0:
            start = round(cfg.polyak_start_fraction * cfg.total_steps)
            averages['polyak'] = Polyak(self.student, start, cfg.ema_bn)
        return averages

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

    def _describe_averages(self) -> str:
        parts = [f'{n} (decay {a.decay:.6g})' if isinstance(a, EMA) else
                 f'{n} (from step {a.start_step})' for n, a in self.averages.items()]
        text = 'averages: ' + ', '.join(parts) + f'; batch-norm statistics: {self.cfg.ema_bn}'
        if self.cfg.ema_reference_batch:
            text += (f'; EMA scaling rule: decays d -> d^{self.cfg.batch / self.cfg.ema_reference_batch:g}'
                     f' (--batch={self.cfg.batch}, --ema_reference_batch='
                     f'{self.cfg.ema_reference_batch})')
        if self.profiles:
            text += ('; post-hoc EMA profiles sigma_rel ' + ', '.join(
                f'{p.sigma_rel:g}' for p in self.profiles) + ' snapshotted into '
                + os.path.join(self.train_dir, run_dir.SNAPSHOTS))
        return text

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
        latest = tf.train.latest_checkpoint(self.checkpoint_dir)   # the chief's, on every worker
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        step = int(self.step.numpy())
        if self.chief:
            snapshots.remove_snapshots_after(self.train_dir, step)   # the resumed run redoes them
        if self.chief:
            # Evaluations logged after the last checkpoint are redone by the resumed run.
            self.history = run_dir.read_history(self.train_dir, up_to_step=step)
            with self._writing():
                run_dir.write_history(self.train_dir, self.history)
        if self.history:
            self._wall_time = self.history[-1]['wall_time_s']
        return step

    def _write_summary(self):
        run_dir.write_summary(self.train_dir, accuracy.summarize(self.history))

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
            shrink = 1. - self.cfg.weight_decay * self.learning_rate(self.step)
            for v in self.decayed:
                v.assign(v * shrink)
        for average in self._all_averages():
            average.update()   # cross-replica context: every replica's copy gets the same average
        self.step.assign_add(1)
        metrics = {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                   for k, v in per_replica.items()}
        self.guard.observe(metrics, self.step)
        return metrics

    def batches(self, start_step):
        cfg, views = self.cfg, tuple(self.algorithm.views)

        def replica_batches(context):   # called once per worker
            if views:
                ds = self.data.train(cfg.batch, cfg.uratio, views, start_step,
                                     self.algorithm.needs_indices)
            else:   # supervised: never touch the unlabeled pool
                ds = self.data.labeled(cfg.batch, start_step)
            ds = pipeline.replica_shares(ds, context)
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
        """RunError if the state turned NaN/Inf (see ssl_ema/guard.py): called before a save."""
        models = {'student': self.student, 'EMA': self.ema.model} if saving else {}
        self.guard.check(int(self.step.numpy()), models, self.manager.latest_checkpoint)

    def _writing(self):
        """A failed write becomes a one-line RunError (run_dir.writing)."""
        return run_dir.writing(self.train_dir, self.manager)

    def _record(self, result):
        if not self.chief:
            self.manager.save(checkpoint_number=result['step'])   # into the scratch directory
            return
        self.history.append(result)
        with self._writing():
            run_dir.write_history(self.train_dir, self.history)   # before the checkpoint: a resumed run drops what is newer
            self.manager.save(checkpoint_number=result['step'])
            self._write_summary()
        with self.writer.as_default(step=result['step']):
            for model in self.predict:
                for split, acc in result[model].items():
                    tf.summary.scalar(f'accuracy/{model}/{split}', acc)

    def _log_progress(self, step, metrics, speed, log):
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics['lr'] = float(self.optimizer.learning_rate)
        metrics['images_per_sec'] = speed
        with self.writer.as_default(step=step):
            for k, v in metrics.items():
                tf.summary.scalar(k, v)
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
        result['wall_time_s'] = self._wall_time + time.time() - start
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
        log(self._describe_averages())
        iterator = self.batches(step) if step < total else None
        start = time.time()
        log_mark = eval_mark = (start, step)   # (time, step) of the last progress line / eval
        preemption = None
        try:
            if self._scratch and step < total:   # multi-worker: SIGTERM saves on all at one step
                preemption = cluster.preemption_handler(self.strategy, self._save, self._scratch)
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
            try:
                self.writer.flush()
            except tf.errors.OpError as e:   # TensorBoard's scalars are not worth a traceback
                log(f'warning: TensorBoard summaries in {self.train_dir} not written: {one_line(e)}')
            if self._scratch:
                shutil.rmtree(self._scratch, ignore_errors=True)
        if self.history:   # also repairs a kill between the checkpoint and accuracy.json
            with self._writing():
                self._write_summary()
        return accuracy.summarize(self.history)

    def _save(self):
        """Checkpoint the current step (interrupts, preemption): never a non-finite state."""
        self._check_finite()
        with self._writing():
            self.manager.save(checkpoint_number=int(self.step.numpy()))

    def _speed(self, mark, step):
        """Training images (labeled + unlabeled) per second since `mark` = (time, step)."""
        return self.images_per_step * (step - mark[1]) / max(time.time() - mark[0], 1e-9)
