"""What every `python -m ssl_ema.<verb>` command shares: its flags, its one-line errors, and
finding a run directory, its checkpoints and the configuration that made it.

A command declares its flags as a dataclass of `hparam` fields (as TrainConfig does), defines
them with `define_flags`, reads them back with `config.from_flags`, and runs as
`app.run(cli.main(command))`: a ConfigError or DataError becomes `error: <one line>` and exit
status 1, Ctrl-C exit status 130, never a traceback.
"""
import dataclasses
import json
import os
import sys
from typing import Callable, Optional

from ssl_ema.base import config as config_lib
from ssl_ema.base.errors import ConfigError, DataError, one_line
from ssl_ema.base.config import TrainConfig

# The model of a run by name (--model) -> its key in the Trainer's tf.train.Checkpoint.
CHECKPOINT_KEYS = {'ema': 'teacher', 'raw': 'student'}


def define_flags(cls, module_name: str) -> None:
    """The flags of a command's dataclass, listed by `--help` when the command runs as
    `python -m` (absl calls the main module by its file name). Flags already defined (e.g. by
    ssl_ema.train, when both are imported into one test process) are kept."""
    main = sys.modules.get('__main__')
    if module_name == '__main__' and getattr(main, '__file__', None):
        module_name = sys.argv[0]
    config_lib.define_flags(cls, module_name)


def main(command: Callable[[], None]) -> Callable:
    """An absl main running `command()` with the toolkit's error handling."""
    def run(argv):
        if len(argv) > 1:
            sys.exit(f'error: unexpected arguments {argv[1:]}; flags look like --name=value')
        quiet_tensorflow()
        try:
            command()
        except (ConfigError, DataError) as e:
            sys.exit(f'error: {e}')
        except KeyboardInterrupt:
            sys.exit(130)
    return run


def quiet_tensorflow() -> None:
    """TensorFlow's and absl's INFO lines (checkpoint reads, SavedModel writes) off."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import tensorflow as tf
    from absl import logging
    tf.get_logger().setLevel('WARNING')
    logging.set_verbosity(logging.WARNING)


def require_matplotlib(command: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(f'{command} plots with matplotlib: pip install -e ".[benchmark]"'
                          ) from None


# ---- run directories ------------------------------------------------------------------------
def recorded_total_steps(record: dict) -> int:
    """The training length, in steps, of a run record (flags.json)."""
    c = record['config']
    return config_lib.total_steps(c['train_kimg'], c['train_steps'], c['batch'])


def read_run_record(train_dir: str) -> Optional[dict]:
    """train_dir's flags.json, None if it has none; ConfigError naming the file if it is damaged
    or too old to say how the run was made."""
    path = os.path.join(train_dir, 'flags.json')
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record['config'], dict) or not isinstance(record['algorithm'], dict):
            raise TypeError('config and algorithm must be objects')
        recorded_total_steps(record)
    except (OSError, ValueError, KeyError, TypeError) as e:   # JSONDecodeError is a ValueError
        raise ConfigError(f'{path} is damaged or from an older version ({one_line(e)}); move '
                          f'{train_dir} away or use another --train_dir') from None
    return record


@dataclasses.dataclass
class Run:
    """A run directory that ssl_ema.train made (it has flags.json)."""
    train_dir: str
    record: dict

    @property
    def config(self) -> TrainConfig:
        """The TrainConfig that made the run (fields this version does not know are ignored)."""
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in self.record['config'].items() if k in known})

    def dataset(self, augment: Optional[str] = None):
        """The run's SSLData as ssl_ema.train built it: the same labeled split, validation set
        and input normalisation (its --augment unless `augment` is given)."""
        from ssl_ema import data
        c = self.config
        return data.build(c.dataset, c.labels, c.valid, c.seed,
                          c.augment if augment is None else augment, c.data_dir,
                          input_norm=c.input_norm)

    def statistics_batches(self, dataset=None) -> Optional[list]:
        """For an --ema_bn=recompute run, the training batches over which the Trainer
        re-estimates an average's batch-norm statistics before evaluating it (its checkpoints hold
        the student's statistics in the averages); None for the other --ema_bn modes."""
        c = self.config
        if c.ema_bn != 'recompute':
            return None
        from ssl_ema import algorithms
        from ssl_ema.core.loop import statistics_batches
        return statistics_batches(dataset or self.dataset(), c,
                                  bool(algorithms.ALGORITHMS[c.algorithm].views))

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.train_dir, 'checkpoints')

    def checkpoint(self, path: Optional[str] = None) -> str:
        """The checkpoint to read: `path` (a prefix such as DIR/checkpoints/ckpt-400, or just
        ckpt-400), else the latest one; ConfigError naming --checkpoint if there is none."""
        import tensorflow as tf
        if not path:
            latest = tf.train.latest_checkpoint(self.checkpoint_dir)
            if not latest:
                raise ConfigError(f'--train_dir={self.train_dir} has no checkpoint yet (in '
                                  f'{self.checkpoint_dir}); train it first')
            return latest
        for candidate in (path, os.path.join(self.checkpoint_dir, path)):
            if os.path.exists(candidate + '.index'):
                return candidate
        have = tf.train.get_checkpoint_state(self.checkpoint_dir)
        have = ', '.join(os.path.basename(p) for p in have.all_model_checkpoint_paths) if have \
            else 'none'
        raise ConfigError(f'--checkpoint={path} is not a checkpoint (no {path}.index); '
                          f'{self.checkpoint_dir} has: {have}')


def open_run(train_dir: Optional[str]) -> Run:
    """The run in --train_dir; ConfigError if the flag is missing or names no run."""
    if not train_dir:
        raise ConfigError('--train_dir=DIR is required: a run directory of ssl_ema.train')
    if not os.path.isdir(train_dir):
        raise ConfigError(f'--train_dir={train_dir}: no such directory')
    record = read_run_record(train_dir)
    if record is None:
        raise ConfigError(f'--train_dir={train_dir} is not a run directory (no flags.json): '
                          'give the directory ssl_ema.train wrote')
    return Run(train_dir, record)
