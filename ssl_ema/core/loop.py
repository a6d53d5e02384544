"""The SSL training driver shared by every algorithm, on the engine (core/engine.py).

Per step: the algorithm's loss on a labeled batch and its unlabeled views (the student in
training mode; whether targets come from the student or the EMA teacher is the algorithm's
choice), one optimizer step on the student, one update of every average (the EMA teacher, extra
horizons, Polyak, post-hoc EMA profiles; core/ema.py). Every `eval_every_steps`: accuracy of
the raw student and of every average but the post-hoc profiles on validation and test, a
checkpoint, TensorBoard scalars and accuracy.json; every `posthoc_snapshot_every_kimg` a
snapshot of the post-hoc profiles (core/snapshots.py). Restoring, the loop, the NaN guard,
interrupts, logging and records are the engine's; the data stream is a pure function of
(seed, step), so restoring the checkpoint's step, weights, optimizer and RNG state resumes a run
exactly where it stopped.
"""
import contextlib
import os
import time

import keras
import numpy as np
import tensorflow as tf

from ssl_ema.algorithms import Batch, base
from ssl_ema.algorithms import state as algorithm_state
from ssl_ema.base import machine
from ssl_ema.base.config import TrainConfig
from ssl_ema.core import accuracy, cluster, pool, run_dir, snapshots
from ssl_ema.core.ema import averages_of, describe_averages, posthoc_profiles, statistics_batches
from ssl_ema.core.engine import Engine
from ssl_ema.core.optimization import decayed_variables, l2_penalty, learning_rate, make_optimizer
from ssl_ema.nn import backbones, custom_backbones, losses
from ssl_ema.nn import heads as heads_lib


def _shrink(variable, factor):
    variable.assign(variable * factor)


class Trainer(Engine):
    def __init__(self, cfg: TrainConfig, algorithm, data, train_dir: str, strategy=None,
                 backbone=None, cpu_start=None):
        super().__init__(cfg, train_dir, strategy)
        self.algorithm, self.data = algorithm, data
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
            self.rng = tf.random.Generator.from_seed(cfg.seed)
        self.decayed = decayed_variables(self.student) if cfg.weight_decay else []
        # Model-input units per unit of the anchors' [-1, 1] pixel scale, per channel.
        self.pixel_scale = tf.constant(getattr(data, 'pixel_scale', 1.), tf.float32)
        self.open_records(tf.train.Checkpoint(**self._checkpointed()), cpu_start)
        self._older_checkpoint = None   # checkpoint_to_restore's, for an older run directory
        self.scores = {'raw': accuracy.make_scores(self._scored(self.student, self.heads),
                                                   data.image_shape)}
        self.scores.update({name: accuracy.make_scores(self._scored(a.model, a.heads),
                                                       data.image_shape)
                            for name, a in self.averages.items()})
        self.unknown_images = getattr(data, 'unknown_test_images', lambda: None)()
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
        its extra heads (trained with the student; evaluated and exported only for an open-set
        algorithm, whose unknown score is a head's; averaged when base.averages_carry_heads)."""
        labeled_size = data.labeled_size if self.algorithm.needs_labeled_indices else 0
        # The labeled class distribution, for the algorithms that keep it (ABC; ReMixMatch's
        # p(y) starts there).
        prior = None
        declared = base.declared_state(self.algorithm, data.num_classes, data.unlabeled_size,
                                       labeled_size)
        if base.starts_at_prior(declared):
            labels = data.arrays.y_train[data.split.labeled]
            prior = np.bincount(labels, minlength=data.num_classes) / len(labels)
        width = (backbones.features(self.student).shape[-1]   # DASO's prototypes
                 if algorithm_state.uses_feature_width(declared) else None)
        initial = base.initial_state(self.algorithm, data.num_classes, data.unlabeled_size,
                                     labeled_size, prior, width)
        self.state = {name: tf.Variable(value, trainable=False, name=f'algorithm_state_{name}',
                                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                      for name, value in initial.items()}
        self.heads = (base.with_heads(self.student, self.algorithm.heads)
                      if self.algorithm.heads else None)
        own = {id(v) for v in self.student.trainable_variables}
        self.head_variables = [v for v in (self.heads.trainable_variables if self.heads else [])
                               if id(v) not in own]
        self.trainable = list(self.student.trainable_variables) + self.head_variables
        # An open-set algorithm's evaluation, pool pass and export read a head; with
        # --teacher=ema SimMatch's, CoMatch's and IOMatch's targets do (base.target_outputs).
        if base.averages_carry_heads(self.algorithm):
            for average in self.averages.values():
                average.carry_heads(self.heads, self.algorithm.heads)

    def _checkpointed(self) -> dict:
        """What the checkpoint holds, by key. Model variables are listed explicitly: this
        includes the dropout seed generators, which Keras models do not expose to
        tf.train.Checkpoint themselves."""
        return dict(
            step=self.step, student=list(self.student.variables),
            teacher=list(self.ema.model.variables), ema_updates=self.ema.updates,
            optimizer=self.optimizer, rng=self.rng, algorithm_state=self.state,
            heads=self.head_variables, **self._average_heads_checkpoint(),
            averages={a.name: list(a.model.variables) + [a.updates]
                      for a in self._all_averages() if a is not self.ema})

    def _average_heads_checkpoint(self) -> dict:
        """The averages' heads (when they carry them: base.averages_carry_heads), under
        run_dir.AVERAGE_HEADS; nothing for the others, whose checkpoints keep their layout."""
        carried = {name: a.head_variables for name, a in self.averages.items() if a.head_variables}
        return {run_dir.AVERAGE_HEADS: carried} if carried else {}

    def checkpoint_to_restore(self, path):
        """The run's checkpoint, or for a run directory made before the averages carried
        SimMatch's and CoMatch's heads with --teacher=ema (their checkpoints have no
        run_dir.AVERAGE_HEADS), one without the averaged heads: that run resumes from
        everything else, and its averaged heads restart from the student's restored heads
        (on_restore; the start carry_heads gives them), averaging as usual from there on (its
        steps before took the teacher's embeddings from the student's heads, as the code that
        wrote it did)."""
        self._older_checkpoint = None
        objects = self._checkpointed()
        if run_dir.AVERAGE_HEADS not in objects or run_dir.checkpoint_holds(
                path, run_dir.AVERAGE_HEADS):
            return self.checkpoint
        del objects[run_dir.AVERAGE_HEADS]
        self._older_checkpoint = tf.train.Checkpoint(**objects)
        return self._older_checkpoint

    def _scored(self, model, heads_model):
        """What make_scores scores: the classifier, or for an open-set algorithm the model of
        [logits, its head's unknown score] (nn/heads.scoring_model)."""
        if not self.algorithm.unknown_head:
            return model
        return heads_lib.scoring_model(heads_model, self.algorithm.heads,
                                       self.algorithm.unknown_head)

    # ---- the engine's hooks -----------------------------------------------------------------
    def on_restore(self, step):
        older = self._older_checkpoint   # checkpoint_to_restore's
        if older is not None:
            for average in self.averages.values():
                average.restart_heads()
            self.checkpoint.save_counter.assign(older.save_counter)
            self._older_checkpoint = None
        if self.chief:
            snapshots.remove_snapshots_after(self.train_dir, step)   # the resumed run redoes them

    def before_step(self, step):
        """The algorithm's pass of the EMA model over the whole pool, on its schedule, before the
        step's update: a pure function of the checkpointed weights, so a resumed run redoes it."""
        if not pool.pass_due(self.algorithm, step, self.cfg.total_steps, self.data.unlabeled_size,
                             self.cfg.batch * self.cfg.uratio):
            return
        state = {k: v.numpy() for k, v in self.state.items()}
        progress = step / self.cfg.total_steps
        if self.algorithm.unknown_head:   # the EMA model's classes and unknown scores
            if not hasattr(self, '_ema_scoring'):
                self._ema_scoring = self._scored(self.ema.model, self.ema.heads)
            probs, unknown = pool.predict_pool(self._ema_scoring, self.data, unknown=True)
            new = self.algorithm.from_pool(probs, state, progress, unknown=unknown)
        else:
            new = self.algorithm.from_pool(pool.predict_pool(self.ema.model, self.data), state,
                                           progress)
        for name, value in new.items():
            self.state[name].assign(value)

    def after_step(self, step):
        if self.chief and self._snapshot_due(step):
            snapshots.save_snapshot(self.train_dir, step, self.profiles)

    def start_lines(self):
        lines = [describe_averages(self.averages, self.profiles, self.cfg,
                                   os.path.join(self.train_dir, run_dir.SNAPSHOTS))]
        if self.cfg.precision == 'auto':
            why = machine.native_bfloat16()
            lines.append(f'precision: auto -> {machine.resolve_precision("auto")} '
                         f'({why or "bfloat16 is not native here"})')
        return lines

    def guarded_models(self):
        return {'student': self.student, 'EMA': self.ema.model}

    # ---- one step ---------------------------------------------------------------------------
    def _replica_step(self, labeled_x, labels, unlabeled, labeled_extra=()):
        progress = tf.cast(self.step, tf.float32) / self.cfg.total_steps
        ramp = losses.RAMPUPS[self.algorithm.ramp_up](progress, self.cfg.warmup_fraction)
        index = labeled_index = None
        if self.algorithm.needs_indices:
            unlabeled, index = unlabeled[:-1], unlabeled[-1]
        if self.algorithm.needs_labeled_indices:   # (labeled views..., indices)
            labeled_extra, labeled_index = labeled_extra[:-1], labeled_extra[-1]
        state = {k: tf.identity(v) for k, v in self.state.items()}
        batch = Batch(labeled_x, labels, tuple(unlabeled), ramp, self.rng, progress,
                      self.pixel_scale, state, index, self.heads, labeled_index,
                      tuple(labeled_extra))
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
        labeled, unlabeled = next(iterator)   # (images, labels, *labeled views, indices)
        per_replica = self.strategy.run(self._compiled_replica_step,
                                        args=(labeled[0], labeled[1], unlabeled,
                                              tuple(labeled[2:])))
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

        # Labeled views and indices only for the algorithms that ask (SimMatch, DeFixMatch), the
        # labeled batch's own augmentation and the fill only when --labeled_augment and
        # --augment_fill are given.
        fill = {'fill': cfg.augment_fill} if cfg.augment_fill != 'anchors' else {}
        labeled = {k: v for k, v in (('labeled_views', tuple(self.algorithm.labeled_views)),
                                     ('labeled_indices', self.algorithm.needs_labeled_indices),
                                     ('labeled_augment', cfg.labeled_augment)) if v}

        def share_batches(share):   # called once per worker: it builds only its share
            if views:
                return self.data.train(cfg.batch, cfg.uratio, views, start_step,
                                       self.algorithm.needs_indices, share=share, **labeled,
                                       **fill)
            # supervised: never touch the unlabeled pool
            return self.data.labeled(cfg.batch, start_step, share=share,
                                     augment=cfg.labeled_augment, **fill).map(
                lambda x, y: ((x, y), ()))
        return self.distributed_batches(share_batches)

    # ---- evaluation --------------------------------------------------------------------------
    def evaluate(self) -> dict:
        step = int(self.step.numpy())
        result = {'step': step, 'kimg': step * self.cfg.batch / 1024}
        for model, scores in self.scores.items():
            with self._evaluation_statistics(model):
                metrics = accuracy.evaluate(scores, self.eval_arrays, self.data.num_classes,
                                            self.unknown_images)
            result[model] = metrics.pop('accuracy')
            for metric, value in metrics.items():   # accuracy.METRICS: {metric: {model: ...}}
                result.setdefault(metric, {})[model] = value
        return result

    def evaluation_scalars(self, result):
        scalars = {f'accuracy/{model}/{split}': acc for model in self.scores
                   if model in result for split, acc in result[model].items()}
        for metric in ('balanced_accuracy', 'open_set'):
            scalars.update({f'{metric}/{model}/{split}': value
                            for model, splits in result.get(metric, {}).items()
                            for split, value in splits.items()})
        scalars.update({f'recall/{model}/{split}/class_{c}': value   # per class, of raw and EMA
                        for model, splits in result.get('recall', {}).items()
                        if model in ('raw', 'ema') for split, values in splits.items()
                        for c, value in enumerate(values) if value is not None})
        return scalars

    def evaluation_line(self, result):
        return (f'kimg {result["kimg"]:.1f} accuracy raw/ema: ' + ', '.join(
            f'{s} {result["raw"][s]:.2f}/{result["ema"][s]:.2f}' for s in result['raw'])
            + ''.join(f' | {m} ' + '/'.join(f'{v:.2f}' for v in result[m].values())
                      for m in self.scores if m not in ('raw', 'ema')))

    def progress_line(self, step, metrics):
        total, speed = self.cfg.total_steps, metrics['images_per_sec']
        eta = (total - step) * self.images_per_step / speed
        return (f'step {step}/{total} '
                + ' '.join(f'{k[5:]}={v:.4g}' for k, v in metrics.items() if k.startswith('loss/'))
                + f' | {speed:.0f} img/s | ETA {time.strftime("%H:%M:%S", time.gmtime(eta))}')
