"""The one training loop shared by every algorithm.

Per step: the algorithm's loss on a labeled batch and its unlabeled views (the student in
training mode; whether targets come from the student or the EMA teacher is the algorithm's
choice), one optimizer step on the student, one EMA update. Every
`eval_every_steps`: accuracy of the raw student and of the EMA model on validation and test, a
checkpoint, TensorBoard scalars and accuracy.json. The data stream is a pure function of
(seed, step), so restoring the checkpoint's step, weights, optimizer and RNG state resumes a run
exactly where it stopped.
"""
import json
import os
import time

import keras
import tensorflow as tf

from ssl_ema import backbones, evaluation, files, losses
from ssl_ema.algorithms import Batch, base
from ssl_ema.config import TrainConfig
from ssl_ema.ema import EMA

HISTORY = 'evaluations.jsonl'


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


class Trainer:
    def __init__(self, cfg: TrainConfig, algorithm, data, train_dir: str, strategy=None):
        self.cfg, self.algorithm, self.data, self.train_dir = cfg, algorithm, data, train_dir
        self.strategy = strategy or tf.distribute.get_strategy()
        keras.utils.set_random_seed(cfg.seed)
        with self.strategy.scope():
            self.student = backbones.build(cfg.arch, data.image_shape, data.num_classes,
                                           conv_bias=cfg.wrn_conv_bias, precision=cfg.precision)
            self.ema = EMA(self.student, cfg.ema_decay, cfg.ema_warmup)
            self._build_algorithm_state(data)
            self.learning_rate = LearningRate(cfg.lr, cfg.total_steps, cfg.lr_decay)
            self.optimizer = make_optimizer(cfg, self.learning_rate)
            if cfg.precision == 'mixed_float16':   # float16 gradients underflow without it
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(self.trainable)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
            self.rng = tf.random.Generator.from_seed(cfg.seed)
        self.decayed = decayed_variables(self.student) if cfg.weight_decay else []
        # Model-input units per unit of the anchors' [-1, 1] pixel scale, per channel.
        self.pixel_scale = tf.constant(getattr(data, 'pixel_scale', 1.), tf.float32)
        # Model variables are listed explicitly: this includes the dropout seed generators,
        # which Keras models do not expose to tf.train.Checkpoint themselves.
        self.checkpoint = tf.train.Checkpoint(
            step=self.step, student=list(self.student.variables),
            teacher=list(self.ema.model.variables), ema_updates=self.ema.updates,
            optimizer=self.optimizer, rng=self.rng, algorithm_state=self.state,
            heads=self.head_variables)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(train_dir, 'checkpoints'), cfg.keep_checkpoints)
        self.predict = {'raw': evaluation.make_predict(self.student, data.image_shape),
                        'ema': evaluation.make_predict(self.ema.model, data.image_shape)}
        self.eval_arrays = data.eval_arrays()
        self.writer = tf.summary.create_file_writer(os.path.join(train_dir, 'tensorboard'))
        self.history = []
        self._wall_time = 0.
        self.images_per_step = cfg.batch * (1 + (cfg.uratio if algorithm.views else 0))
        # XLA compiles each replica's step (the iterator and the cross-replica EMA update stay
        # outside it); runs/SPEED.md has the measurements behind --jit_compile's default.
        self._compiled_replica_step = (tf.function(self._replica_step, jit_compile=True)
                                       if cfg.jit_compile else self._replica_step)

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
        if self.manager.latest_checkpoint:
            self.checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
        step = int(self.step.numpy())
        path = os.path.join(self.train_dir, HISTORY)
        if os.path.exists(path):
            with open(path) as f:
                # Evaluations logged after the last checkpoint are redone by the resumed run.
                self.history = [h for h in map(json.loads, f) if h['step'] <= step]
            self._write_history()
        if self.history:
            self._wall_time = self.history[-1]['wall_time_s']
        return step

    def _write_history(self):
        files.write_atomically(
            os.path.join(self.train_dir, HISTORY),
            lambda f: f.writelines(json.dumps(h, sort_keys=True) + '\n' for h in self.history),
            mode='w')

    def _write_summary(self):
        files.write_json(os.path.join(self.train_dir, 'accuracy.json'),
                         evaluation.summarize(self.history))

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
    def _train_step(self, iterator):
        (labeled_x, labels), unlabeled = next(iterator)
        per_replica = self.strategy.run(self._compiled_replica_step,
                                        args=(labeled_x, labels, unlabeled))
        if self.cfg.weight_decay_type == 'decoupled' and self.decayed:
            # After the optimizer step, with this step's lr, as the anchors' vat.py and ict.py.
            shrink = 1. - self.cfg.weight_decay * self.learning_rate(self.step)
            for v in self.decayed:
                v.assign(v * shrink)
        self.ema.update()   # cross-replica context: every replica's copy gets the same average
        self.step.assign_add(1)
        return {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                for k, v in per_replica.items()}

    def _dataset(self, start_step):
        cfg, views = self.cfg, tuple(self.algorithm.views)
        if views:
            ds = self.data.train(cfg.batch, cfg.uratio, views, start_step,
                                 self.algorithm.needs_indices)
        else:   # supervised: never touch the unlabeled pool
            ds = self.data.labeled(cfg.batch, start_step).map(lambda x, y: ((x, y), ()))
        return iter(self.strategy.experimental_distribute_dataset(ds))

    # ---- the loop ---------------------------------------------------------------------------
    def evaluate(self) -> dict:
        step = int(self.step.numpy())
        result = {'step': step, 'kimg': step * self.cfg.batch / 1024}
        for model, predict in self.predict.items():
            result[model] = {split: evaluation.accuracy(predict, x, y)
                             for split, (x, y) in self.eval_arrays.items()}
        return result

    def _record(self, result):
        self.history.append(result)
        self._write_history()   # before the checkpoint: a resumed run drops what is newer
        self.manager.save(checkpoint_number=result['step'])
        self._write_summary()
        with self.writer.as_default(step=result['step']):
            for model in ('raw', 'ema'):
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
        result = self.evaluate()
        if images_per_sec is not None:
            result['images_per_sec'] = images_per_sec
        result['wall_time_s'] = self._wall_time + time.time() - start
        self._record(result)
        log(f'kimg {result["kimg"]:.1f} accuracy raw/ema: ' + ', '.join(
            f'{s} {result["raw"][s]:.2f}/{result["ema"][s]:.2f}' for s in result['raw']))

    def train(self, log=print):
        """Train to cfg.total_steps (resuming from the last checkpoint); returns the summary."""
        cfg, total = self.cfg, self.cfg.total_steps
        step = self.restore()
        if step:
            log(f'Resuming {self.train_dir} at step {step}/{total}')
        iterator = self._dataset(step) if step < total else None
        start = time.time()
        log_mark = eval_mark = (start, step)   # (time, step) of the last progress line / eval
        try:
            # An interrupt during an evaluation checkpoints its step without recording it, and
            # the loop below evaluates only at later steps: evaluate the restored step now (its
            # training speed died with the interrupted process).
            if (step and (step % cfg.eval_every_steps == 0 or step == total)
                    and (not self.history or self.history[-1]['step'] != step)):
                self._evaluate_and_record(start, log)
                log_mark = eval_mark = (time.time(), step)
            while step < total:
                metrics = self._train_step(iterator)
                step += 1
                if step % cfg.log_every_steps == 0 or step == total:
                    self._log_progress(step, metrics, self._speed(log_mark, step), log)
                    log_mark = (time.time(), step)
                if step % cfg.eval_every_steps == 0 or step == total:
                    self._evaluate_and_record(start, log, self._speed(eval_mark, step))
                    # Speeds count training only: both marks restart after an evaluation.
                    log_mark = eval_mark = (time.time(), step)
        except KeyboardInterrupt:
            self.manager.save(checkpoint_number=int(self.step.numpy()))
            log(f'Interrupted: saved step {int(self.step.numpy())} in {self.train_dir}; '
                'run the same command again to resume.')
            raise
        finally:
            self.writer.flush()
        if self.history:   # also repairs a kill between the checkpoint and accuracy.json
            self._write_summary()
        return evaluation.summarize(self.history)

    def _speed(self, mark, step):
        """Training images (labeled + unlabeled) per second since `mark` = (time, step)."""
        return self.images_per_step * (step - mark[1]) / max(time.time() - mark[0], 1e-9)
