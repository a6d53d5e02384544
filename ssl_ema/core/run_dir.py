"""The run directory, one concept in one module: its file names, how each record is written
(atomically) and read back, and what makes two runs the same run.

    <train_dir>/flags.json         the TrainConfig and algorithm hyperparameters that made the run
                flagfile           the same as flags (`--flagfile=<dir>/flagfile` reproduces it)
                split.json         the labeled and validation indices
                classifier.json    image shape, classes, normalisation (what an export needs)
                checkpoints/       tf.train.CheckpointManager's
                tensorboard/       TensorBoard scalars
                evaluations.jsonl  every evaluation, one JSON object per line
                accuracy.json      the summary of the evaluations (core/accuracy.summarize)
                export/            the EMA classifier, once the run has finished (core/classifier)
                posthoc/           post-hoc EMA snapshots (core/snapshots), posthoc.json its sweep
                backbone.keras     a pretraining run's backbone (core/pretraining.py), whose
                                   flags.json holds a PretrainConfig and the method's
                .lock              one writer at a time (base/files.lock_run_dir)

Other modules ask this one for paths and records; none spells a file name.
"""
import contextlib
import dataclasses
import json
import os
import re
import zlib
from typing import Optional

from ssl_ema.base import files, hparams, recipes
from ssl_ema.base.config import TrainConfig
from ssl_ema.base.errors import ConfigError, one_line

RECORD, FLAGFILE, SPLIT = 'flags.json', 'flagfile', 'split.json'
CLASSIFIER, HISTORY, SUMMARY = 'classifier.json', 'evaluations.jsonl', 'accuracy.json'
CHECKPOINTS, TENSORBOARD, SNAPSHOTS, POSTHOC = 'checkpoints', 'tensorboard', 'posthoc', 'posthoc.json'
BACKBONE = 'backbone.keras'   # what a pretraining run leaves (core/pretraining.py)
ROOT = 'experiments'   # where default run directories go, relative to the working directory
_NAMED = ('algorithm', 'method', 'dataset', 'labels', 'seed', 'arch')   # in the directory name
# The model of a run by name (--model) -> its key in the Trainer's tf.train.Checkpoint.
CHECKPOINT_KEYS = {'ema': 'teacher', 'raw': 'student'}
# The averages' heads, {average name: variables} (the student's heads are under 'heads'): an
# open-set algorithm's, and with --teacher=ema those of an algorithm whose targets read them
# (algorithms/base.averages_carry_heads). SimMatch's and CoMatch's older checkpoints lack them
# (core/loop.Trainer.checkpoint_to_restore).
AVERAGE_HEADS = 'average_heads'
# Settings newer than some run directories, and what a record without them means.
LEGACY = {'recipe': 'none'}


def default_train_dir(cfg, algorithm, arch: str, prefix: str = '') -> str:
    """experiments/<dataset>.<labels>@<seed>/<algorithm>_<arch>[_<non-default hyperparameters>]:
    the hyperparameters name the directory, so running the same command again resumes. `cfg` is
    a TrainConfig (or a PretrainConfig, with `prefix` 'pretrain_' and the method as algorithm)."""
    # A setting is named when it differs from its default under the run's recipe (whose own name
    # is named unless it is `none`: the directories of runs made before recipes are unchanged).
    recipe = recipes.RECIPES.get(getattr(cfg, 'recipe', 'none'), recipes.RECIPES['none'])
    defaults = {k: f.default for k, f in type(cfg).__dataclass_fields__.items()}
    defaults.update(recipe.settings)
    changed = [(k, v) for k, v in hparams.run_defining(cfg).items()
               if k not in _NAMED and k != 'recipe' and v != defaults[k]]
    if recipe.name != 'none':
        changed.append(('recipe', recipe.name))
    own = {k: f.default for k, f in type(algorithm).__dataclass_fields__.items()}
    own.update(getattr(algorithm, 'base_defaults', {}))   # those that follow a plugged base
    changed += [(k, v) for k, v in dataclasses.asdict(algorithm).items()
                if v != recipe.settings.get(k, own[k])]
    dataset = re.sub(r'[^\w.-]+', '_', os.path.basename(cfg.dataset.rstrip('/')))
    if ':' in arch:   # keras:PATH, keras_hub:HANDLE, model:NAME -> keras-<stem>-<crc32>, ...
        kind, source = arch.split(':', 1)
        stem = os.path.splitext(os.path.basename(source.rstrip('/')))[0] or source
        arch = kind + '-' + re.sub(r'[^\w.-]+', '-', stem)
        if kind != 'model':   # two files named backbone.keras in two directories: two runs
            arch += f'-{zlib.crc32(source.encode()):08x}'
    name = '_'.join([f'{prefix}{algorithm.name}', arch] + [f'{k}{v}' for k, v in sorted(changed)])
    return os.path.join(ROOT, f'{dataset}.{cfg.labels}@{cfg.seed}', name)


def run_record(cfg: TrainConfig, algorithm) -> dict:
    """What flags.json holds: the whole config and the algorithm's hyperparameters."""
    return {'config': dataclasses.asdict(cfg), 'algorithm': dataclasses.asdict(algorithm)}


def recorded_total_steps(record: dict) -> int:
    """The training length, in steps, of a run record (flags.json)."""
    c = record['config']
    return hparams.total_steps(c['train_kimg'], c['train_steps'], c['batch'])


def trained(train_dir: str, record: Optional[dict] = None) -> bool:
    """True if the run in train_dir trained to its length: its accuracy.json (written after the
    last evaluation's checkpoint) says so, or lists the self-training rounds that followed."""
    record = record or read_run_record(train_dir)
    summary = read_summary(train_dir) or {}
    return bool(record) and ('rounds' in summary or
                             summary.get('step', 0) >= recorded_total_steps(record))


def finished(train_dir: str, record: Optional[dict] = None) -> bool:
    """True if the run in train_dir is done: its accuracy.json reached its length (written after
    its last evaluation and checkpoint) and, where self-training rounds follow it
    (--self_training_kimg, not supervised), lists them (core/distilling.run_rounds publishes
    them last)."""
    record = record or read_run_record(train_dir)
    summary = read_summary(train_dir) or {}
    if not record:
        return False
    c = record['config']
    if c.get('self_training_kimg') and c.get('algorithm') not in ('supervised', 'distill'):
        return 'rounds' in summary
    return summary.get('step', 0) >= recorded_total_steps(record)


def read_run_record(train_dir: str) -> Optional[dict]:
    """train_dir's flags.json, None if it has none; ConfigError naming the file if it is damaged
    or too old to say how the run was made."""
    path = os.path.join(train_dir, RECORD)
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


def checkpoint_holds(path: str, key: str) -> bool:
    """True if the checkpoint `path` holds objects under the top-level `key` of the
    tf.train.Checkpoint that wrote it."""
    import tensorflow as tf
    return any(name.split('/')[0] == key for name, _ in tf.train.list_variables(path))


@contextlib.contextmanager
def claim(train_dir: str, record: dict, chief: bool = True, log=print, config_cls=TrainConfig):
    """The run directory for one run, as training and pretraining take it: refused (ConfigError)
    before anything is touched if it holds another run or cannot be written, then locked by the
    chief (multi-worker: only the chief writes it) and checked again under the lock (another
    process may have started the run meanwhile). Yields True if the run resumes; the lock is
    released when the block ends."""
    check_compatible(train_dir, record, log, config_cls)
    files.check_writable_dir(train_dir, 'train_dir')
    lock = files.lock_run_dir(train_dir) if chief else None   # one writer per run directory
    try:
        yield check_compatible(train_dir, record, lambda *a: None, config_cls)
    finally:
        if lock:
            lock.close()


def _newer_defaults(record: dict, saved: dict) -> dict:
    """The defaults of the hyperparameters `record`'s algorithm has and the `saved` record of the
    same algorithm lacks (added after that run was made): name -> default."""
    from ssl_ema.algorithms import base, distillation
    from ssl_ema.algorithms.pretraining import base as pretraining
    key = 'method' if 'method' in record['config'] else 'algorithm'
    name = record['config'].get(key)
    if name != saved['config'].get(key):
        return {}
    for registry in (base.ALGORITHMS, distillation.ROUNDS, pretraining.METHODS):
        if name in registry:
            return {f.name: f.default for f in dataclasses.fields(registry[name])
                    if f.name in record['algorithm'] and f.name not in saved['algorithm']
                    and f.default is not dataclasses.MISSING}
    return {}


def check_compatible(train_dir: str, record: dict, log=print, config_cls=TrainConfig) -> bool:
    """True if train_dir holds a run to resume; ConfigError if it was made with other flags or
    for another length. A change of devices only gets a warning. `config_cls`: the config
    dataclass of the record (PretrainConfig for a pretraining run)."""
    saved = read_run_record(train_dir)
    if saved is None:
        return False
    defining = set(hparams.run_defining(config_cls()))
    defaults = dataclasses.asdict(config_cls())

    def hyperparameters(r, newer=None):   # a flag newer than the run (e.g. --image_size, an
        # algorithm's --student_weak_pass) counts as its default, as the run was made (--recipe
        # as `none`: the defaults before recipes); any other key only one side has differs
        return dict({k: r['config'].get(k, LEGACY.get(k, defaults[k])) for k in defining},
                    **{**(newer or {}), **r['algorithm']})
    current, before = hyperparameters(record), hyperparameters(saved, _newer_defaults(record,
                                                                                      saved))
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
        c = {k: c.get(k, config_cls.__dataclass_fields__[k].default)
             for k in ('distribute', 'cpu_devices')}
        return f'--distribute={c["distribute"]}' + (
            f' --cpu_devices={c["cpu_devices"]}' if c['distribute'] == 'mirrored' else '')
    if devices(saved['config']) != devices(record['config']):
        log(f'warning: {train_dir} was trained with {devices(saved["config"])} and resumes with '
            f'{devices(record["config"])}: the run will not be bit-identical to an uninterrupted '
            'one')
    return True


def write_new_run(train_dir: str, record: dict, split: dict) -> None:
    """split.json, flagfile, then flags.json: last, because a directory with flags.json is a run
    to resume, so everything else is there."""
    files.write_json(os.path.join(train_dir, SPLIT), split)
    values = {**record['config'], **record['algorithm']}
    if 'teacher' in record:   # a self-training round (core/distilling.py): ssl_ema.distill's flag
        values['teacher_run'] = record['teacher']['train_dir']
    flagfile = ''.join(f'--{k}={v}\n' for k, v in values.items() if v is not None)
    files.write_atomically(os.path.join(train_dir, FLAGFILE), lambda f: f.write(flagfile), 'w')
    files.write_json(os.path.join(train_dir, RECORD), record)


def read_history(train_dir: str, up_to_step: Optional[int] = None) -> list:
    """evaluations.jsonl as a list of dicts ([] if none), those after `up_to_step` left out."""
    path = os.path.join(train_dir, HISTORY)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        history = [json.loads(line) for line in f if line.strip()]
    return [h for h in history if up_to_step is None or h['step'] <= up_to_step]


def write_history(train_dir: str, history: list) -> None:
    files.write_atomically(
        os.path.join(train_dir, HISTORY),
        lambda f: f.writelines(json.dumps(h, sort_keys=True) + '\n' for h in history), mode='w')


def read_summary(train_dir: str) -> Optional[dict]:
    """accuracy.json, None if it is missing or being replaced."""
    try:
        with open(os.path.join(train_dir, SUMMARY)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def checkpoint_step(train_dir: str) -> int:
    """Step of the latest checkpoint in `train_dir` (named ckpt-<step>), where a resumed run
    starts; 0 without one."""
    import tensorflow as tf
    latest = tf.train.latest_checkpoint(os.path.join(train_dir, CHECKPOINTS))
    return int(latest.rsplit('-', 1)[1]) if latest else 0


def write_summary(train_dir: str, summary: dict) -> None:
    files.write_json(os.path.join(train_dir, SUMMARY), summary)


@dataclasses.dataclass
class RunDir:
    """A run directory that training made (it has flags.json)."""
    train_dir: str
    record: dict

    @property
    def config(self) -> TrainConfig:
        """The TrainConfig that made the run (fields this version does not know are ignored)."""
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{**LEGACY, **{k: v for k, v in self.record['config'].items()
                                           if k in known}})

    def path(self, name: str) -> str:
        return os.path.join(self.train_dir, name)

    def dataset(self, augment: Optional[str] = None):
        """The run's SSLData as training built it: the same labeled split, validation set and
        input normalisation (its --augment unless `augment` is given)."""
        from ssl_ema import data
        c = self.config
        return data.build(c.dataset, c.labels, c.valid, c.seed,
                          c.augment if augment is None else augment, c.data_dir,
                          input_norm=c.input_norm, image_size=c.image_size,
                          protocol=data.Protocol.of(c))

    def statistics_batches(self, dataset=None) -> Optional[list]:
        """For an --ema_bn=recompute run, the training batches over which the Trainer
        re-estimates an average's batch-norm statistics before evaluating it (its checkpoints hold
        the student's statistics in the averages); None for the other --ema_bn modes."""
        c = self.config
        if c.ema_bn != 'recompute':
            return None
        from ssl_ema import algorithms
        from ssl_ema.core.ema import statistics_batches
        return statistics_batches(dataset or self.dataset(), c,
                                  bool(algorithms.ALGORITHMS[c.algorithm].views))

    @property
    def checkpoint_dir(self) -> str:
        return self.path(CHECKPOINTS)

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


def open_run_dir(train_dir: Optional[str]) -> RunDir:
    """The run in --train_dir; ConfigError if the flag is missing or names no run."""
    if not train_dir:
        raise ConfigError('--train_dir=DIR is required: a run directory of ssl_ema.train')
    if not os.path.isdir(train_dir):
        raise ConfigError(f'--train_dir={train_dir}: no such directory')
    record = read_run_record(train_dir)
    if record is None:
        raise ConfigError(f'--train_dir={train_dir} is not a run directory (no {RECORD}): '
                          'give the directory ssl_ema.train wrote')
    return RunDir(train_dir, record)
