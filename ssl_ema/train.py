"""Train a semi-supervised classifier: `python -m ssl_ema.train [--flags]`.

With no flags: Mean Teacher on scikit-learn's embedded 8x8 digits with 50 labels, in about a
minute on a CPU. `--helpfull` lists every flag, each algorithm's under its own module.
"""
import dataclasses
import os
import re
import signal
import sys

from absl import app, flags, logging

from ssl_ema.base import config as config_lib
from ssl_ema.cli import read_run_record, recorded_total_steps
from ssl_ema.base.errors import ConfigError, DataError, RunError
from ssl_ema.base.config import TrainConfig

config_lib.define_flags(TrainConfig, 'ssl_ema.base.config')
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


def check_compatible(train_dir: str, record: dict, log=print) -> bool:
    """True if train_dir holds a run to resume; ConfigError if it was made with other flags or
    for another length. A change of devices only gets a warning."""
    saved = read_run_record(train_dir)
    if saved is None:
        return False
    defining = set(config_lib.run_defining(TrainConfig()))

    def hyperparameters(r):   # a key that only one side has shows up as a difference
        return dict({k: v for k, v in r['config'].items() if k in defining}, **r['algorithm'])
    current, before = hyperparameters(record), hyperparameters(saved)
    for key in sorted(set(current) | set(before)):
        if current.get(key) != before.get(key):
            raise ConfigError(f'--train_dir={train_dir} holds a run made with --{key}='
                              f'{before.get(key)}, not --{key}={current.get(key)}; use another '
                              f'--train_dir or the same flags')
    # The length is not in the directory name, but the cosine learning rate, the ramp-ups and
    # UDA's TSA schedule are functions of step / total steps: another length is another run.
    old_steps, new_steps = recorded_total_steps(saved), recorded_total_steps(record)
    if old_steps != new_steps:
        flag = ('train_steps' if saved['config']['train_steps'] or record['config']['train_steps']
                else 'train_kimg')
        raise ConfigError(f'--train_dir={train_dir} holds a run of {old_steps} steps (--{flag}='
                          f'{saved["config"][flag]}), not {new_steps} (--{flag}='
                          f'{record["config"][flag]}); resume it with --{flag}='
                          f'{saved["config"][flag]} or use another --train_dir')
    # Another device layout splits the batch (and the per-replica random streams) differently:
    # the run goes on, but is no longer bit-identical to an uninterrupted one.
    def devices(c):
        c = {k: c.get(k, TrainConfig.__dataclass_fields__[k].default)
             for k in ('distribute', 'cpu_devices')}
        return f'--distribute={c["distribute"]}' + (
            f' --cpu_devices={c["cpu_devices"]}' if c['distribute'] == 'mirrored' else '')
    if devices(saved['config']) != devices(record['config']):
        log(f'warning: {train_dir} was trained with {devices(saved["config"])} and resumes with '
            f'{devices(record["config"])}: the run will not be bit-identical to an uninterrupted '
            'one')
    return True


def make_strategy(cfg: TrainConfig):
    import tensorflow as tf
    if cfg.distribute == 'default':
        return tf.distribute.get_strategy()
    if cfg.distribute == 'multi_worker':
        from ssl_ema.core import cluster
        return cluster.strategy(cfg.collective_timeout_s)
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
    """Validate everything, then train (or resume), export the EMA classifier to DIR/export and
    return the accuracy summary."""
    from ssl_ema.nn import backbones
    from ssl_ema import data, export
    from ssl_ema.base.files import check_writable_dir, lock_run_dir, write_atomically, write_json
    from ssl_ema.core.loop import Trainer

    strategy = make_strategy(cfg)
    dataset = data.build(cfg.dataset, cfg.labels, cfg.valid, cfg.seed, cfg.augment, cfg.data_dir,
                         input_norm=cfg.input_norm)
    arch = backbones.resolve(cfg.arch, dataset.image_shape)
    cfg = dataclasses.replace(cfg, arch=arch)
    train_dir = cfg.train_dir or default_train_dir(cfg, algorithm, arch)
    record = run_record(dataclasses.replace(cfg, train_dir=train_dir), algorithm)
    check_compatible(train_dir, record, log)   # refuse before touching the directory
    check_writable_dir(train_dir, 'train_dir')
    chief = strategy.extended.should_checkpoint   # multi-worker: only the chief writes train_dir
    lock = lock_run_dir(train_dir) if chief else None   # one writer per run directory
    try:
        # Again under the lock: another process may have started this run in the meantime.
        resuming = check_compatible(train_dir, record, lambda *a: None)
        if cfg.deterministic:
            import tensorflow as tf
            tf.config.experimental.enable_op_determinism()
        trainer = Trainer(cfg, algorithm, dataset, train_dir, strategy)   # builds (and checks) the model
        if chief:
            try:
                export.write_classifier_info(train_dir, dataset)   # what an export needs besides weights
                if not resuming:
                    write_json(os.path.join(train_dir, 'split.json'), dataset.split.as_dict())
                    values = {**record['config'], **record['algorithm']}
                    flagfile = ''.join(f'--{k}={v}\n' for k, v in values.items() if v is not None)
                    write_atomically(os.path.join(train_dir, 'flagfile'),
                                     lambda f: f.write(flagfile), 'w')
                    # Last: a directory with flags.json is a run to resume, so everything else is there.
                    write_json(os.path.join(train_dir, 'flags.json'), record)
            except OSError as e:
                raise RunError(f'cannot write {e.filename}: {e.strerror}') from None
        log(f'{cfg.algorithm} on {cfg.dataset} ({cfg.labels} labels, seed {cfg.seed}), {arch}, '
            f'{cfg.total_steps} steps of {cfg.batch}+{cfg.batch * cfg.uratio} images -> {train_dir}')
        summary = trainer.train(log)
        if chief:
            log(format_table(summary))
            export.export_run(train_dir, log=log, skip_if_current=True)   # DIR/export: the EMA model
    finally:
        if lock:
            lock.close()
    return summary


def format_table(summary: dict) -> str:
    splits = list(summary['ema'])
    lines = [f'{"accuracy (%)":<14}' + ''.join(f'{s:>8}' for s in splits)]
    models = [m for m in summary if isinstance(summary[m], dict) and m not in ('raw', 'ema')]
    labels = {'raw': 'raw student', 'ema': 'EMA'}
    for model in ['raw', 'ema'] + models:   # extra averages (--ema_decays, Polyak) after the EMA
        label = labels.get(model, model)
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
        for name in algorithms.base.ignored_flags(algorithm):
            own = ', '.join(f.name for f in dataclasses.fields(algorithm)) or 'none'
            print(f'warning: --{name} is ignored: --algorithm={cfg.algorithm} does not use it '
                  f'(its own flags: {own})', file=sys.stderr)
        run(cfg, algorithm)
        exit_now(0)
    except (ConfigError, DataError, RunError) as e:
        sys.exit(f'error: {e}')
    except tf.errors.OpError as e:   # a collective failed: another worker died or hung
        if FLAGS.distribute != 'multi_worker':
            raise
        from ssl_ema.core import cluster
        print(f'error: {cluster.lost_worker(e, FLAGS.collective_timeout_s)}', file=sys.stderr)
        exit_now(1)
    except KeyboardInterrupt:
        exit_now(130)


def exit_now(code: int):
    """Exit with `code`; multi-worker, without TensorFlow's shutdown, which waits for workers
    that are gone (~20 s after a lost worker; after a finished run the preemption handler's
    clean-up can wait on the chief's coordination service for minutes). Everything the run leaves
    is written and flushed by now, and no collective follows the last step."""
    if FLAGS.distribute != 'multi_worker':
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == '__main__':
    app.run(main, flags_parser=config_lib.parse_flags)
