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
grey (ITU-R 601 luma) for a grey one; alpha is dropped. Image files are read and decoded in
parallel by tf.data, as training reads a folder (data/files.py), a few batches in memory at a time.

The CSV has one row per image: file, class_id, class, probability, then class_2, probability_2,
... up to --top_k (the k most probable classes, most probable first), and for the export of an
open-set algorithm (openmatch, iomatch) a last column `unknown`: the image's unknown score in
[0, 1] (above 0.5: of no known class). Class names come from the
export's export.json (the dataset's names, else the class ids). It is written as it goes to a
temporary file beside --out, renamed to --out at the end: a failed or interrupted run leaves --out
as it was, never half-written (in every error case nothing is written). A file that cannot be
read or decoded (empty, truncated, corrupt, no permission) is skipped: a warning names it on
stderr, and it is listed with its reason in OUT.skipped.csv (file, reason; e.g.
predictions.skipped.csv), written only when a file was skipped. Exit status: 0 every image
classified, 2 the others classified but some files skipped, 1 an error, 130 interrupted.
Progress goes to stderr.
"""
import csv
import dataclasses
import glob
import os
import pathlib
import sys
from typing import List, Optional, Tuple

import numpy as np

from ssl_ema import cli
from ssl_ema.base import files
from ssl_ema.base.errors import ConfigError, DataError, one_line
from ssl_ema.base.hparams import hparam
from ssl_ema.core.classifier import load_classifier
from ssl_ema.data.custom import IMAGE_SUFFIXES, _as_images, unreadable
from ssl_ema.data.images import to_shape

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
    """(names, pixels) for --input: `pixels` is the image files' paths (a folder or a glob) or a
    .npz's uint8 images [N, H, W, C]."""
    p = pathlib.Path(spec).expanduser()
    if p.is_dir():
        found = sorted(_image_files(str(p), spec))
        if not found:
            raise DataError(f'--input={spec} holds no image files '
                            f'({", ".join(sorted(IMAGE_SUFFIXES))})')
        return ['/'.join(parts) for parts in found], [os.path.join(p, *parts) for parts in found]
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
        return [f'{p.name}:{keys[0]}[{i}]' for i in range(len(images))], images
    matches = sorted(f for f in glob.glob(os.path.expanduser(spec), recursive=True)
                     if os.path.isfile(f))
    if not matches:
        raise DataError(f'--input={spec}: no such folder, .npz file or image file (a glob '
                        'pattern matched nothing)')
    return matches, matches


def _image_files(folder: str, spec: str, parts=()):
    """The image files under `folder` as tuples of path parts: hidden files and folders skipped,
    symbolic links to files kept, to folders not followed, a sub-folder that cannot be listed
    skipped with a warning (as pathlib's rglob, which skipped it silently). One scandir per
    folder, no stat per file: a million files list in seconds."""
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        if not parts:
            raise DataError(f'--input={spec} cannot be listed: {e.strerror}') from None
        print(f'warning: --input={spec}: skipped {"/".join(parts)}/, which cannot be listed '
              f'({e.strerror})', file=sys.stderr)
        return
    for entry in entries:
        if entry.name.startswith('.'):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _image_files(entry.path, spec, (*parts, entry.name))
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
            yield (*parts, entry.name)


def _refuse_size(name: str, size, shape):
    return DataError(f'{name} is {size[1]}x{size[0]} pixels but the model takes {shape[1]}x'
                     f'{shape[0]}: resize it, or pass --resize to let predict resize every such '
                     'image')


def fit(image: np.ndarray, shape, resize: bool, name: str) -> np.ndarray:
    """uint8 [(N,) H, W, C] of one size -> the model's [(N,) h, w, c]: channels converted, size
    resized or refused (naming `name`), as for image files (images.to_shape)."""
    if tuple(image.shape[-3:-1]) != tuple(shape[:2]) and not resize:
        raise _refuse_size(name, image.shape[-3:-1], shape)
    return np.asarray(to_shape(image, shape, resize))


def batches(names, pixels, shape, resize: bool, batch: int):
    """(inputs done, names, uint8 images of the model's shape, skipped [(name, path)]) per
    `batch` images, in order: image files decoded in parallel in tf.data (data/files.py), a file
    that cannot be read or decoded skipped; a .npz's images converted a batch at a time."""
    if isinstance(pixels, np.ndarray):
        for start in range(0, len(names), batch):
            yield (min(start + batch, len(names)), names[start:start + batch],
                   fit(pixels[start:start + batch], shape, resize, names[start]), [])
        return
    from ssl_ema.data.files import for_model   # TensorFlow: not for --help
    done = 0   # inputs before this batch's first image: those not yet yielded were skipped
    for indices, images, sizes in for_model(pixels, shape, resize, batch):
        indices, sizes = indices.numpy(), sizes.numpy()
        if not resize:
            wrong = np.flatnonzero(np.any(sizes != shape[:2], axis=1))
            if len(wrong):
                raise _refuse_size(names[indices[wrong[0]]], sizes[wrong[0]], shape)
        missing = np.setdiff1d(np.arange(done, indices[-1] + 1), indices)
        done = indices[-1] + 1
        yield (done, [names[i] for i in indices], images.numpy(),
               [(names[i], pixels[i]) for i in missing])
    if done < len(names):   # the last files
        yield len(names), [], np.zeros((0, *shape), np.uint8), [
            (names[i], pixels[i]) for i in range(done, len(names))]


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


def skipped_path(out: str) -> str:
    """predictions.csv -> predictions.skipped.csv: the files that could not be classified."""
    stem, suffix = os.path.splitext(out)
    return f'{stem}.skipped{suffix or ".csv"}'


@dataclasses.dataclass
class Predictions:
    """What predict did: `images` rows written to `out`, `skipped` [(name, reason)] files that
    could not be read (listed in skipped_path(out)); exit status 2 when any were."""
    images: int
    skipped: List[Tuple[str, str]]
    out: str

    @property
    def exit_status(self) -> int:
        return 2 if self.skipped else 0


def predict(cfg: PredictConfig, log=print) -> Predictions:
    """Classify --input into the CSV --out, written as it goes to a temporary file renamed into
    place at the end (an interrupted or failed run leaves --out as it was)."""
    if os.path.isdir(cfg.out):
        raise ConfigError(f'--out={cfg.out} is a directory; give a CSV file name')
    files.check_writable_dir(os.path.dirname(os.path.abspath(cfg.out)), 'out')
    names, pixels = image_sources(cfg.input)
    classifier = load_classifier(cfg.model)
    k = min(cfg.top_k, len(classifier.class_names))
    header = ['file', 'class_id', 'class', 'probability']
    header += [f'{column}_{r}' for r in range(2, k + 1) for column in ('class', 'probability')]
    header += ['unknown'] if classifier.open_set else []
    progress = Progress(len(names)) if len(names) > cfg.batch else (lambda done: None)
    skipped, rows = [], 0

    def write(table):
        nonlocal rows
        writer = csv.writer(table)
        writer.writerow(header)
        for done, chosen, images, unread in batches(names, pixels, classifier.image_shape,
                                                    cfg.resize, cfg.batch):
            for name, path in unread:
                reason = unreadable(path) or 'not a readable image'
                print(f'warning: --input={cfg.input}: skipped {name}: {reason}', file=sys.stderr)
                skipped.append((name, reason))
            if len(images):
                p, unknown = classifier.outputs(images)
                tops = np.argsort(-p, axis=-1, kind='stable')[:, :k]
                for i, (name, q, top) in enumerate(zip(chosen, p, tops)):
                    row = [name, int(top[0]), classifier.class_names[top[0]], f'{q[top[0]]:.6f}']
                    for c in top[1:]:
                        row += [classifier.class_names[c], f'{q[c]:.6f}']
                    writer.writerow(row + ([f'{unknown[i]:.6f}'] if unknown is not None else []))
            rows += len(chosen)
            progress(done)
        # The list of skipped files lands before the CSV it belongs to; a stale one goes.
        if skipped:
            files.write_atomically(skipped_path(cfg.out), lambda f: csv.writer(f).writerows(
                [('file', 'reason'), *skipped]), 'w', newline='')
        elif os.path.isfile(skipped_path(cfg.out)):
            os.unlink(skipped_path(cfg.out))
    files.write_atomically(cfg.out, write, 'w', newline='')
    if skipped:
        log(f'{rows} images -> {cfg.out}; skipped {len(skipped)} file(s) that could not be read '
            f'as images, listed in {skipped_path(cfg.out)} (exit status 2)')
    else:
        log(f'{rows} images -> {cfg.out}')
    return Predictions(rows, skipped, cfg.out)


if __name__ == '__main__':
    cli.run(predict, PredictConfig)
