"""Train a semi-supervised classifier: `python -m ssl_ema.train [--flags]`.

With no flags: Mean Teacher on scikit-learn's embedded 8x8 digits with 50 labels, in about a
minute on a CPU. `--helpfull` lists every flag, each algorithm's under its own module.
"""
import dataclasses
import json
import os
import re
import signal
import sys

from absl import app, flags, logging

from ssl_ema import config as config_lib
from ssl_ema.config import ConfigError, TrainConfig
from ssl_ema.data.datasets import DataError

config_lib.define_flags(TrainConfig, 'ssl_ema.config')
from ssl_ema import algorithms  # noqa: E402  (defines each algorithm's flags)

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(config_lib)   # --help shows the training flags, not just --helpfull
ROOT = 'experiments'
_NAMED = ('algorithm', 'dataset', 'labels', 'seed', 'arch')   # already in the directory name


def default_train_dir(cfg: TrainConfig, algorithm, arch: str) -> str:
    """experiments/<dataset>.<labels>@<seed>/<algorithm>_<arch>[_<non-default hyperparameters>]:
    the hyperparameters name the directory, so running the same command again resumes."""
    changed = [(k, v) for k, v in config_lib.run_defining(cfg).items()
               if k not in _NAMED and v != TrainConfig.__dataclass_fields__[k].default]
    fields = type(algorithm).__dataclass_fields__
    changed += [(k, v) for k, v in dataclasses.asdict(algorithm).items() if v != fields[k].default]
    dataset = re.sub(r'[^\w.-]+', '_', os.path.basename(cfg.dataset.rstrip('/')))
    name = '_'.join([f'{cfg.algorithm}', arch] + [f'{k}{v}' for k, v in sorted(changed)])
    return os.path.join(ROOT, f'{dataset}.{cfg.labels}@{cfg.seed}', name)


def run_record(cfg: TrainConfig, algorithm) -> dict:
    return {'config': dataclasses.asdict(cfg), 'algorithm': dataclasses.asdict(algorithm)}


def check_compatible(train_dir: str, record: dict) -> bool:
    """True if train_dir holds a run to resume; ConfigError if it was made with other flags."""
    path = os.path.join(train_dir, 'flags.json')
    if not os.path.exists(path):
        return False
    with open(path) as f:
        saved = json.load(f)
    defining = set(config_lib.run_defining(TrainConfig()))

    def hyperparameters(r):   # a key that only one side has shows up as a difference
        return dict({k: v for k, v in r['config'].items() if k in defining}, **r['algorithm'])
    current, before = hyperparameters(record), hyperparameters(saved)
    for key in sorted(set(current) | set(before)):
        if current.get(key) != before.get(key):
            raise ConfigError(f'--train_dir={train_dir} holds a run made with --{key}='
                              f'{before.get(key)}, not --{key}={current.get(key)}; use another '
                              f'--train_dir or the same flags')
    return True


def make_strategy(cfg: TrainConfig):
    import tensorflow as tf
    if cfg.distribute == 'default':
        return tf.distribute.get_strategy()
    if tf.config.list_physical_devices('GPU'):
        return tf.distribute.MirroredStrategy()
    cpu = tf.config.list_physical_devices('CPU')[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) < cfg.cpu_devices:
        try:   # possible only before TensorFlow initialises its devices, hence run() starts here
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.cpu_devices)
        except RuntimeError:
            raise ConfigError(f'--cpu_devices={cfg.cpu_devices} must be set before TensorFlow '
                              'starts (as from the command line)') from None
    return tf.distribute.MirroredStrategy([f'/cpu:{i}' for i in range(cfg.cpu_devices)])


def run(cfg: TrainConfig, algorithm, log=print) -> dict:
    """Validate everything, then train (or resume) and return the accuracy summary."""
    from ssl_ema import backbones, data
    from ssl_ema.evaluation import write_json
    from ssl_ema.trainer import Trainer

    strategy = make_strategy(cfg)
    dataset = data.build(cfg.dataset, cfg.labels, cfg.valid, cfg.seed, cfg.augment, cfg.data_dir)
    arch = backbones.resolve(cfg.arch, dataset.image_shape)
    cfg = dataclasses.replace(cfg, arch=arch)
    train_dir = cfg.train_dir or default_train_dir(cfg, algorithm, arch)
    record = run_record(dataclasses.replace(cfg, train_dir=train_dir), algorithm)
    resuming = check_compatible(train_dir, record)
    if cfg.deterministic:
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()
    trainer = Trainer(cfg, algorithm, dataset, train_dir, strategy)   # builds (and checks) the model
    if not resuming:
        os.makedirs(train_dir, exist_ok=True)
        write_json(os.path.join(train_dir, 'split.json'), dataset.split.as_dict())
        write_json(os.path.join(train_dir, 'flags.json'), record)
        with open(os.path.join(train_dir, 'flagfile'), 'w') as f:
            f.writelines(f'--{k}={v}\n' for k, v in {**record['config'], **record['algorithm']}.items()
                         if v is not None)
    log(f'{cfg.algorithm} on {cfg.dataset} ({cfg.labels} labels, seed {cfg.seed}), {arch}, '
        f'{cfg.total_steps} steps of {cfg.batch}+{cfg.batch * cfg.uratio} images -> {train_dir}')
    summary = trainer.train(log)
    log(format_table(summary))
    return summary


def format_table(summary: dict) -> str:
    splits = list(summary['ema'])
    lines = [f'{"accuracy (%)":<14}' + ''.join(f'{s:>8}' for s in splits)]
    for model, label in (('raw', 'raw student'), ('ema', 'EMA')):
        lines.append(f'{label:<14}' + ''.join(f'{summary[model][s]["last"]:8.2f}' for s in splits))
    return '\n'.join(lines)


def main(argv):
    if len(argv) > 1:
        sys.exit(f'error: unexpected arguments {argv[1:]}; flags look like --name=value')

    import tensorflow as tf
    tf.get_logger().setLevel('WARNING')
    logging.set_verbosity(logging.WARNING)   # TF's per-checkpoint INFO lines

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)   # `kill` saves a checkpoint like Ctrl-C does
    try:
        cfg = config_lib.from_flags(TrainConfig)
        algorithm = algorithms.create(cfg.algorithm)
        run(cfg, algorithm)
    except (ConfigError, DataError) as e:
        sys.exit(f'error: {e}')
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == '__main__':
    app.run(main)
