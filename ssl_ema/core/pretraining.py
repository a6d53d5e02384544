"""Self-supervised pretraining with an EMA teacher (BYOL, DINO): the loop, its evaluation and the
backbone it leaves.

Per step: the method's loss (ssl_ema/algorithms/pretraining) on its augmented views of a batch of
unlabeled images (every training image outside validation, and the dataset's extra pool), one
optimizer step on the student (backbone + the method's head, and its online-only heads), one
update of the teacher, the EMA of the student with the cosine schedule BYOL and DINO share
(ssl_ema/core/ema.py CosineEMA). Every `eval_every_steps` and before the first step (so the first
record is the random initialisation): the weighted k-NN accuracy (ssl_ema/core/knn.py) of the
student's and the teacher's backbones, with the labeled split as the memory and the validation
and test images as queries, then a checkpoint, evaluations.jsonl, accuracy.json and TensorBoard
scalars. The views are a pure function of (seed, step), so restoring step, weights, optimizer and
method state resumes exactly. At the end, DIR/backbone.keras: the method's chosen backbone as a
model of stock Keras layers, pixels -> pooled features (see `export_backbone`). Restoring, the
loop, the NaN guard, interrupts, logging, records and the input path (each worker builds only its
share of each batch) are the engine's (core/engine.py), as for training.
"""
import dataclasses
import math
import os

import keras
import tensorflow as tf

from ssl_ema.algorithms.pretraining import base as methods
from ssl_ema.base.errors import ConfigError, one_line
from ssl_ema.base.pretraining_config import PretrainConfig
from ssl_ema.core import cluster, knn, run_dir
from ssl_ema.core.ema import CosineEMA
from ssl_ema.core.engine import Engine
from ssl_ema.nn import backbones


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """lr * t / warm-up during the warm-up, then lr (1 + cos(pi progress)) / 2 over the rest:
    BYOL's learning_schedule (byol/utils/schedules.py) and DINO's cosine_scheduler (to 0)."""

    def __init__(self, lr, total_steps, warmup_fraction):
        self.lr, self.total_steps = lr, total_steps
        self.warmup_steps = int(warmup_fraction * total_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.lr * step / max(self.warmup_steps, 1)
        rest = max(self.total_steps - self.warmup_steps, 1)
        progress = tf.minimum((step - self.warmup_steps) / rest, 1.)
        cosine = self.lr * (1. + tf.cos(math.pi * progress)) / 2.
        return tf.where(step < self.warmup_steps, warm, cosine)


def pooled_features(classifier: keras.Model) -> keras.Model:
    """The part of a backbone classifier (ssl_ema.nn.backbones) up to its global pooling: images
    -> pooled features (its 'features' layer), sharing the classifier's layers."""
    return keras.Model(classifier.input, backbones.features(classifier),
                       name=f'{classifier.name}_features')


class Pretrainer(Engine):
    evaluates_initialisation = True   # the first record is the random initialisation's
    records_speed = False             # its records have always been k-NN accuracy and clocks

    def __init__(self, cfg: PretrainConfig, method, data, train_dir: str, strategy=None):
        super().__init__(cfg, train_dir, strategy)
        self.method, self.data = method, data
        # Views of several sizes (DINO's local crops) need a backbone that takes any size.
        shape = (None, None, data.image_shape[-1]) if any(
            v.startswith('dino_local') for v in method.views) else data.image_shape
        with self.strategy.scope():
            try:
                self.backbone = pooled_features(backbones.build(
                    cfg.arch, shape, data.num_classes, precision=cfg.precision))
            except (ValueError, TypeError) as e:
                raise ConfigError(f'--arch={cfg.arch} cannot take images of any size, which '
                                  f'--local_crops needs ({one_line(e)}); use small_cnn or '
                                  'wrnD_K') from None
            head = method.head(self.backbone.output.shape[-1])   # float32 (the global policy)
            inputs = keras.Input(shape)
            self.student = keras.Model(inputs, head(self.backbone(inputs)), name='student')
            self.online = method.online_heads(head.output.shape[-1])
            # The teacher: the EMA of backbone + head, its decay rising from teacher_momentum to 1.
            self.teacher = CosineEMA(self.student, method.teacher_momentum, cfg.total_steps)
            self.teacher_backbone = self.teacher.model.get_layer(self.backbone.name)
            initial = methods.initial_state(method, data.num_classes, data.unlabeled_size)
            self.state = {name: tf.Variable(value, trainable=False, name=f'method_state_{name}',
                                            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                          for name, value in initial.items()}
            self.trainable = list(self.student.trainable_variables) + [
                v for m in self.online.values() for v in m.trainable_variables]
            self.optimizer = self._optimizer()
            self.optimizer.build(self.trainable)
        self.open_records(tf.train.Checkpoint(
            step=self.step, student=list(self.student.variables),
            teacher=list(self.teacher.model.variables), teacher_updates=self.teacher.updates,
            online={name: list(m.variables) for name, m in self.online.items()},
            optimizer=self.optimizer, method_state=self.state))
        self.images_per_step = cfg.batch * len(method.views)
        self.exported = cfg.export_model or method.exported   # what backbone.keras holds

    def _optimizer(self):
        cfg = self.cfg
        lr = WarmupCosine(cfg.lr, cfg.total_steps, cfg.warmup_fraction)
        if cfg.optimizer == 'adamw':
            optimizer = keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = keras.optimizers.SGD(lr, momentum=0.9, weight_decay=cfg.weight_decay)
        # DINO's get_params_groups: no decay on biases and normalisation (1-d) parameters.
        optimizer.exclude_from_weight_decay(
            var_list=[v for v in self.trainable if len(v.shape) <= 1])
        if cfg.precision == 'mixed_float16':
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        return optimizer

    # ---- one step ---------------------------------------------------------------------------
    def _replica_step(self, views):
        progress = tf.cast(self.step, tf.float32) / self.cfg.total_steps
        state = {k: tf.identity(v) for k, v in self.state.items()}
        with tf.GradientTape() as tape:
            out = self.method(self.student, self.teacher, self.online, list(views), progress,
                              state)
            scaled = self.optimizer.scale_loss(out.loss / self.strategy.num_replicas_in_sync)
        self.optimizer.apply(tape.gradient(scaled, self.trainable), self.trainable)
        for name, value in out.state.items():
            self.state[name].assign(value)
        return {'loss/total': out.loss, **{f'method/{k}': v for k, v in out.metrics.items()}}

    @tf.function
    def train_step(self, iterator):
        per_replica = self.strategy.run(self._replica_step, args=(next(iterator),))
        self.teacher.update(self.strategy)   # each replica its own copy, from its own weights
        self.step.assign_add(1)
        metrics = {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                   for k, v in per_replica.items()}
        metrics['teacher_momentum'] = self.teacher.current_decay()
        self.guard.observe(metrics, self.step)
        return metrics

    def batches(self, start_step):
        return self.distributed_batches(lambda share: self.data.unlabeled(
            self.cfg.batch, self.method.views, start_step, share=share))

    # ---- evaluation and records -------------------------------------------------------------
    def evaluate(self) -> dict:
        """k-NN accuracy (%) of the student's ('raw') and the teacher's ('ema') backbone."""
        cfg, data = self.cfg, self.data
        step = int(self.step.numpy())
        memory = data.normalize(data.arrays.x_train[data.split.labeled]).numpy()
        memory_labels = data.arrays.y_train[data.split.labeled]
        result = {'step': step, 'kimg': step * cfg.batch / 1024}
        for name, model in (('raw', self.backbone), ('ema', self.teacher_backbone)):
            result[name] = {split: knn.accuracy(model, memory, memory_labels, x, y,
                                                data.num_classes, cfg.knn_k, cfg.knn_temperature)
                            for split, (x, y) in data.eval_arrays().items()}
        return result

    def evaluation_scalars(self, result):
        return {f'knn_accuracy/{model}/{split}': value for model in ('raw', 'ema')
                for split, value in result[model].items()}

    def evaluation_line(self, result):
        return f'kimg {result["kimg"]:.1f} k-NN accuracy student/teacher: ' + ', '.join(
            f'{s} {result["raw"][s]:.2f}/{result["ema"][s]:.2f}' for s in result['raw'])

    def progress_line(self, step, metrics):
        return (f'step {step}/{self.cfg.total_steps} loss={metrics["loss/total"]:.4g} '
                f'tau={metrics["teacher_momentum"]:.5f} | {metrics["images_per_sec"]:.0f} img/s')

    def guarded_models(self):
        return {'student': self.student, 'teacher': self.teacher.model}

    # ---- the backbone it leaves -------------------------------------------------------------
    def export_backbone(self, path=None) -> str:
        """Write the student's ('raw') or the teacher's ('ema') backbone (--export_model, by
        default the method's `exported`) as a .keras model of stock layers only: images in pixel
        units (0..255) -> a Normalization layer with the run's input standardisation -> the
        backbone -> pooled features. It loads with keras.saving.load_model without ssl_ema, and
        `--arch=keras:PATH` fine-tunes it."""
        path = path or os.path.join(self.train_dir, run_dir.BACKBONE)
        trained = self.teacher_backbone if self.exported == 'ema' else self.backbone
        portable = pooled_features(backbones.build(self.cfg.arch, self.data.image_shape,
                                                   self.data.num_classes, portable=True))
        portable.set_weights(trained.get_weights())
        inputs = keras.Input(self.data.image_shape, name='pixels')
        standardised = keras.layers.Normalization(mean=self.data.mean,
                                                  variance=self.data.std ** 2)(inputs)
        model = keras.Model(inputs, portable(standardised), name='pretrained_backbone')
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f'{path}.{os.getpid()}.tmp.keras'   # then renamed: a reader never sees a part
        with self.records.writing():
            try:
                model.save(tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return path


# ---- a run: directory, records, training, table, backbone -----------------------------------
def pretrain(cfg: PretrainConfig, method, log=print, dataset=None) -> str:
    """Pretrain (or resume) the run that `cfg` and `method` define, print the k-NN table and
    write DIR/backbone.keras; returns the run directory. What `python -m ssl_ema.pretrain` calls
    (and `ssl_ema.pretrain`, which may pass the `dataset` it built from arrays)."""
    from ssl_ema import data as data_lib
    strategy = cluster.make_strategy(cfg)
    data = dataset or data_lib.build(cfg.dataset, cfg.labels, cfg.valid, cfg.seed, 'none',
                                     cfg.data_dir, input_norm=cfg.input_norm)
    arch = backbones.resolve(cfg.arch, data.image_shape)
    cfg = dataclasses.replace(cfg, arch=arch)
    train_dir = cfg.train_dir or run_dir.default_train_dir(cfg, method, arch, 'pretrain_')
    record = run_dir.run_record(dataclasses.replace(cfg, train_dir=train_dir), method)
    chief = strategy.extended.should_checkpoint
    with run_dir.claim(train_dir, record, chief, log, PretrainConfig) as resuming:
        trainer = Pretrainer(cfg, method, data, train_dir, strategy)
        if chief and not resuming:
            with trainer.records.writing():
                run_dir.write_new_run(train_dir, record, data.split.as_dict())
        log(f'pretraining {method.name} on {cfg.dataset} ({cfg.labels} labels for the k-NN, '
            f'seed {cfg.seed}), {arch}, {cfg.total_steps} steps of {cfg.batch} images x '
            f'{len(method.views)} views -> {train_dir}')
        trainer.train(log)
        if chief:
            log(format_table(trainer.history))
            path = trainer.export_backbone()
            log(f'backbone of the {"teacher" if trainer.exported == "ema" else "student"} -> '
                f'{path} (python -m ssl_ema.train --arch=keras:{path})')
    return train_dir


def format_table(history: list) -> str:
    """k-NN accuracy (%) at initialisation (the first record, if the run started there) and of
    the student's and the teacher's backbone at the end."""
    first, last = history[0], history[-1]
    rows = [('student', last['raw']), ('teacher (EMA)', last['ema'])]
    if first['step'] == 0:
        rows.insert(0, ('random init', first['raw']))
    splits = list(last['raw'])
    return '\n'.join([f'{"k-NN accuracy (%)":<18}' + ''.join(f'{s:>8}' for s in splits)] + [
        f'{label:<18}' + ''.join(f'{row[s]:8.2f}' for s in splits) for label, row in rows])
