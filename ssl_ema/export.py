"""Export a run's classifier, to be used without this package:

    python -m ssl_ema.export --train_dir=DIR [--model=ema|raw] [--checkpoint=ckpt-N] [--out=PATH]

The exported classifier takes uint8 images [N, H, W, C] in 0..255 (the dataset's shape),
standardises them inside with the run's per-channel mean and standard deviation (those of the
dataset's training images, as in training), runs the backbone in inference mode and returns class
probabilities [N, K] (softmax). OUT holds:

  model.keras    Keras 3 (`keras.saving.load_model`); stock Keras layers only, float32.
  saved_model/   TensorFlow SavedModel (`tf.saved_model.load`); signature `serving_default`
                 (and the function `serve`): images (uint8) -> {'probabilities': float32}.
  export.json    class names, image shape, normalisation, and which run, checkpoint and model.

Every run that ssl_ema.train finishes exports its EMA classifier to DIR/export/ this way.
The weights come from a checkpoint: `ema` is the Trainer's `teacher` (the EMA of the weights,
batch-norm statistics as the run's --ema_bn: averaged, the student's, or, for `recompute`,
re-estimated for the EMA weights over the same training batches as the Trainer's evaluations,
see ema.py), `raw` the `student`.
"""
import dataclasses
import json
import os
from typing import Optional

import numpy as np
from absl import app

from ssl_ema import cli
from ssl_ema.base import files, config as config_lib
from ssl_ema.base.errors import ConfigError, one_line
from ssl_ema.base.config import hparam

CLASSIFIER_INFO = 'classifier.json'   # in the run directory, written by ssl_ema.train
EXPORT_INFO, KERAS_FILE, SAVED_MODEL = 'export.json', 'model.keras', 'saved_model'


@dataclasses.dataclass
class ExportConfig:
    train_dir: Optional[str] = hparam(None, 'Run directory of ssl_ema.train to export.')
    model: str = hparam('ema', 'Which weights: ema (the EMA classifier) or raw (the student\'s '
                        'own weights).')
    checkpoint: Optional[str] = hparam(None, 'Checkpoint to export, e.g. ckpt-400 (in '
                                       'TRAIN_DIR/checkpoints) or a path prefix; default: the '
                                       'latest.')
    out: Optional[str] = hparam(None, 'Export directory. Default: TRAIN_DIR/export for '
                                '--model=ema, TRAIN_DIR/export_raw for raw, with _<checkpoint> '
                                'appended when --checkpoint is given.')

    def __post_init__(self):
        if self.model not in cli.CHECKPOINT_KEYS:
            raise ConfigError(f'--model={self.model} is unknown; valid: '
                              f'{", ".join(cli.CHECKPOINT_KEYS)}')


# ---- what a classifier needs besides its weights ------------------------------------------
def describe(data) -> dict:
    """The run's classifier.json from its SSLData: input shape, classes, normalisation."""
    names = data.arrays.class_names
    return {'image_shape': [int(d) for d in data.image_shape], 'num_classes': data.num_classes,
            'class_names': list(names) if names else None,
            'mean': data.mean.tolist(), 'std': data.std.tolist()}


def write_classifier_info(train_dir: str, data) -> None:
    files.write_json(os.path.join(train_dir, CLASSIFIER_INFO), describe(data))


def classifier_info(run: cli.Run) -> dict:
    """DIR/classifier.json, or, for a run made before it existed, rebuilt from its dataset."""
    path = os.path.join(run.train_dir, CLASSIFIER_INFO)
    if not os.path.exists(path):
        return describe(run.dataset(augment='none'))
    try:
        with open(path) as f:
            info = json.load(f)
        if len(info['mean']) != info['image_shape'][-1] or len(info['std']) != len(info['mean']):
            raise ValueError('mean and std need one value per channel')
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ConfigError(f'{path} is damaged ({one_line(e)}); delete it to rebuild it from the '
                          'dataset') from None
    return info


def class_names(info: dict) -> list:
    """The names of classes 0..K-1: the dataset's, else the class ids."""
    return list(info.get('class_names') or map(str, range(info['num_classes'])))


# ---- the classifier -------------------------------------------------------------------------
def restore_backbone(run: cli.Run, info: dict, model: str = 'ema',
                     checkpoint: Optional[str] = None):
    """(backbone with the checkpoint's `model` weights, checkpoint path, its step)."""
    import tensorflow as tf
    from ssl_ema.nn import backbones
    path = run.checkpoint(checkpoint)
    c = run.config
    arch = c.arch
    # The Trainer's architecture flags (as trainer.py builds the student), but stock float32
    # Keras layers whatever precision the run trained with: the file loads without ssl_ema.
    net = backbones.build(arch, tuple(info['image_shape']), info['num_classes'],
                          conv_bias=c.wrn_conv_bias, portable=True)
    key = cli.CHECKPOINT_KEYS[model]
    try:   # the Trainer checkpoints each model as the list of its variables
        status = tf.train.Checkpoint(**{key: list(net.variables)}).restore(path)
        status.assert_existing_objects_matched()
        status.expect_partial()   # the optimizer, the other model, the RNG: not needed here
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise ConfigError(f'{path} does not hold the {model} weights of a {arch} for '
                          f'{info["image_shape"]} images and {info["num_classes"]} classes '
                          f'({one_line(e)})') from None
    try:
        step = int(tf.train.load_variable(path, 'step/.ATTRIBUTES/VARIABLE_VALUE'))
    except (ValueError, tf.errors.OpError):
        step = None
    if model != 'raw' and c.ema_bn == 'recompute':   # as the Trainer evaluates the average
        from ssl_ema.core.ema import recompute_statistics
        recompute_statistics(net, run.statistics_batches())
    return net, path, step


def classifier(backbone, info: dict):
    """uint8 images -> the run's standardisation -> backbone (inference) -> probabilities."""
    import keras
    images = keras.Input(tuple(info['image_shape']), dtype='uint8', name='images')
    std = np.asarray(info['std'], np.float32)
    # (x - mean) / sqrt(std^2): the same float32 values as SSLData.normalize's (x - mean) / std.
    x = keras.layers.Normalization(mean=info['mean'], variance=np.square(std).tolist(),
                                   dtype='float32', name='standardize')(images)
    probabilities = keras.layers.Softmax(dtype='float32', name='probabilities')(backbone(x))
    return keras.Model(images, probabilities, name=f'{backbone.name}_classifier')


def save(model, out: str, meta: dict) -> None:
    """OUT/model.keras, OUT/saved_model/ and OUT/export.json, all written or none."""
    import keras
    import tensorflow as tf

    def write(directory):
        model.save(os.path.join(directory, KERAS_FILE))
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            'serve', lambda images: {'probabilities': model(images, training=False)},
            input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.uint8, 'images')])
        archive.write_out(os.path.join(directory, SAVED_MODEL), verbose=False)
        files.write_json(os.path.join(directory, EXPORT_INFO), meta)
    files.write_directory_atomically(out, write)


def default_out(train_dir: str, model: str, checkpoint: Optional[str] = None) -> str:
    name = 'export' + ('' if model == 'ema' else f'_{model}')
    if checkpoint:
        name += '_' + os.path.basename(checkpoint)
    return os.path.join(train_dir, name)


def _check_out(out: str) -> None:
    """An existing --out is replaced only if it is an export (never a user's other files)."""
    if os.path.exists(out) and not os.path.exists(os.path.join(out, EXPORT_INFO)):
        raise ConfigError(f'--out={out} exists and is not an export (no {EXPORT_INFO}); give a '
                          'new directory, or an earlier export to replace')
    files.check_writable_dir(out, 'out')


def _exported(out: str):
    """(model, checkpoint) of the export in `out`, None if there is none or it is damaged."""
    try:
        with open(os.path.join(out, EXPORT_INFO)) as f:
            done = json.load(f)
        return done['model'], done['checkpoint']
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_run(train_dir: str, model: str = 'ema', checkpoint: Optional[str] = None,
               out: Optional[str] = None, log=print, skip_if_current: bool = False) -> str:
    """Export a run's `model` classifier from `checkpoint` (default: the latest); returns OUT.
    `skip_if_current`: leave OUT alone if it already holds this model of this checkpoint."""
    run = cli.open_run(train_dir)
    ExportConfig(train_dir, model, checkpoint, out)   # validates --model
    out = out or default_out(train_dir, model, checkpoint)
    _check_out(out)
    if skip_if_current and _exported(out) == (model, os.path.basename(run.checkpoint(checkpoint))):
        return out
    info = classifier_info(run)
    backbone, path, step = restore_backbone(run, info, model, checkpoint)
    c = run.config
    meta = {'model': model, 'checkpoint': os.path.basename(path), 'step': step,
            'train_dir': os.path.abspath(train_dir), 'dataset': c.dataset, 'arch': c.arch,
            'algorithm': c.algorithm, 'image_shape': info['image_shape'],
            'num_classes': info['num_classes'], 'class_names': class_names(info),
            'mean': info['mean'], 'std': info['std'],
            'input': 'uint8 images [N, H, W, C], 0..255; standardised inside the model',
            'output': 'class probabilities [N, num_classes] (softmax)',
            'files': {'keras': KERAS_FILE, 'saved_model': f'{SAVED_MODEL}/ (signature '
                      'serving_default: images -> probabilities)'}}
    save(classifier(backbone, info), out, meta)
    log(f'exported the {model} classifier of {path} (step {step}) -> {out}/ '
        f'({KERAS_FILE}, {SAVED_MODEL}/, {EXPORT_INFO})')
    return out


def main():
    cfg = config_lib.from_flags(ExportConfig)
    export_run(cfg.train_dir, cfg.model, cfg.checkpoint, cfg.out)


if __name__ == '__main__':
    cli.define_flags(ExportConfig, __name__)
    app.run(cli.main(main))
