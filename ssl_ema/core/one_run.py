"""One training run in its directory, from a config: validate everything before touching the
run directory, take its lock, write its records, train (or resume) with the Trainer on the engine
(core/loop.py, core/engine.py), print the accuracy table and export the EMA classifier
(core/classifier.py). A self-training round is such a run too (core/distilling.py); what follows a
run (its recipe's rounds) is core/fitting.fit's.
"""
import dataclasses
import time

from ssl_ema.base import recipes
from ssl_ema.base.config import TrainConfig
from ssl_ema.base.errors import RunError
from ssl_ema.core import accuracy, classifier, cluster, run_dir


def train(cfg: TrainConfig, algorithm, log=print, backbone=None, dataset=None,
          round_of=None, then=None) -> str:
    """Train (or resume) the run that `cfg` and `algorithm` define; returns its directory.

    `backbone`: a keras.Model to train instead of building --arch (nn/backbones.build says which
    models are supported); `dataset`: an SSLData already built (e.g. from in-memory arrays),
    instead of the one cfg.dataset names; `round_of`: a self-training round's (default_dir,
    prepare) (core/distilling.py): `default_dir(cfg, algorithm, arch)` its directory unless
    cfg.train_dir names one, and `prepare(train_dir, algorithm, dataset, trainer, log)` makes its
    pseudo-labels before it trains and returns what flags.json records of the teacher; `then`:
    what follows the finished run, called as then(train_dir, cfg as the run records it, whether
    this worker writes) (core/fitting.fit: the run's self-training rounds)."""
    cpu_start = time.process_time()   # the run's CPU-seconds count from here (records.times)
    import tensorflow as tf
    from ssl_ema import data
    from ssl_ema.core.loop import Trainer
    from ssl_ema.nn import backbones

    if cfg.recipe == recipes.AUTO:   # a config whose recipe nobody applied: the plain defaults
        cfg = dataclasses.replace(cfg, recipe='none')
    strategy = cluster.make_strategy(cfg)
    if dataset is None:
        dataset = data.build(cfg.dataset, cfg.labels, cfg.valid, cfg.seed, cfg.augment,
                             cfg.data_dir, input_norm=cfg.input_norm, image_size=cfg.image_size,
                             protocol=data.Protocol.of(cfg))
    arch = backbones.resolve(cfg.arch, dataset.image_shape, backbone)
    cfg = dataclasses.replace(cfg, arch=arch)
    default_dir = round_of[0] if round_of else run_dir.default_train_dir
    train_dir = cfg.train_dir or default_dir(cfg, algorithm, arch)
    record = run_dir.run_record(dataclasses.replace(cfg, train_dir=train_dir), algorithm)
    chief = strategy.extended.should_checkpoint   # multi-worker: only the chief writes train_dir
    with run_dir.claim(train_dir, record, chief, log) as resuming:
        if cfg.deterministic:
            tf.config.experimental.enable_op_determinism()
        trainer = Trainer(cfg, algorithm, dataset, train_dir, strategy, backbone=backbone,
                          cpu_start=cpu_start)
        if round_of:   # on every worker: each trains on the pseudo-labels
            record['teacher'] = round_of[1](train_dir, algorithm, dataset, trainer, log)
        if chief:
            try:
                classifier.write_classifier_info(train_dir, dataset)   # what an export needs
                if not resuming:
                    run_dir.write_new_run(train_dir, record, dataset.split.as_dict())
            except OSError as e:
                raise RunError(f'cannot write {e.filename}: {e.strerror}') from None
        log(f'{cfg.algorithm} on {cfg.dataset} ({cfg.labels} labels, seed {cfg.seed}), {arch}, '
            f'{cfg.total_steps} steps of {cfg.batch}+{cfg.batch * cfg.uratio} images -> {train_dir}')
        summary = trainer.train(log)
        if chief:
            log(accuracy.format_table(summary))
            classifier.export_run(train_dir, log=log, skip_if_current=True, backbone=backbone)
    if then:
        then(train_dir, cfg, chief)
    return train_dir
