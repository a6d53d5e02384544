"""Train a semi-supervised classifier: `python -m ssl_ema.train [--flags]`.

With no flags: Mean Teacher on scikit-learn's embedded 8x8 digits with 50 labels, in about a
minute on a CPU. `--helpfull` lists every flag, each algorithm's under its own module. The same
run from Python: `ssl_ema.fit(**flags)` (ssl_ema/api.py); both call core/fitting.fit.
"""
import dataclasses
import sys

from ssl_ema import algorithms, cli
from ssl_ema.base import hparams
from ssl_ema.base.config import TrainConfig
from ssl_ema.core import fitting


def main(cfg: TrainConfig):
    recipe, name, settings, hyperparameters = fitting.recipe_defaults(
        cfg.recipe, cfg.dataset, cfg.algorithm, hparams.given_flags(), cfg.precision,
        cfg.train_dir)
    cfg = dataclasses.replace(cfg, algorithm=name, recipe=recipe.name, **settings)
    algorithm = algorithms.create(cfg.algorithm, **hyperparameters)
    for name in algorithms.base.ignored_flags(algorithm):
        own = ', '.join(f.name for f in dataclasses.fields(algorithm)) or 'none'
        print(f'warning: --{name} is ignored: --algorithm={cfg.algorithm} does not use it '
              f'(its own flags: {own})', file=sys.stderr)
    fitting.fit(cfg, algorithm)


if __name__ == '__main__':
    cli.run(main, TrainConfig, setup=cli.define_train_flags)
