"""--dataset=imagenet2012: ILSVRC-2012 from the archives in tfds' manual directory, read as a
file-backed folder (folder.py).

tensorflow-datasets cannot download ImageNet: its imagenet2012 builder reads
ILSVRC2012_img_train.tar (1,000 inner archives, one per WordNet id, of JPEGs) and
ILSVRC2012_img_val.tar (50,000 JPEGs) from `<root>/downloads/manual/` (official.manual_dir). We
read the same two files there. Neither tar, nor tfds' TFRecords, can be read at a random image
cheaply, so the first use extracts them once (one pass over ~150 GB; nothing is decoded) into
`<root>/ssl_ema/imagenet2012/{train,test}/<wnid>/` (renamed into place only when complete); from
then on every batch reads its own JPEGs, as for any large folder. The validation set is the test
part, as in FixMatch's imagenet/ code; --valid is carved out of the training images.

Classes are the 1,000 WordNet ids in sorted order (class k is tfds' label k: its labels.txt is
sorted the same way), validation labels come from the validation_labels.txt that
tensorflow-datasets ships with its builder. Images are read at 224x224 unless --image_size says
otherwise (FixMatch's imagenet/datasets/imagenet.py IMAGE_SIZE); a file that does not decode
(tfds converts 22 CMYK JPEGs and one PNG; our header check skips the CMYK ones with a warning
naming them) is treated as in any folder.
"""
import dataclasses
import os
import pathlib
import shutil
import tarfile
from typing import Optional, Tuple

from ssl_ema.base.errors import DataError, one_line
from ssl_ema.data import folder, official
from ssl_ema.data.datasets import Arrays, register

TRAIN_TAR, VALID_TAR = 'ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'
IMAGE_SIZE = (224, 224)   # FixMatch imagenet/datasets/imagenet.py


def _tfds_file(name: str) -> pathlib.Path:
    import tensorflow_datasets
    return pathlib.Path(tensorflow_datasets.__file__).parent / 'datasets' / 'imagenet2012' / name


def validation_labels() -> list:
    """The WordNet id of each validation image, in file order (ILSVRC2012_val_00000001 first)."""
    path = _tfds_file('validation_labels.txt')
    try:
        return path.read_text().split()
    except OSError as e:
        raise DataError(f'--dataset=imagenet2012: cannot read {path} (tensorflow-datasets\' '
                        f'validation labels): {e.strerror}') from None


def _write(member_file, target: pathlib.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, 'wb') as out:
        shutil.copyfileobj(member_file, out, 1 << 20)


def extract(manual: pathlib.Path, target: pathlib.Path) -> None:
    """The two archives -> target/train/<wnid>/*.JPEG and target/test/<wnid>/*.JPEG, written under
    a temporary name and renamed when whole (an interrupted extraction starts over)."""
    partial = target.with_name(target.name + '.partial')
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(manual / TRAIN_TAR, 'r|*') as outer:
        for member in outer:
            name = os.path.basename(member.name)
            if not (member.isfile() and name.endswith('.tar')):
                continue
            wnid = name[:-len('.tar')]
            with tarfile.open(fileobj=outer.extractfile(member), mode='r|*') as inner:
                for image in inner:
                    if image.isfile():
                        _write(inner.extractfile(image),
                               partial / 'train' / wnid / os.path.basename(image.name))
    labels = validation_labels()
    with tarfile.open(manual / VALID_TAR, 'r|*') as archive:
        for member in archive:
            name = os.path.basename(member.name)
            if not member.isfile():
                continue
            try:   # ILSVRC2012_val_00000001.JPEG -> the first label
                wnid = labels[int(os.path.splitext(name)[0].rsplit('_', 1)[1]) - 1]
            except (ValueError, IndexError):
                raise DataError(f'{manual / VALID_TAR} holds {member.name}, not an '
                                'ILSVRC2012_val_NNNNNNNN.JPEG: not the official archive') from None
            _write(archive.extractfile(member), partial / 'test' / wnid / name)
    if not (partial / 'train').is_dir() or not (partial / 'test').is_dir():
        raise DataError(f'{manual}: {TRAIN_TAR} or {VALID_TAR} holds no image: not the official '
                        'archives')
    os.replace(partial, target)


@register('imagenet2012')
def imagenet2012(data_dir: Optional[str] = None, download: bool = True,
                 image_size: Optional[Tuple[int, int]] = None) -> Arrays:
    """imagenet2012 from tfds' manual directory (module docstring)."""
    del download   # ImageNet is never downloaded, by tfds or by us
    root = official.data_root(data_dir)
    manual = official.manual_dir(root)
    target = root / 'ssl_ema' / 'imagenet2012'
    if not target.is_dir():
        missing = [f for f in (TRAIN_TAR, VALID_TAR) if not (manual / f).is_file()]
        if missing:
            raise DataError(f'--dataset=imagenet2012: no {" or ".join(missing)} in {manual}/; '
                            'download them from image-net.org (tfds\' manual directory, as its '
                            'imagenet2012 builder asks)')
        try:
            extract(manual, target)
        except DataError:
            raise
        except (OSError, tarfile.TarError, EOFError) as e:
            raise DataError(f'--dataset=imagenet2012: cannot extract {manual / TRAIN_TAR} and '
                            f'{VALID_TAR} ({one_line(e)}); expected the official archives') from None
    arrays = folder.folder(str(target), image_size=image_size or IMAGE_SIZE)
    return dataclasses.replace(arrays, name='imagenet2012')
