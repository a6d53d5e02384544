"""Accuracy of a run's raw student and EMA classifier, with their confusion matrices:

    python -m ssl_ema.evaluate --train_dir=DIR [--dataset=NAME] [--checkpoint=ckpt-N] [--out=PATH]

Without --dataset: the test part of the run's own dataset (for the checkpoint of the run's last
evaluation, the numbers of its accuracy.json `test`). With --dataset (any --dataset that
ssl_ema.train takes, e.g. npz:other.npz or folder:DIR): that dataset's test part, which must have
the run's image shape and class count; its images are standardised with the run's statistics,
as the exported classifier does. Both models are the classifiers ssl_ema.export writes (uint8
images in, normalisation inside), rebuilt from the checkpoint (default: the latest). An open-set
run (--known_classes) is evaluated on the test images of its known classes, numbered as it
trained (its closed-set accuracy).

Writes OUT.json (accuracies, image count, confusion matrices) and OUT.png (the two confusion
matrices: rows the true class, columns the predicted one). OUT defaults to
TRAIN_DIR/evaluation/<dataset>[_<checkpoint>]. The figure needs matplotlib (the `benchmark` extra).
"""
import dataclasses
import os
import re
import sys
from typing import Optional

import numpy as np

from ssl_ema import cli
from ssl_ema.base import files
from ssl_ema.base.errors import DataError
from ssl_ema.data.images import parse_size
from ssl_ema.base.hparams import hparam
from ssl_ema.core import accuracy, classifier
from ssl_ema.core.run_dir import open_run_dir

MODELS = {'raw': 'raw student', 'ema': 'EMA'}


@dataclasses.dataclass
class EvaluateConfig:
    train_dir: Optional[str] = hparam(None, 'Run directory of ssl_ema.train to evaluate.')
    dataset: Optional[str] = hparam(None, 'Dataset whose test part is classified (default: the '
                                    'run\'s own); same image shape and classes as the run\'s.')
    data_dir: Optional[str] = hparam(None, 'Where dataset files live (default: the run\'s '
                                     '--data_dir).')
    checkpoint: Optional[str] = hparam(None, 'Checkpoint to evaluate, e.g. ckpt-400 (in '
                                       'TRAIN_DIR/checkpoints) or a path prefix; default: the '
                                       'latest.')
    out: Optional[str] = hparam(None, 'Output path without extension: OUT.json and OUT.png. '
                                'Default: TRAIN_DIR/evaluation/<dataset>[_<checkpoint>].')


def predicted_classes(model, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf
    call = tf.function(lambda x: tf.argmax(model(x, training=False), axis=-1),
                       reduce_retracing=True)
    batch = accuracy.inference_batch(images.shape[1:])   # as the training loop's evaluation
    return np.concatenate([call(tf.constant(np.asarray(images[i:i + batch]))).numpy()   # files too
                           for i in range(0, len(images), batch)])


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """[true class, predicted class] -> image count."""
    return np.bincount(labels * num_classes + predicted,
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def plot_confusion(result: dict, names, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    k = len(names)
    size = min(12., 2.5 + 0.45 * k)
    figure, axes = plt.subplots(1, len(MODELS), figsize=(2 * size, size), squeeze=False)
    for ax, (model, label) in zip(axes.flat, MODELS.items()):
        counts = np.asarray(result[model]['confusion'])
        fractions = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(fractions, cmap='Blues', vmin=0, vmax=1)
        if k <= 20:   # beyond that, numbers and names no longer fit
            for (i, j), n in np.ndenumerate(counts):
                if n:
                    ax.text(j, i, n, ha='center', va='center', fontsize=7,
                            color='white' if fractions[i, j] > 0.5 else 'black')
            ax.set_xticks(range(k), names, rotation=90, fontsize=7)
            ax.set_yticks(range(k), names, fontsize=7)
        ax.set_xlabel('predicted class')
        ax.set_ylabel('true class')
        ax.set_title(f'{label}: {result[model]["accuracy"]:.2f}% of {result["images"]}')
    figure.suptitle(f'{result["dataset"]} test, {os.path.basename(result["checkpoint"])} of '
                    f'{result["train_dir"]}', fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    files.write_atomically(path, lambda f: figure.savefig(f, format='png', dpi=100,
                                                                bbox_inches='tight'))
    plt.close(figure)


def evaluate(cfg: EvaluateConfig, log=print) -> dict:
    """Accuracy and confusion matrix of both models; writes OUT.json and OUT.png."""
    from ssl_ema import data
    cli.require_matplotlib('ssl_ema.evaluate')
    run = open_run_dir(cfg.train_dir)
    info = classifier.classifier_info(run)
    dataset = cfg.dataset or run.config.dataset
    arrays = data.load(dataset, cfg.data_dir if cfg.data_dir is not None else run.config.data_dir,
                       image_size=parse_size(run.config.image_size))   # as the run read images
    if run.config.known_classes:   # an open-set run: its known classes, numbered as it trained
        from ssl_ema.data.splits import known_arrays, parse_classes
        arrays = known_arrays(arrays, parse_classes(run.config.known_classes, 'known_classes',
                                                    arrays.num_classes))
        known = np.flatnonzero(arrays.y_test < arrays.num_classes)
        arrays = dataclasses.replace(arrays, x_test=arrays.x_test[known],
                                     y_test=arrays.y_test[known])
    shape, classes = tuple(info['image_shape']), info['num_classes']
    if arrays.image_shape != shape or arrays.num_classes != classes:
        raise DataError(f'--dataset={dataset} has {arrays.num_classes} classes of '
                        f'{arrays.image_shape} images; the run classifies {classes} classes of '
                        f'{shape}')
    names = classifier.class_names(info)
    if arrays.class_names and list(arrays.class_names) != names:
        print(f'warning: --dataset={dataset} names its classes {list(arrays.class_names)}, the '
              f'run {names}: compared by class id', file=sys.stderr)
    if not len(arrays.y_test):
        raise DataError(f'--dataset={dataset} has no test images')
    path = run.checkpoint(cfg.checkpoint)
    out = cfg.out or os.path.join(cfg.train_dir, 'evaluation', re.sub(
        r'[^\w.-]+', '_', os.path.basename(dataset.rstrip('/'))) + (
        f'_{os.path.basename(path)}' if cfg.checkpoint else ''))
    files.check_writable_dir(os.path.dirname(os.path.abspath(out)), 'out')
    result = {'train_dir': cfg.train_dir, 'dataset': dataset, 'split': 'test',
              'checkpoint': path, 'images': len(arrays.y_test), 'class_names': names}
    for model in MODELS:
        backbone, _, result['step'] = classifier.restore_backbone(run, info, model, path)
        predicted = predicted_classes(classifier.classifier(backbone, info), arrays.x_test)
        correct = int((predicted == arrays.y_test).sum())   # as core/accuracy.accuracy counts
        result[model] = {'accuracy': 100. * correct / len(arrays.y_test),
                         'confusion': confusion_matrix(arrays.y_test, predicted,
                                                       info['num_classes']).tolist()}
    files.write_json(out + '.json', result)
    plot_confusion(result, names, out + '.png')
    log(f'{dataset} test ({result["images"]} images), step {result["step"]}: '
        + ', '.join(f'{label} {result[m]["accuracy"]:.2f}%' for m, label in MODELS.items())
        + f' -> {out}.json, {out}.png')
    return result


if __name__ == '__main__':
    cli.run(evaluate, EvaluateConfig)
