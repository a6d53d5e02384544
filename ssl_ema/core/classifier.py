"""The exported classifier: what it needs besides its weights, how it is rebuilt from a checkpoint,
and how it is written, to be used without this package.

The exported classifier takes uint8 images [N, H, W, C] in 0..255 (the dataset's shape),
standardises them inside with the run's per-channel mean and standard deviation (those of the
dataset's training images, as in training), runs the backbone in inference mode and returns class
probabilities [N, K] (softmax). An export directory holds:

  model.keras    Keras 3 (`keras.saving.load_model`); stock Keras layers only, float32.
  saved_model/   TensorFlow SavedModel (`tf.saved_model.load`); signature `serving_default`
                 (and the function `serve`): images (uint8) -> {'probabilities': float32}.
  export.json    class names, image shape, normalisation, and which run, checkpoint and model.

Every finished run exports its EMA classifier to DIR/export/ this way (`python -m ssl_ema.export`
exports any other checkpoint or the raw student). The weights come from a checkpoint: `ema` is the
Trainer's `teacher` (the EMA of the weights, batch-norm statistics as the run's --ema_bn:
averaged, the student's, or, for `recompute`, re-estimated for the EMA weights over the same
training batches as the Trainer's evaluations, see core/ema.py), `raw` the `student`.
"""
import dataclasses
import json
import os
import pathlib
from typing import Callable, List, Optional

import numpy as np

from ssl_ema.base import files
from ssl_ema.base.errors import ConfigError, one_line
from ssl_ema.core import run_dir
from ssl_ema.core.run_dir import CHECKPOINT_KEYS, RunDir, open_run_dir

EXPORT_INFO, KERAS_FILE, SAVED_MODEL = 'export.json', 'model.keras', 'saved_model'


def check_model(model: str) -> None:
    if model not in CHECKPOINT_KEYS:
        raise ConfigError(f'--model={model} is unknown; valid: {", ".join(CHECKPOINT_KEYS)}')


# ---- what a classifier needs besides its weights ------------------------------------------
def describe(data) -> dict:
    """The run's classifier.json from its SSLData: input shape, classes, normalisation."""
    names = data.arrays.class_names
    return {'image_shape': [int(d) for d in data.image_shape], 'num_classes': data.num_classes,
            'class_names': list(names) if names else None,
            'mean': data.mean.tolist(), 'std': data.std.tolist()}


def write_classifier_info(train_dir: str, data) -> None:
    files.write_json(os.path.join(train_dir, run_dir.CLASSIFIER), describe(data))


def classifier_info(run: RunDir) -> dict:
    """DIR/classifier.json, or, for a run made before it existed, rebuilt from its dataset."""
    path = run.path(run_dir.CLASSIFIER)
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
def open_set_heads(run: RunDir):
    """(heads, name of the unknown-score head) of the run's algorithm if it is an open-set one
    (algorithms/base.Algorithm.unknown_head: OpenMatch, IOMatch), else None."""
    from ssl_ema.algorithms import ALGORITHMS
    algorithm = ALGORITHMS.get(run.config.algorithm)
    if algorithm is None or not getattr(algorithm, 'unknown_head', None):
        return None
    return algorithm.heads, algorithm.unknown_head


def restore_backbone(run: RunDir, info: dict, model: str = 'ema',
                     checkpoint: Optional[str] = None, backbone=None, unknown: bool = False):
    """(backbone with the checkpoint's `model` weights, checkpoint path, its step). `backbone`:
    the keras.Model a run from Python was given (its architecture; the weights come from the
    checkpoint). `unknown`, for a run of an open-set algorithm: instead of the backbone, the
    model of [logits, unknown score] with that model's heads (the EMA's averaged heads or the
    student's; nn/heads.scoring_model)."""
    import tensorflow as tf
    from ssl_ema.nn import backbones
    path = run.checkpoint(checkpoint)
    c = run.config
    arch = c.arch
    if arch.startswith('model:') and backbone is None:
        raise ConfigError(f'--train_dir={run.train_dir} was trained on a keras.Model given from '
                          f'Python ({arch}); open it from Python with that model: '
                          'ssl_ema.open_run(DIR, backbone=model)')
    # The Trainer's architecture flags (as core/loop.py builds the student), but stock float32
    # Keras layers whatever precision the run trained with: the file loads without ssl_ema.
    net = backbones.for_run(c, tuple(info['image_shape']), info['num_classes'],
                            (info['mean'], info['std']), portable=True, model=backbone)
    key = CHECKPOINT_KEYS[model]
    objects = {key: list(net.variables)}
    open_set = open_set_heads(run) if unknown else None
    if open_set:   # the heads, as the Trainer checkpoints them (core/loop.py)
        from ssl_ema.nn.heads import scoring_model, with_heads
        heads_model = with_heads(net, open_set[0])
        own = {id(v) for v in net.weights}
        head_variables = [v for v in heads_model.weights if id(v) not in own]
        objects.update({'heads': head_variables} if model == 'raw' else
                       {run_dir.AVERAGE_HEADS: {model: head_variables}})
    try:   # the Trainer checkpoints each model as the list of its variables
        status = tf.train.Checkpoint(**objects).restore(path)
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
    if open_set:
        net = scoring_model(heads_model, *open_set)
    return net, path, step


def classifier(backbone, info: dict):
    """uint8 images -> the run's standardisation -> backbone (inference) -> probabilities; a
    backbone of [logits, unknown score] (an open-set run's, restore_backbone) gives
    [probabilities, unknown score]."""
    import keras
    images = keras.Input(tuple(info['image_shape']), dtype='uint8', name='images')
    std = np.asarray(info['std'], np.float32)
    # (x - mean) / sqrt(std^2): the same float32 values as SSLData.normalize's (x - mean) / std.
    x = keras.layers.Normalization(mean=info['mean'], variance=np.square(std).tolist(),
                                   dtype='float32', name='standardize')(images)
    out = backbone(x)
    logits, unknown = out if isinstance(out, (list, tuple)) else (out, None)
    probabilities = keras.layers.Softmax(dtype='float32', name='probabilities')(logits)
    outputs = probabilities if unknown is None else [probabilities, unknown]
    return keras.Model(images, outputs, name=f'{backbone.name}_classifier')


def save(model, out: str, meta: dict) -> None:
    """OUT/model.keras, OUT/saved_model/ and OUT/export.json, all written or none."""
    import keras
    import tensorflow as tf

    def write(directory):
        model.save(os.path.join(directory, KERAS_FILE))
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            'serve', lambda images: named_outputs(model(images, training=False)),
            input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.uint8, 'images')])
        archive.write_out(os.path.join(directory, SAVED_MODEL), verbose=False)
        files.write_json(os.path.join(directory, EXPORT_INFO), meta)
    files.write_directory_atomically(out, write)


def named_outputs(out) -> dict:
    """The serving signature's outputs: {'probabilities'} and, for an open-set run's export,
    'unknown' (the unknown score of each image, in [0, 1])."""
    if isinstance(out, (list, tuple)):
        return {'probabilities': out[0], 'unknown': out[1]}
    return {'probabilities': out}


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
               out: Optional[str] = None, log=print, skip_if_current: bool = False,
               backbone=None) -> str:
    """Export a run's `model` classifier from `checkpoint` (default: the latest); returns OUT.
    `skip_if_current`: leave OUT alone if it already holds this model of this checkpoint;
    `backbone`: the keras.Model of a run trained from Python on one (restore_backbone)."""
    run = open_run_dir(train_dir)
    check_model(model)
    out = out or default_out(train_dir, model, checkpoint)
    _check_out(out)
    if skip_if_current and _exported(out) == (model, os.path.basename(run.checkpoint(checkpoint))):
        return out
    info = classifier_info(run)
    net, path, step = restore_backbone(run, info, model, checkpoint, backbone, unknown=True)
    c = run.config
    open_set = open_set_heads(run) is not None
    meta = {'model': model, 'checkpoint': os.path.basename(path), 'step': step,
            'train_dir': os.path.abspath(train_dir), 'dataset': c.dataset, 'arch': c.arch,
            'algorithm': c.algorithm, 'image_shape': info['image_shape'],
            'num_classes': info['num_classes'], 'class_names': class_names(info),
            'mean': info['mean'], 'std': info['std'],
            'input': 'uint8 images [N, H, W, C], 0..255; standardised inside the model',
            'output': 'class probabilities [N, num_classes] (softmax)' + (
                ', and the unknown score [N] in [0, 1] of the open-set head (above 0.5: an '
                'image of no known class)' if open_set else ''),
            'files': {'keras': KERAS_FILE, 'saved_model': f'{SAVED_MODEL}/ (signature '
                      'serving_default: images -> probabilities' + (
                          ', unknown)' if open_set else ')')}}
    save(classifier(net, info), out, meta)
    log(f'exported the {model} classifier of {path} (step {step}) -> {out}/ '
        f'({KERAS_FILE}, {SAVED_MODEL}/, {EXPORT_INFO})')
    return out


# ---- loading an export ----------------------------------------------------------------------
@dataclasses.dataclass
class Classifier:
    """An exported classifier: `predict(images)` takes uint8 [N, H, W, C] images of
    `image_shape` and returns class probabilities [N, K] (numpy); an open-set run's export
    (`open_set`) also gives each image's unknown score in [0, 1], `unknown(images)` [N], both
    at once from `outputs(images)`."""
    outputs: Callable   # uint8 [N, H, W, C] -> (float [N, K], float [N] or None)
    image_shape: tuple
    class_names: List[str]
    open_set: bool = False

    def probabilities(self, images) -> np.ndarray:
        return self.outputs(images)[0]

    def predict(self, images) -> np.ndarray:
        return self.probabilities(np.asarray(images))

    def unknown(self, images) -> np.ndarray:
        """The unknown score [N] of each image (above 0.5: of no known class); ConfigError for
        a closed-set classifier, which has none."""
        if not self.open_set:
            raise ConfigError('this classifier has no unknown score: only the exports of an '
                              'open-set algorithm (openmatch, iomatch) give one')
        return self.outputs(np.asarray(images))[1]


def load_classifier(path: str) -> Classifier:
    """An export directory, a .keras file or a SavedModel directory; ConfigError naming --model."""
    import tensorflow as tf
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f'--model={path}: no such file or directory; give an export directory '
                          '(e.g. TRAIN_DIR/export), a .keras file or a SavedModel directory')
    if (p / KERAS_FILE).is_file():
        p = p / KERAS_FILE
    meta_path = p.parent / EXPORT_INFO   # beside model.keras and saved_model/
    try:
        if p.is_file() and p.suffix == '.keras':
            import keras
            model = keras.saving.load_model(p, compile=False)
            shape = tuple(model.input_shape[1:])
            open_set = isinstance(model.output_shape, list)
            classes = (model.output_shape[0] if open_set else model.output_shape)[-1]
            call = tf.function(lambda x: named_outputs(model(x, training=False)),
                               reduce_retracing=True)
        elif (p / 'saved_model.pb').is_file():
            signature = tf.saved_model.load(str(p)).signatures['serving_default']
            (name, spec), = signature.structured_input_signature[1].items()
            outputs = signature.structured_outputs
            key = 'probabilities' if 'probabilities' in outputs else next(iter(outputs))
            if spec.dtype != tf.uint8 or spec.shape.rank != 4:
                raise ValueError(f'its signature takes {spec.dtype.name} {spec.shape}, not uint8 '
                                 '[N, H, W, C] images')
            shape, classes = tuple(spec.shape[1:]), outputs[key].shape[-1]
            open_set = 'unknown' in outputs

            def call(x):
                out = signature(**{name: x})
                return {'probabilities': out[key], 'unknown': out.get('unknown')}
        else:
            raise ConfigError(f'--model={path} is not an export directory, a .keras file or a '
                              'SavedModel directory (e.g. TRAIN_DIR/export)')
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f'--model={path} cannot be loaded ({one_line(e)})') from None
    names = [str(c) for c in range(classes)]
    if meta_path.is_file():
        try:
            with open(meta_path) as f:
                names = class_names(json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f'{meta_path} is damaged ({one_line(e)})') from None

    def outputs(x):
        out = call(tf.constant(x))
        unknown = out.get('unknown')
        return (np.asarray(out['probabilities']),
                None if unknown is None else np.asarray(unknown))
    return Classifier(outputs, shape, names, open_set)
