"""Post-hoc EMA (Karras et al. 2024): choose the EMA's length after training.

    python -m ssl_ema.posthoc --train_dir=DIR [--sigma_rels=0.01,0.02,...]

Rebuilds the EMA of every --sigma_rels from the snapshots of a run trained with
--posthoc_snapshot_every_kimg > 0, evaluates each, picks the best on validation, writes
DIR/posthoc.json and exports it to DIR/export_posthoc/. The method: ssl_ema/core/posthoc.py.
"""
import dataclasses
from typing import Optional

from ssl_ema import cli
from ssl_ema.base.errors import ConfigError
from ssl_ema.base.hparams import hparam, parse_floats
from ssl_ema.core import posthoc


@dataclasses.dataclass
class PosthocConfig:
    train_dir: Optional[str] = hparam(None, 'Run directory of ssl_ema.train, trained with '
                                      '--posthoc_snapshot_every_kimg > 0.')
    sigma_rels: str = hparam(posthoc.SWEEP, 'sigma_rel values to reconstruct and evaluate (our '
                             'grid around the two tracked by default).')

    def __post_init__(self):
        if not self.train_dir:
            raise ConfigError('--train_dir is required: the run directory to reconstruct from')
        try:
            values = parse_floats(self.sigma_rels)
        except ValueError:
            values = []
        if not values or not all(0 < s < 12 ** -.5 for s in values):
            raise ConfigError(f'--sigma_rels={self.sigma_rels} must be comma-separated numbers '
                              'in (0, 0.2887)')


def main(cfg: PosthocConfig):
    posthoc.sweep(cfg.train_dir, parse_floats(cfg.sigma_rels))


if __name__ == '__main__':
    cli.run(main, PosthocConfig)
