"""A self-training round: a finished run (the teacher) labels the unlabeled pool once, and a new
student learns the labels and those pseudo-labels (algorithms/distillation.py's loss), with every
guarantee of a run directory (resume, lock, NaN guard, records, export: core/one_run.train).

On disk, a round is a run directory of its own, by default inside its teacher's:

    TEACHER/rounds/distill_<arch>[_<non-default flags>]/   flags.json (+ "teacher": its
            directory, the checkpoint that labelled the pool, a fingerprint of its flags, split
            and checkpoint), pseudo_labels.npz (the teacher's probabilities on the pool, the
            targets and selection weights trained on), checkpoints/, evaluations.jsonl,
            accuracy.json, export/ (this round's EMA classifier), ...

so rounds chain (a round is a teacher like any run: ROUND/rounds/...), and `open_run(ROUND)` is
the round's classifier. A round trains on its teacher's dataset, split and input normalisation
(its --dataset, --labels, --valid, --seed ... are the teacher's, never its own).
"""
import dataclasses
import functools
import json
import os
import zlib

import numpy as np

from ssl_ema.base import files
from ssl_ema.base.config import TrainConfig
from ssl_ema.base.errors import ConfigError
from ssl_ema.core import one_run, pool, run_dir

PSEUDO_LABELS = 'pseudo_labels.npz'
ROUNDS = 'rounds'
# What a round takes from its teacher: the data, the split and how images enter the model.
INHERITED = ('dataset', 'data_dir', 'labels', 'valid', 'seed', 'image_size', 'input_norm')


def open_teacher(teacher_dir: str) -> run_dir.RunDir:
    """The teacher's run directory; ConfigError (one line, naming --teacher) if it is missing,
    not a training run, or not finished."""
    if not teacher_dir:
        raise ConfigError('--teacher_run=DIR is required: a finished run directory of ssl_ema.train '
                          'or ssl_ema.distill')
    if not os.path.isdir(teacher_dir):
        raise ConfigError(f'--teacher_run={teacher_dir}: no such directory')
    record = run_dir.read_run_record(teacher_dir)
    if record is None or 'algorithm' not in record['config']:
        raise ConfigError(f'--teacher_run={teacher_dir} is not a training run directory (no '
                          f'{run_dir.RECORD} of ssl_ema.train or ssl_ema.distill)')
    if not run_dir.trained(teacher_dir, record):
        step = (run_dir.read_summary(teacher_dir) or {}).get('step', 0)
        raise ConfigError(f'--teacher_run={teacher_dir} is unfinished (step {step} of '
                          f'{run_dir.recorded_total_steps(record)}): finish it first by running '
                          'its command again')
    return run_dir.RunDir(teacher_dir, record)


def fingerprint(teacher: run_dir.RunDir, checkpoint: str) -> str:
    """crc32 of what the pseudo-labels depend on: the teacher's flags.json, split.json and the
    checkpoint's index (its weights' layout and step)."""
    crc = 0
    for path in (teacher.path(run_dir.RECORD), teacher.path(run_dir.SPLIT), checkpoint + '.index'):
        with open(path, 'rb') as f:
            crc = zlib.crc32(f.read(), crc)
    return f'{crc:08x}'


def student_config(cfg: TrainConfig, teacher: run_dir.RunDir, explicit=()) -> TrainConfig:
    """`cfg` with the teacher's data and split (INHERITED) and algorithm 'distill'; ConfigError if
    one of the settings the user gave (`explicit`) differs from the teacher's."""
    theirs = teacher.config
    for name in INHERITED:
        if name in explicit and getattr(cfg, name) != getattr(theirs, name):
            raise ConfigError(f'--{name}={getattr(cfg, name)} differs from the teacher\'s '
                              f'--{name}={getattr(theirs, name)} ({teacher.train_dir}): a round '
                              'trains on its teacher\'s data and split; leave it out')
    return dataclasses.replace(cfg, algorithm='distill',
                               **{n: getattr(theirs, n) for n in INHERITED})


def default_train_dir(teacher_dir: str, cfg: TrainConfig, algorithm, arch: str) -> str:
    """TEACHER/rounds/distill_<arch>[_<non-default flags>] (run_dir's naming, inside the
    teacher's directory: two teachers never share a round)."""
    name = os.path.basename(run_dir.default_train_dir(cfg, algorithm, arch))
    return os.path.join(teacher_dir, ROUNDS, name)


def label_pool(teacher: run_dir.RunDir, algorithm, data, log=print):
    """(probabilities, targets, weights, checkpoint) of the teacher's `algorithm.teacher_model`
    classifier on the pool (core/pool.py)."""
    from ssl_ema.core import classifier
    info = classifier.classifier_info(teacher)
    net, checkpoint, step = classifier.restore_backbone(teacher, info, algorithm.teacher_model)
    probs, certainty = pool.predict_pool(net, data), None
    if algorithm.propagation_neighbours:
        labeled, labels = data.labeled_images()
        flip = data.arrays.flip
        probs, certainty = pool.propagate(
            pool.embed(net, labeled, flip), labels, pool.embed(net, data.pool_images(), flip),
            data.num_classes, k=algorithm.propagation_neighbours)
    targets, weights = pool.pseudo_labels(probs, algorithm.pseudo_labels, algorithm.per_class,
                                          algorithm.temperature, certainty)
    how = (f'label propagation ({algorithm.propagation_neighbours} neighbours) over the features'
           if algorithm.propagation_neighbours else 'the classifier')
    accuracy = hidden_accuracy(targets, weights, data)
    log(f'labelled the pool ({len(probs)} images) with {how} of the {algorithm.teacher_model} '
        f'model of {checkpoint} (step {step}): {int((weights > 0).sum())} pseudo-labels kept, '
        f'{accuracy:.2f}% right by the pool\'s hidden labels (a diagnostic only)')
    return probs, targets, weights, checkpoint, accuracy


def hidden_accuracy(targets, weights, data) -> float:
    """Percentage of the kept pseudo-labels that equal the pool images' own labels, where the
    dataset has them (the training images the split left unlabeled; not extra unlabeled ones):
    reported, never used for training or choosing."""
    hidden = data.arrays.y_train[data.split.unlabeled]
    kept = weights[:len(hidden)] > 0
    right = targets[:len(hidden)].argmax(1) == hidden
    return float(100. * right[kept].mean()) if kept.any() else float('nan')


def prepare(teacher: run_dir.RunDir, train_dir: str, algorithm, data, trainer, log=print):
    """Before a round trains (under its run-directory lock): the pool's pseudo-labels, made once
    and kept in train_dir (a resumed round reads them back: the teacher is not run again), checked
    against the teacher as it is now; the student starts from the teacher's weights with
    --init=teacher (a resumed round then restores its own checkpoint over them)."""
    path = os.path.join(train_dir, PSEUDO_LABELS)
    saved = run_dir.read_run_record(train_dir) or {}
    if os.path.exists(path) and saved:   # (without flags.json the round never started)
        with np.load(path) as z:
            targets, weights, checkpoint = z['targets'], z['weights'], str(z['checkpoint'])
            accuracy = float(z['hidden_accuracy'])
        if not os.path.exists(checkpoint + '.index') or fingerprint(teacher, checkpoint) != (
                saved.get('teacher', {}).get('fingerprint')):
            raise ConfigError(f'--teacher_run={teacher.train_dir} changed after the round in '
                              f'{train_dir} started (its flags, split or checkpoint {checkpoint}'
                              '): use another --train_dir, or restore the teacher')
    else:
        probs, targets, weights, checkpoint, accuracy = label_pool(teacher, algorithm, data, log)
        files.write_atomically(path, lambda f: np.savez(
            f, probabilities=probs, targets=targets, weights=weights,
            checkpoint=np.array(checkpoint), hidden_accuracy=np.array(accuracy)))
    if len(targets) != data.unlabeled_size:
        raise ConfigError(f'{path} labels {len(targets)} pool images, the pool has '
                          f'{data.unlabeled_size}: the teacher\'s data changed; use another '
                          '--train_dir')
    algorithm.with_targets(targets, weights)
    if algorithm.init == 'teacher':
        from ssl_ema.core import classifier
        net, _, _ = classifier.restore_backbone(teacher, classifier.classifier_info(teacher),
                                                algorithm.teacher_model)
        if len(net.weights) != len(trainer.student.weights):
            raise ConfigError(f'--init=teacher needs the teacher\'s architecture '
                              f'({teacher.config.arch}), not --arch={trainer.cfg.arch}; use '
                              '--init=fresh for another backbone')
        for model in (trainer.student, trainer.ema.model):
            model.set_weights(net.get_weights())
    return {'train_dir': os.path.abspath(teacher.train_dir), 'checkpoint': checkpoint,
            'fingerprint': fingerprint(teacher, checkpoint),
            'pseudo_label_accuracy': accuracy}


def distill(cfg: TrainConfig, algorithm, teacher_dir: str, log=print, explicit=(),
            train_dir=None) -> str:
    """Train (or resume) the round whose teacher is `teacher_dir`; returns its directory.
    `explicit`: names of the settings the user gave (a data or split setting that differs from
    the teacher's is refused); `train_dir`: where (default: default_train_dir)."""
    teacher = open_teacher(teacher_dir)
    cfg = student_config(cfg, teacher, explicit)
    if train_dir:
        cfg = dataclasses.replace(cfg, train_dir=train_dir)
    data = teacher.dataset(augment=cfg.augment)
    with open(teacher.path(run_dir.SPLIT)) as f:
        if json.load(f) != json.loads(json.dumps(data.split.as_dict())):
            raise ConfigError(f'--teacher_run={teacher_dir}: its split.json is not the split its '
                              'flags make here (another version or dataset files); retrain it')
    return one_run.train(cfg, algorithm, log=log, dataset=data, round_of=(
        functools.partial(default_train_dir, teacher.train_dir),
        functools.partial(prepare, teacher)))


def run_rounds(train_dir: str, cfg: TrainConfig, rounds, log=print, publish=True) -> str:
    """A recipe's self-training rounds after the run in train_dir: round k trains in
    train_dir/rounds/<k> (a run directory as any round's) from round k-1's classifier (round 0:
    the run itself), with the run's settings and the round's own (`rounds`: one dict each, of
    training flags and distill hyperparameters). When the last round has finished, train_dir's
    export/ becomes its classifier and train_dir's accuracy.json its summary (with the rounds
    listed, and the whole pipeline's CPU time), so the run directory's top level always says
    and holds one classifier: the run's own until its rounds are done, the last round's after.
    Every worker of a multi-worker run trains every round; `publish`: this one writes (the
    chief). Returns the last round's directory."""
    from ssl_ema.algorithms.distillation import ROUNDS as DISTILLERS
    config_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    teacher, done = train_dir, [('.', run_dir.read_summary(train_dir))]
    for k, settings in enumerate(rounds, 1):
        round_cfg = dataclasses.replace(
            cfg, train_dir=None, train_steps=0, train_kimg=cfg.self_training_kimg,
            **{n: v for n, v in settings.items() if n in config_fields})
        algorithm = DISTILLERS['distill'](**{n: v for n, v in settings.items()
                                             if n not in config_fields})
        log(f'self-training round {k} of {len(rounds)}, teacher {teacher}')
        teacher = distill(round_cfg, algorithm, teacher, log,
                          train_dir=os.path.join(train_dir, ROUNDS, str(k)))
        done.append((os.path.join(ROUNDS, str(k)), run_dir.read_summary(teacher)))
    if publish:
        _publish(train_dir, teacher, done)
    return teacher


def _publish(train_dir: str, last: str, done) -> None:
    """train_dir/export := the last round's export, then train_dir/accuracy.json := its summary,
    each written whole (files.write_*_atomically)."""
    import shutil

    def copy(out):
        for name in os.listdir(os.path.join(last, 'export')):
            source = os.path.join(last, 'export', name)
            (shutil.copytree if os.path.isdir(source) else shutil.copy2)(
                source, os.path.join(out, name))
    files.write_directory_atomically(os.path.join(train_dir, 'export'), copy)
    summary = dict(done[-1][1])
    summary['rounds'] = [{'train_dir': where, 'ema': {s: v['last'] for s, v in s_['ema'].items()},
                          'cpu_time_s': s_.get('cpu_time_s')} for where, s_ in done]
    summary['cpu_time_s'] = sum(s_.get('cpu_time_s') or 0. for _, s_ in done)
    run_dir.write_summary(train_dir, summary)
