"""--dataset=folder:PATH: a folder of image files, indexed once, its pixels read when needed.

The layout and the treatment of files from the wild are described in custom.py. This module:
  index   lists the folder (class folders, unlabeled/, train/ and test/) and reads each image's
          header (size and channels, not its pixels). The headers are cached in
          PATH/.ssl_ema_index.npz (a hidden file, so never taken for data), or under
          ~/.cache/ssl_ema/ when PATH is read-only, keyed by a hash of every listed file's name,
          size and modification time: adding, removing, renaming or rewriting a file rebuilds it.
  size    --image_size, else the images' one size, else (mixed sizes) the median height and width
          of the training images (images.median_size), announced on stderr.
  pixels  a folder whose decoded images are small (at most IN_MEMORY_MAX_IMAGES images and
          IN_MEMORY_MAX_BYTES bytes) is decoded once, in parallel, into the in-memory arrays that
          every other dataset uses: its batches then cost a gather, no decoding, and damaged files
          are found and skipped before training, as they always were. A larger folder stays on
          disk (files.FileImages): each batch decodes its own images, so start-up time and memory
          do not grow with the folder's pixels (only its list of paths is held: ~100 bytes an image).
"""
import dataclasses
import hashlib
import os
import pathlib
import sys
from typing import List, Optional, Tuple

import numpy as np

from ssl_ema.base.errors import DataError
from ssl_ema.base.files import write_atomically
from ssl_ema.data import custom, images as image_lib
from ssl_ema.data.datasets import Arrays, register
from ssl_ema.data.files import FileImages

# Our measurement (runs/SPEED.md, "File-backed folders"): decoding runs at ~2,500 small images/s
# on this 2-core machine, so 20,000 images are ~8 s of start-up; past that, streaming starts sooner.
IN_MEMORY_MAX_IMAGES = 20_000
IN_MEMORY_MAX_BYTES = 256 << 20
INDEX_FILE = '.ssl_ema_index.npz'
INDEX_VERSION = 1


class Listing:
    """A folder's image files (relative paths) by part, their labels, what was left out, and the
    signature of the listing (names, sizes and modification times)."""

    def __init__(self, root: pathlib.Path, source: str):
        self.root, self.source = root, source
        self.skipped = custom._Skipped()
        self.digest = hashlib.sha256(f'v{INDEX_VERSION}'.encode())
        self.files: List[str] = []          # every part's files, in order: train, test, unlabeled
        self.labels: List[int] = []         # -1 for unlabeled
        self.parts: List[int] = []          # 0 train, 1 test, 2 unlabeled

    def _entries(self, folder: str):
        try:
            with os.scandir(self.root / folder if folder else self.root) as it:
                return sorted((e for e in it if not e.name.startswith('.')), key=lambda e: e.name)
        except OSError as e:
            raise DataError(f'--dataset={self.source}: cannot list {self.root / folder}: '
                            f'{e.strerror}') from None

    def add_files(self, folder: str, label: int, part: int):
        for entry in self._entries(folder):
            rel = f'{folder}/{entry.name}'
            if entry.is_symlink() and not os.path.exists(entry.path):   # dangling or a loop
                self.skipped.paths['link'].append(self.root / rel)
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in custom.IMAGE_SUFFIXES:
                stat = entry.stat()
                self.digest.update(f'{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
                self.files.append(rel)
                self.labels.append(label)
                self.parts.append(part)
            else:
                self.skipped.paths['other'].append(self.root / rel)

    def class_folders(self, folder: str, names: Optional[List[str]] = None) -> List[str]:
        found = []
        for entry in self._entries(folder):
            if entry.name == custom.UNLABELED_FOLDER:
                continue
            if entry.is_dir():
                found.append(entry.name)
            elif entry.is_symlink() and not os.path.exists(entry.path):
                self.skipped.paths['link'].append(self.root / folder / entry.name)
        where = self.root / folder
        if names is None:
            if len(found) < 2:
                raise DataError(f'--dataset={self.source}: {where} has {len(found)} class '
                                f'folder(s) {found}; need one sub-folder per class, at least 2')
            return found
        if set(found) - set(names):
            raise DataError(f'--dataset={self.source}: {where} has classes '
                            f'{sorted(set(found) - set(names))} that train/ lacks')
        return names


def _cache_paths(root: pathlib.Path):
    home = pathlib.Path(os.environ.get('XDG_CACHE_HOME', '~/.cache')).expanduser()
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / INDEX_FILE, home / 'ssl_ema' / 'folders' / f'{key}.npz']


def _headers(listing: Listing) -> np.ndarray:
    """int32 [N, 3]: each file's (height, width, channels), -1 where the header does not read;
    from the cache when the listing is unchanged."""
    digest = listing.digest.hexdigest()
    candidates = _cache_paths(listing.root)
    for path in candidates:
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f['digest']) == digest and len(f['shapes']) == len(listing.files):
                    return f['shapes']
        except (OSError, ValueError, KeyError):   # absent, damaged or stale: rebuilt below
            pass
    shapes = np.full((len(listing.files), 3), -1, np.int32)
    for i, rel in enumerate(listing.files):
        shape = image_lib.header(custom.read_head(listing.root / rel, listing.source))
        if shape:
            shapes[i] = shape
    for path in candidates:
        try:
            write_atomically(path, lambda f: np.savez(f, digest=np.asarray(digest), shapes=shapes))
            break
        except OSError:   # a read-only folder: the user's cache directory instead
            continue
    return shapes


def _size(shapes: np.ndarray, train: np.ndarray, image_size, source: str) -> Tuple[int, int]:
    sizes = {tuple(s) for s in shapes[:, :2].tolist()}
    if image_size:
        return tuple(image_size)
    if len(sizes) == 1:
        return sizes.pop()
    size = image_lib.median_size(shapes[train] if train.any() else shapes)
    print(f'--dataset={source}: images of mixed sizes ({len(sizes)} sizes, '
          f'{shapes[:, 1].min()}-{shapes[:, 1].max()} pixels wide, {shapes[:, 0].min()}-'
          f'{shapes[:, 0].max()} high); each is scaled to cover the median size, '
          f'--image_size={size[0]},{size[1]} (height, width), and centre-cropped; give '
          '--image_size=H,W for another', file=sys.stderr)
    return size


@register('folder:')
def folder(path: str, image_size: Optional[Tuple[int, int]] = None) -> Arrays:
    """--dataset=folder:PATH (see custom.py for the layout)."""
    source = f'folder:{path}'
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f'--dataset={source}: no such directory')
    listing = Listing(root, source)
    split_layout = (root / 'train').is_dir() and (root / 'test').is_dir()
    train_dir = 'train' if split_layout else ''
    names = listing.class_folders(train_dir)
    for c, name in enumerate(names):
        listing.add_files(f'{train_dir}/{name}'.lstrip('/'), c, 0)
    if split_layout:
        for c, name in enumerate(listing.class_folders('test', names)):
            if (root / 'test' / name).is_dir():
                listing.add_files(f'test/{name}', c, 1)
    for candidate in (f'{train_dir}/{custom.UNLABELED_FOLDER}'.lstrip('/'), custom.UNLABELED_FOLDER):
        if (root / candidate).is_dir():
            listing.add_files(candidate, -1, 2)
            break
    shapes = _headers(listing)
    files, labels, parts = (np.asarray(listing.files, object), np.asarray(listing.labels, np.int64),
                            np.asarray(listing.parts))
    readable = shapes[:, 0] > 0
    listing.skipped.paths['damaged'] += [root / f for f in files[~readable]]
    files, labels, parts, shapes = (a[readable] for a in (files, labels, parts, shapes))
    channels = 3 if (shapes[:, 2] == 3).any() else 1   # grey among colour: widened to RGB
    size = _size(shapes, parts == 0, image_size, source) if len(files) else (1, 1)
    images = FileImages(root, files, size, channels, source)
    decoded_bytes = len(files) * size[0] * size[1] * channels
    if len(files) <= IN_MEMORY_MAX_IMAGES and decoded_bytes <= IN_MEMORY_MAX_BYTES:
        pixels, ok = images.decode(with_ok=True, warn=False)
        listing.skipped.paths['damaged'] += [root / f for f in files[~ok]]
        images, files, labels, parts = pixels[ok], files[ok], labels[ok], parts[ok]
    listing.skipped.paths['damaged'].sort()
    listing.skipped.warn(source, root)
    empty = [n for c, n in enumerate(names) if not np.any((labels == c) & (parts == 0))]
    if empty:
        raise DataError(f'--dataset={source}: class folder(s) {empty} in {root / train_dir} hold '
                        f'no readable image ({", ".join(sorted(custom.IMAGE_SUFFIXES))})')
    if split_layout and not np.any(parts == 1):
        raise DataError(f'--dataset={source}: {root / "test"} holds no readable image; add some '
                        f'or remove it (10% of train/ is then the test part)')
    train, test, unlabeled = (np.flatnonzero(parts == p) for p in range(3))
    arrays = custom._assemble(source, images[train], labels[train],
                             images[test] if split_layout else None,
                             labels[test] if split_layout else None, images[unlabeled])
    return dataclasses.replace(arrays, class_names=tuple(names))   # the class folders' names
