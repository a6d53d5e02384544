"""The Python API: the same training as `python -m ssl_ema.train`, without flags.

    import ssl_ema
    run = ssl_ema.fit(data=ssl_ema.data.from_arrays(x, y, x_unlabeled=u), algorithm='fixmatch',
                      labels=250, train_kimg=64, train_dir='runs/fm250')
    run.classifier.predict(images)     # the EMA classifier: uint8 images -> probabilities
    run.summary, run.history           # accuracy.json and evaluations.jsonl as Python objects
    run = ssl_ema.open_run('runs/fm250')

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


def fit(data: Union[str, object] = 'digits', algorithm: str = 'mean_teacher', backbone=None,
        log=print, **settings) -> Run:
    """Train (or resume) a classifier; returns its Run.

    data: a dataset name as --dataset takes it ('digits', 'cifar10', 'npz:PATH', ...), a path to
        an .npz file or an image folder, or arrays from `ssl_ema.data.from_arrays`.
    algorithm: as --algorithm.
    backbone: an architecture name as --arch, or a keras.Model (functional, sequential, or
        subclassed and clonable; a feature extractor gets pooling and a head, a model that
        already returns the dataset's classes is used as it is: nn/backbones.from_model).
    settings: any training flag (labels=250, train_kimg=64, train_dir=..., ...) or hyperparameter
        of the algorithm (consistency_weight=..., ...), by its flag's name.
    """
    from ssl_ema import algorithms, data as data_lib
    if algorithm not in algorithms.ALGORITHMS:
        raise ConfigError(f'algorithm={algorithm} is unknown; valid: '
                          f'{", ".join(sorted(algorithms.ALGORITHMS))}')
    algorithm_cls = algorithms.ALGORITHMS[algorithm]
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {'algorithm', 'dataset'}
    own_fields = {f.name for f in dataclasses.fields(algorithm_cls)}
    unknown = sorted(set(settings) - train_fields - own_fields)
    if unknown:
        raise ConfigError(f'fit({unknown[0]}=...) is not a training setting nor a hyperparameter '
                          f'of {algorithm} (its own: {", ".join(sorted(own_fields)) or "none"}; '
                          '`python -m ssl_ema.train --helpfull` lists every setting)')
    if isinstance(backbone, str):
        settings['arch'] = backbone
        backbone = None
    arrays = None if isinstance(data, str) else data
    if arrays is not None and not isinstance(arrays, data_lib.Arrays):
        raise ConfigError(f'data={type(data).__name__}: give a dataset name, a path, or '
                          'ssl_ema.data.from_arrays(x, y, ...)')
    cfg = TrainConfig(algorithm=algorithm, dataset=_dataset_name(data) if arrays is None
                      else arrays.name, **{k: v for k, v in settings.items() if k in train_fields})
    hyperparameters = algorithm_cls(**{k: v for k, v in settings.items() if k in own_fields})
    dataset = None
    if arrays is not None:
        dataset = data_lib.build(arrays, cfg.labels, cfg.valid, cfg.seed, cfg.augment,
                                 input_norm=cfg.input_norm)
    train_dir = fitting.fit(cfg, hyperparameters, log=log, backbone=backbone, dataset=dataset)
    return Run(train_dir, backbone)


def open_run(train_dir: str, backbone=None) -> Run:
    """A finished or interrupted run, from its directory (ConfigError if it holds none).
    `backbone`: the keras.Model a run from Python was trained on, to export it."""
    run_dir.open_run_dir(train_dir)
    return Run(train_dir, backbone)
