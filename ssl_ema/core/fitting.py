"""A training run from a config, what `python -m ssl_ema.train` and `ssl_ema.fit` both call:
--recipe's defaults, the run (core/one_run.py) and the self-training rounds that follow it
(core/distilling.py).
"""
import dataclasses

from ssl_ema.base import machine, recipes
from ssl_ema.base.config import TrainConfig
from ssl_ema.core import distilling, one_run, run_dir


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


def fit(cfg: TrainConfig, algorithm, log=print, backbone=None, dataset=None) -> str:
    """Train (or resume) the run that `cfg` and `algorithm` define (core/one_run.train: the
    keywords are its), then its self-training rounds, if any; returns its directory."""
    def rounds(train_dir, run_cfg, chief):
        # The recipe's rounds (else one with ssl_ema.distill's defaults); never for supervised,
        # which reads no unlabeled image. train_dir's export and accuracy.json become the last
        # round's. Every worker trains them; the chief publishes.
        distilling.run_rounds(train_dir, run_cfg, recipes.RECIPES[run_cfg.recipe].rounds or ({},),
                              log, publish=chief)
    return one_run.train(cfg, algorithm, log, backbone, dataset,
                         then=rounds if cfg.self_training_kimg and algorithm.views else None)
