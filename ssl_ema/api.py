"""The Python API: the same training as `python -m ssl_ema.train`, without flags.

    import ssl_ema
    run = ssl_ema.fit(data=ssl_ema.data.from_arrays(x, y, x_unlabeled=u), algorithm='fixmatch',
                      labels=250, train_kimg=64, train_dir='runs/fm250')
    run.classifier.predict(images)     # the EMA classifier: uint8 images -> probabilities
    run.summary, run.history           # accuracy.json and evaluations.jsonl as Python objects
    run = ssl_ema.open_run('runs/fm250')
    pretraining = ssl_ema.pretrain(data, method='byol', train_kimg=64)   # no labels used
    run = ssl_ema.fit(data, 'fixmatch', backbone=pretraining.arch, labels=250)

Every training flag is a keyword of `fit` (`--train_kimg=64` is `train_kimg=64`), and so is every
hyperparameter of the chosen algorithm (`confidence_threshold=0.9`). `fit` builds the same
TrainConfig as the command line and calls the same core/fitting.fit, so the same settings give
the same run (weights, directory, checkpoints, resume, lock, NaN guard, export). No absl flag is
read or parsed: settings come only from the arguments. Bad arguments raise the one-line
ConfigError or DataError that the command prints as `error: ...`.
"""
import dataclasses
import os
from typing import Optional, Union

from ssl_ema.base.config import TrainConfig
from ssl_ema.base.errors import ConfigError
from ssl_ema.core import classifier as classifier_lib
from ssl_ema.core import fitting, run_dir


@dataclasses.dataclass
class Run:
    """A run directory seen from Python: its settings, results and classifier."""
    train_dir: str
    backbone: object = None   # the keras.Model of a run trained on one from Python

    @property
    def config(self) -> TrainConfig:
        return run_dir.open_run_dir(self.train_dir).config

    @property
    def summary(self) -> Optional[dict]:
        """accuracy.json: last value and medians of the last 10 and 20 evaluations, per model and
        split (None before the first evaluation)."""
        return run_dir.read_summary(self.train_dir)

    @property
    def history(self) -> list:
        """evaluations.jsonl: one dict per evaluation (step, kimg, raw/ema/... accuracies)."""
        return run_dir.read_history(self.train_dir)

    def export(self, model: str = 'ema', checkpoint: Optional[str] = None,
               out: Optional[str] = None) -> str:
        """As `python -m ssl_ema.export`: the classifier of `model` (ema or raw) at `checkpoint`
        (default: the latest) written to `out` (default: DIR/export[_raw][_ckpt-N]); returns it."""
        return classifier_lib.export_run(self.train_dir, model, checkpoint, out, log=_quiet,
                                         backbone=self.backbone)

    @property
    def classifier(self) -> classifier_lib.Classifier:
        """The run's EMA classifier (DIR/export, exported first if the run has none yet):
        `.predict(uint8 images [N, H, W, C])` returns probabilities [N, K]; `.class_names`."""
        out = os.path.join(self.train_dir, 'export')
        if not os.path.isdir(out):
            self.export()
        return classifier_lib.load_classifier(out)


def _quiet(*args):
    pass


def _dataset_name(data) -> str:
    """`data` as --dataset takes it: a name, npz:PATH or folder:PATH (a path alone is enough)."""
    from ssl_ema.data.datasets import DATASETS
    if data in DATASETS or ':' in data:
        return data
    if os.path.isdir(data):
        return f'folder:{data}'
    if os.path.isfile(data) and data.endswith('.npz'):
        return f'npz:{data}'
    raise ConfigError(f'data={data!r} is not a dataset name ({", ".join(sorted(DATASETS))}), '
                      'an .npz file or a folder of class folders')


def fit(data: Union[str, object] = 'digits', algorithm: Optional[str] = None, backbone=None,
        log=print, **settings) -> Run:
    """Train (or resume) a classifier; returns its Run.

    data: a dataset name as --dataset takes it ('digits', 'cifar10', 'npz:PATH', ...), a path to
        an .npz file or an image folder, or arrays from `ssl_ema.data.from_arrays`.
    algorithm: as --algorithm (default: the recipe's, else mean_teacher).
    backbone: an architecture name as --arch (also keras:PATH.keras, keras_hub:PRESET), or a
        keras.Model (functional, Sequential, or subclassed with get_config; a copy is trained: a
        feature extractor gets pooling and a new head, a model that already returns the dataset's
        classes keeps its own; nn/custom_backbones.py).
    settings: any training flag (labels=250, train_kimg=64, train_dir=..., ...) or hyperparameter
        of the algorithm (consistency_weight=..., ...), by its flag's name.
    """
    from ssl_ema import algorithms
    if isinstance(backbone, str):
        settings['arch'] = backbone
        backbone = None
    # --recipe's defaults under the settings given, as ssl_ema.train applies them.
    explicit = set(settings) | ({'algorithm'} if algorithm else set())
    recipe, algorithm, defaults, hyperparameters = fitting.recipe_defaults(
        settings.get('recipe', TrainConfig.recipe),
        _dataset_name(data) if isinstance(data, str) else getattr(data, 'name', ''),
        algorithm or TrainConfig.algorithm, explicit, settings.get('precision'),
        settings.get('train_dir'))
    settings = {**defaults, **hyperparameters, **settings, 'recipe': recipe.name}
    cfg, hyperparameters, dataset = _configure(
        'fit', data, 'algorithm', algorithm, algorithms.ALGORITHMS, TrainConfig, settings,
        'ssl_ema.train', lambda c: c.augment)
    train_dir = fitting.fit(cfg, hyperparameters, log=log, backbone=backbone, dataset=dataset)
    return Run(train_dir, backbone)


def _configure(function, data, kind, name, registry, config_cls, settings, command, augment):
    """(config, hyperparameters, dataset built from arrays or None) for `function`(data,
    kind=name, **settings): each setting a field of `config_cls` or of the `registry[name]`
    dataclass, as the command's flags are; anything else one ConfigError line."""
    from ssl_ema import data as data_lib
    if name not in registry:
        raise ConfigError(f'{kind}={name} is unknown; valid: {", ".join(sorted(registry))}')
    hyperparameter_cls = registry[name]
    config_fields = {f.name for f in dataclasses.fields(config_cls)} - {kind, 'dataset'}
    own_fields = {f.name for f in dataclasses.fields(hyperparameter_cls)}
    unknown = sorted(set(settings) - config_fields - own_fields)
    if unknown:
        activity = 'training' if function == 'fit' else f'{function}ing'
        raise ConfigError(f'{function}({unknown[0]}=...) is not a {activity} setting nor a '
                          'hyperparameter '
                          f'of {name} (its own: {", ".join(sorted(own_fields)) or "none"}; '
                          f'`python -m {command} --helpfull` lists every setting)')
    arrays = None if isinstance(data, str) else data
    if arrays is not None and not isinstance(arrays, data_lib.Arrays):
        raise ConfigError(f'data={type(data).__name__}: give a dataset name, a path, or '
                          'ssl_ema.data.from_arrays(x, y, ...)')
    cfg = config_cls(**{kind: name}, dataset=_dataset_name(data) if arrays is None
                     else arrays.name, **{k: v for k, v in settings.items() if k in config_fields})
    hyperparameters = hyperparameter_cls(**{k: v for k, v in settings.items() if k in own_fields})
    dataset = None
    if arrays is not None:
        dataset = data_lib.build(arrays, cfg.labels, cfg.valid, cfg.seed, augment(cfg),
                                 input_norm=cfg.input_norm,
                                 protocol=data_lib.Protocol.of(cfg))
    return cfg, hyperparameters, dataset


@dataclasses.dataclass
class Pretraining:
    """A self-supervised pretraining run (`ssl_ema.pretrain`) seen from Python."""
    train_dir: str

    @property
    def backbone_file(self) -> str:
        """DIR/backbone.keras: the pretrained backbone (pixels -> pooled features)."""
        return os.path.join(self.train_dir, run_dir.BACKBONE)

    @property
    def arch(self) -> str:
        """'keras:DIR/backbone.keras', what `fit(backbone=...)` and --arch take."""
        return f'keras:{self.backbone_file}'

    @property
    def history(self) -> list:
        """evaluations.jsonl: k-NN accuracy of the student and the teacher per evaluation."""
        return run_dir.read_history(self.train_dir)


def pretrain(data: Union[str, object] = 'digits', method: str = 'byol', log=print,
             **settings) -> Pretraining:
    """Pretrain (or resume) a backbone on `data`'s images without their labels, as
    `python -m ssl_ema.pretrain`; returns its Pretraining (`.arch` fine-tunes it:
    `ssl_ema.fit(data, 'fixmatch', backbone=pretraining.arch)`).

    data: as `fit` takes it (a name, a path, or `ssl_ema.data.from_arrays(...)`; the labels of
        the labeled split serve the k-NN evaluation only).
    method: byol or dino, as --method.
    settings: any pretraining flag (arch='small_cnn', train_kimg=64, batch=128, train_dir=...)
        or hyperparameter of the method (teacher_momentum=0.99, ...), by its flag's name.
    """
    from ssl_ema.algorithms import pretraining as methods
    from ssl_ema.base.pretraining_config import PretrainConfig
    from ssl_ema.core import pretraining
    cfg, hyperparameters, dataset = _configure(
        'pretrain', data, 'method', method, methods.METHODS, PretrainConfig, settings,
        'ssl_ema.pretrain', lambda c: 'none')
    return Pretraining(pretraining.pretrain(cfg, hyperparameters, log=log, dataset=dataset))


def open_run(train_dir: str, backbone=None) -> Run:
    """A finished or interrupted run, from its directory (ConfigError if it holds none).
    `backbone`: the keras.Model a run from Python was trained on, to export it."""
    run_dir.open_run_dir(train_dir)
    return Run(train_dir, backbone)


def distill(run: Union[str, Run], log=print, **settings) -> Run:
    """A self-training round, as `python -m ssl_ema.distill --teacher_run=DIR`: the finished run
    `run` (a Run or its directory) labels the unlabeled pool once and a new student learns the
    labels and those pseudo-labels, on the teacher's dataset and split; returns the round's Run
    (by default in DIR/rounds/, core/distilling.py), itself a teacher for the next round.

    settings: any training flag for the student (arch='small_cnn', train_kimg=32, ...) and the
        round's own (pseudo_labels='hard', per_class=2000, student_view='weak', init='teacher',
        consistency_weight=..., temperature=..., teacher_model='raw'); the data and split
        settings are the teacher's and may only be given equal to them.
    """
    from ssl_ema.algorithms.distillation import ROUNDS
    from ssl_ema.core import distilling
    teacher = run.train_dir if isinstance(run, Run) else run
    config_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    own = {f.name for f in dataclasses.fields(ROUNDS['distill'])}
    unknown = sorted(set(settings) - config_fields - own)
    if unknown:
        raise ConfigError(f'distill({unknown[0]}=...) is not a training setting nor a setting of '
                          f'the round (its own: {", ".join(sorted(own))}; `python -m '
                          'ssl_ema.distill --helpfull` lists every setting)')
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k in config_fields})
    algorithm = ROUNDS['distill'](**{k: v for k, v in settings.items() if k in own})
    return Run(distilling.distill(cfg, algorithm, teacher, log=log, explicit=tuple(settings)))
