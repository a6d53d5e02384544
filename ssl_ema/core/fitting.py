"""One training run from a config: what `python -m ssl_ema.train` and `ssl_ema.fit` both call.

Validate everything before touching the run directory, take its lock, write its records, train
(or resume) with the Trainer on the engine (core/loop.py, core/engine.py), print the accuracy
table and export the EMA classifier (core/classifier.py).
"""
import dataclasses
import time

from ssl_ema.base import machine, recipes
from ssl_ema.base.config import TrainConfig
from ssl_ema.base.errors import RunError
from ssl_ema.core import accuracy, classifier, cluster, run_dir


def recipe_defaults(recipe: str, dataset: str, algorithm: str, explicit, precision=None,
                    train_dir=None):
    """(recipe, algorithm name, training settings, algorithm hyperparameters) that --recipe sets
    for a run on `dataset` (base/recipes.py), leaving alone every setting in `explicit` (the
    flags or fit() keywords the user gave). What ssl_ema.train and ssl_ema.fit both apply.

    `auto` picks by the machine: the bfloat16 recipe where the run computes bfloat16 natively
    (`precision`, if given, else what this machine computes natively: base/machine.py), else
    the AVX2 one on a CPU that computes float32 no wider than AVX2 (machine.avx2_only), and on
    a `train_dir` that holds a run, that run's own recipe, so a run resumes as it was made
    wherever it resumes (a run from before recipes: `none`)."""
    from ssl_ema import algorithms
    saved = run_dir.read_run_record(train_dir) if train_dir and recipe == recipes.AUTO else None
    if saved is not None and saved['config'].get('recipe', run_dir.LEGACY['recipe']) in recipes.RECIPES:
        recipe = saved['config'].get('recipe', run_dir.LEGACY['recipe'])
    measured = recipe == recipes.AUTO and recipes.own_data(dataset)
    bfloat16 = measured and machine.resolve_precision(
        precision if precision and 'precision' in explicit else 'auto') == 'mixed_bfloat16'
    avx2 = measured and not bfloat16 and bool(machine.avx2_only())
    chosen = recipes.resolve(recipe, dataset, bfloat16, avx2)

    def fields(name):
        cls = algorithms.ALGORITHMS.get(name)
        return [f.name for f in dataclasses.fields(cls)] if cls else []
    name, train, hyperparameters = recipes.defaults(
        chosen, algorithm, explicit, {f.name for f in dataclasses.fields(TrainConfig)}, fields)
    return chosen, name, train, hyperparameters


def fit(cfg: TrainConfig, algorithm, log=print, backbone=None, dataset=None,
        round_of=None) -> str:
    """Train (or resume) the run that `cfg` and `algorithm` define; returns its directory.

    `backbone`: a keras.Model to train instead of building --arch (nn/backbones.build says which
    models are supported); `dataset`: an SSLData already built (e.g. from in-memory arrays),
    instead of the one cfg.dataset names; `round_of`: (teacher RunDir, prepare) for a
    self-training round (core/distilling.py): its directory defaults to one inside the
    teacher's, and `prepare(train_dir, teacher, algorithm, dataset, trainer, log)` makes its
    pseudo-labels before it trains and returns what flags.json records of the teacher."""
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
    if round_of:
        from ssl_ema.core import distilling
        train_dir = cfg.train_dir or distilling.default_train_dir(
            round_of[0].train_dir, cfg, algorithm, arch)
    else:
        train_dir = cfg.train_dir or run_dir.default_train_dir(cfg, algorithm, arch)
    record = run_dir.run_record(dataclasses.replace(cfg, train_dir=train_dir), algorithm)
    chief = strategy.extended.should_checkpoint   # multi-worker: only the chief writes train_dir
    with run_dir.claim(train_dir, record, chief, log) as resuming:
        if cfg.deterministic:
            tf.config.experimental.enable_op_determinism()
        trainer = Trainer(cfg, algorithm, dataset, train_dir, strategy, backbone=backbone,
                          cpu_start=cpu_start)
        if round_of:   # on every worker: each trains on the pseudo-labels
            record['teacher'] = round_of[1](train_dir, round_of[0], algorithm, dataset, trainer,
                                            log)
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
    if round_of is None and cfg.self_training_kimg and algorithm.views:
        # Self-training rounds, the recipe's (else one with ssl_ema.distill's defaults); never
        # for supervised, which reads no unlabeled image. train_dir's export and accuracy.json
        # become the last round's.
        from ssl_ema.core import distilling
        distilling.run_rounds(train_dir, cfg, recipes.RECIPES[cfg.recipe].rounds or ({},), log,
                              publish=chief)
    return train_dir
