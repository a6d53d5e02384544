"""The one wrapper every `python -m ssl_ema.<verb>` command runs in.

A command declares its flags as a dataclass of `hparam` fields (as TrainConfig does) and ends
with `cli.run(main, ItsConfig)`: the flags are defined (listed by `--help`), parsed (a bad flag is
one `error:` line), read back into the dataclass (whose checks raise ConfigError), and
`main(config)` calls the library. Whatever goes wrong becomes one line `error: <message>` and
exit status 1 (ConfigError, DataError, RunError; a lost worker under multi-worker training),
Ctrl-C or SIGTERM exit status 130, never a traceback. A command that finished but left something
out says so by the `exit_status` of what it returns (predict: 2 when it skipped unreadable files);
otherwise the status is 0. The library itself never exits.
"""
import dataclasses
import os
import signal
import sys
from typing import Callable, Optional

from absl import app, flags

from ssl_ema.base import hparams
from ssl_ema.base.config import TrainConfig
from ssl_ema.base.errors import ConfigError, DataError, RunError


def define_flags(cls, module_name: str) -> None:
    """The flags of a command's dataclass, listed by `--help` when the command runs as
    `python -m` (absl calls the main module by its file name). Flags already defined (e.g. by
    ssl_ema.train, when both are imported into one test process) are kept."""
    main = sys.modules.get('__main__')
    if module_name == '__main__' and getattr(main, '__file__', None):
        module_name = sys.argv[0]
    hparams.define_flags(cls, module_name)


def define_train_flags() -> None:
    """Every training flag (TrainConfig's, listed by --help) and every algorithm's own (listed
    under its module by --helpfull): what ssl_ema.train and ssl_ema.benchmark take."""
    from ssl_ema.base import config
    hparams.define_flags(TrainConfig, config.__name__)
    from ssl_ema import algorithms
    algorithms.define_algorithm_flags()
    for f in dataclasses.fields(TrainConfig):   # --help shows them, not just --helpfull
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[f.name])


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


def main(command: Callable, config_cls=None) -> Callable:
    """An absl main running `command(config)` (or `command()` without a config class) with the
    toolkit's error handling."""
    def run(argv):
        if len(argv) > 1:
            sys.exit(f'error: unexpected arguments {argv[1:]}; flags look like --name=value')
        quiet_tensorflow()
        import tensorflow as tf

        def stop(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, stop)   # `kill` saves a checkpoint like Ctrl-C does
        cfg = None
        try:
            if config_cls is None:
                result = command()
            else:
                cfg = hparams.from_flags(config_cls)
                result = command(cfg)
            _exit(getattr(result, 'exit_status', 0), cfg)
        except (ConfigError, DataError, RunError) as e:
            _exit(f'error: {e}', cfg)
        except tf.errors.OpError as e:   # a collective failed: another worker died or hung
            if getattr(cfg, 'distribute', None) != 'multi_worker':
                raise
            from ssl_ema.core import cluster
            _exit(f'error: {cluster.lost_worker(e, cfg.collective_timeout_s)}', cfg)
        except KeyboardInterrupt:
            _exit(130, cfg)
    return run


def run(command: Callable, config_cls=None, module_name: Optional[str] = '__main__',
        setup: Optional[Callable] = None) -> None:
    """Define the command's flags (its dataclass's, then `setup()`'s), parse them and run
    `command` under `main`'s error handling. Never returns."""
    if config_cls is not None and config_cls is not TrainConfig:
        define_flags(config_cls, module_name)
    if setup:
        setup()
    app.run(main(command, config_cls), flags_parser=hparams.parse_flags)


def _exit(code, cfg=None):
    """sys.exit(code) (a message: printed to stderr, exit status 1); multi-worker, without
    TensorFlow's shutdown, which waits for workers that are gone (~20 s after a lost worker; after
    a finished run the preemption handler's clean-up can wait on the chief's coordination service
    for minutes). Everything the run leaves is written and flushed by now, and no collective
    follows the last step."""
    if getattr(cfg, 'distribute', None) != 'multi_worker':
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
