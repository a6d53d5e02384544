"""Classify images with an exported classifier, into a CSV file:

    python -m ssl_ema.predict --model=TRAIN_DIR/export --input=FOLDER|FILE.npz|GLOB \\
        --out=predictions.csv [--top_k=3] [--resize]

--model   an export directory (as ssl_ema.export and every finished run write: model.keras and
          export.json), a .keras file, or a SavedModel directory whose serving signature takes
          uint8 images [N, H, W, C] and returns probabilities.
--input   FOLDER: every image file (png, jpg, jpeg, bmp, gif) in it and its sub-folders, sorted;
          hidden and other files are ignored. FILE.npz: its array `x` (else `x_test`, `x_train`,
          or its only array), [N, H, W] or [N, H, W, C], uint8 0..255 or float 0..1. GLOB: the
          image files matching a pattern (quote it); one image file works too.
Images of another size than the model's are refused, naming the file and both sizes, unless
--resize (then scaled to cover the model's size, bilinear with antialiasing, and centre-cropped:
the aspect ratio is kept, as training reads images at --image_size, data/images.py).
Channels are converted: grey images are repeated to RGB for a colour model, colour images turned
grey (ITU-R 601 luma) for a grey one; alpha is dropped. A file that cannot be decoded is a
one-line error naming it. In every error case nothing is written.

The CSV has one row per image: file, class_id, class, probability, then class_2, probability_2,
... up to --top_k (the k most probable classes, most probable first). Class names come from the
export's export.json (the dataset's names, else the class ids). Progress goes to stderr.
"""
import csv
import dataclasses
import glob
import io
import os
import pathlib
import sys
from typing import Optional

import numpy as np

from ssl_ema import cli
from ssl_ema.base import files
from ssl_ema.base.errors import ConfigError, DataError, one_line
from ssl_ema.base.hparams import hparam
from ssl_ema.core.classifier import load_classifier
from ssl_ema.data.custom import IMAGE_SUFFIXES, _as_images, read_image
from ssl_ema.data.images import resize_array

NPZ_KEYS = ('x', 'x_test', 'x_train')   # the array of a .npz that is classified, first found


@dataclasses.dataclass
class PredictConfig:
    model: Optional[str] = hparam(None, 'The exported classifier: an export directory (e.g. '
                                  'TRAIN_DIR/export), a .keras file or a SavedModel directory.')
    input: Optional[str] = hparam(None, 'Images to classify: a folder (searched recursively), a '
                                  '.npz file (array x) or a quoted glob pattern.')
    out: str = hparam('predictions.csv', 'CSV file written: one row per image.')
    # 3: the example of the request for this command (issue 12); any value is valid.
    top_k: int = hparam(3, 'Most probable classes listed per image (at most the class count).')
    resize: bool = hparam(False, 'Resize images of another size to the model\'s (default: '
                          'refuse them, naming the file).')
    batch: int = hparam(256, 'Images per forward pass (our choice: small enough for 96x96 '
                        'colour images in a few hundred MB; predictions do not depend on it).')

    def __post_init__(self):
        for name in ('model', 'input', 'out'):
            if not getattr(self, name):
                raise ConfigError(f'--{name} is required (see --help)')
        for name in ('top_k', 'batch'):
            if getattr(self, name) < 1:
                raise ConfigError(f'--{name}={getattr(self, name)} must be a positive integer')


# ---- the images -----------------------------------------------------------------------------
def image_sources(spec: str):
    """(names, load) for --input: load(i) is image i as uint8 [H, W, C]."""
    p = pathlib.Path(spec).expanduser()
    if p.is_dir():
        found = sorted(f for f in p.rglob('*') if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith('.') for part in f.relative_to(p).parts))
        if not found:
            raise DataError(f'--input={spec} holds no image files '
                            f'({", ".join(sorted(IMAGE_SUFFIXES))})')
        return [str(f.relative_to(p)) for f in found], lambda i: _read(found[i], spec)
    if p.is_file() and p.suffix == '.npz':
        try:
            with np.load(p, allow_pickle=False) as f:
                keys = [k for k in NPZ_KEYS if k in f.files] or (f.files if len(f.files) == 1
                                                                 else [])
                if not keys:
                    raise DataError(f'--input={spec} has arrays {", ".join(f.files)}; expected one '
                                    f'named {", ".join(NPZ_KEYS)} (or a single array)')
                images = _as_images(f[keys[0]], f'--input={spec} {keys[0]}')
        except DataError:
            raise
        except Exception as e:
            raise DataError(f'--input={spec}: not a readable .npz ({one_line(e)})') from None
        return [f'{p.name}:{keys[0]}[{i}]' for i in range(len(images))], lambda i: images[i]
    matches = sorted(f for f in glob.glob(os.path.expanduser(spec), recursive=True)
                     if os.path.isfile(f))
    if not matches:
        raise DataError(f'--input={spec}: no such folder, .npz file or image file (a glob '
                        'pattern matched nothing)')
    return matches, lambda i: _read(matches[i], spec)


def _read(path, spec: str) -> np.ndarray:
    try:
        return read_image(path)
    except DataError as e:
        raise DataError(f'--input={spec}: {e}') from None


def fit(image: np.ndarray, shape, resize: bool, name: str) -> np.ndarray:
    """uint8 [H, W, C] -> the model's [h, w, c]: channels converted, size resized or refused."""
    import tensorflow as tf
    h, w, c = shape
    if image.shape[-1] != c:
        image = (np.repeat(image, c, -1) if image.shape[-1] == 1 else
                 np.round(tf.image.rgb_to_grayscale(image.astype(np.float32)).numpy()))
    if image.shape[:2] != (h, w):
        if not resize:
            raise DataError(f'{name} is {image.shape[1]}x{image.shape[0]} pixels but the model '
                            f'takes {w}x{h}: resize it, or pass --resize to let predict resize '
                            'every such image')
        image = resize_array(np.clip(np.round(image), 0, 255).astype(np.uint8), (h, w))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


class Progress:
    """`predict: 512/2000 images` on stderr: in place on a terminal, else every 10%."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream, self.shown = total, stream, -1
        self.tty = hasattr(stream, 'isatty') and stream.isatty()

    def __call__(self, done: int):
        tenth = 10 * done // self.total
        if self.tty or tenth > self.shown:
            end = '\n' if not self.tty or done == self.total else ''
            print(f'\rpredict: {done}/{self.total} images ({100 * done // self.total}%)',
                  end=end, file=self.stream, flush=True)
            self.shown = tenth


def predict(cfg: PredictConfig, log=print) -> int:
    """Classify --input into the CSV --out; returns the number of images."""
    if os.path.isdir(cfg.out):
        raise ConfigError(f'--out={cfg.out} is a directory; give a CSV file name')
    files.check_writable_dir(os.path.dirname(os.path.abspath(cfg.out)), 'out')
    names, load = image_sources(cfg.input)
    classifier = load_classifier(cfg.model)
    k = min(cfg.top_k, len(classifier.class_names))
    header = ['file', 'class_id', 'class', 'probability']
    header += [f'{column}_{r}' for r in range(2, k + 1) for column in ('class', 'probability')]
    table = io.StringIO(newline='')
    writer = csv.writer(table)
    writer.writerow(header)
    progress = Progress(len(names)) if len(names) > cfg.batch else (lambda done: None)
    for start in range(0, len(names), cfg.batch):
        batch = range(start, min(start + cfg.batch, len(names)))
        images = np.stack([fit(load(i), classifier.image_shape, cfg.resize, names[i])
                           for i in batch])
        probabilities = classifier.probabilities(images)
        for i, p in zip(batch, probabilities):
            top = np.argsort(-p, kind='stable')[:k]
            row = [names[i], int(top[0]), classifier.class_names[top[0]], f'{p[top[0]]:.6f}']
            for c in top[1:]:
                row += [classifier.class_names[c], f'{p[c]:.6f}']
            writer.writerow(row)
        progress(batch.stop)
    files.write_atomically(cfg.out, lambda f: f.write(table.getvalue()), 'w', newline='')
    log(f'{len(names)} images -> {cfg.out}')
    return len(names)


if __name__ == '__main__':
    cli.run(predict, PredictConfig)
