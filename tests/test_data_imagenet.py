"""--dataset=imagenet2012 from tfds' manual directory: a tiny pair of archives in the official
layout (train: one inner tar per WordNet id; val: ILSVRC2012_val_NNNNNNNN.JPEG labelled by
tensorflow-datasets' validation_labels.txt) trains end to end through the protocol flagfile."""
import io
import json
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from ssl_ema.base.errors import DataError
from ssl_ema.data import imagenet

REPO = pathlib.Path(__file__).resolve().parent.parent


def _jpeg(rng, colour) -> bytes:
    from PIL import Image
    h, w = rng.randint(20, 41, 2)
    pixels = np.clip(colour + rng.randint(-30, 31, (h, w, 3)), 0, 255).astype(np.uint8)
    f = io.BytesIO()
    Image.fromarray(pixels).save(f, format='JPEG')
    return f.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_archives(manual: pathlib.Path, classes=3, per_class=10, valid_per_class=3):
    """ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, tiny, in the official layout."""
    labels = imagenet.validation_labels()
    wnids = sorted(dict.fromkeys(labels))[:classes]
    rng = np.random.RandomState(0)
    colours = {w: c for w, c in zip(wnids, ([200, 40, 40], [40, 200, 40], [40, 40, 200]))}
    manual.mkdir(parents=True)
    with tarfile.open(manual / imagenet.TRAIN_TAR, 'w') as outer:
        for wnid in wnids:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode='w') as tar:
                for i in range(per_class):
                    _add(tar, f'{wnid}_{i + 1}.JPEG', _jpeg(rng, colours[wnid]))
            _add(outer, f'{wnid}.tar', inner.getvalue())
    with tarfile.open(manual / imagenet.VALID_TAR, 'w') as val:
        for wnid in wnids:
            for index in [i for i, w in enumerate(labels) if w == wnid][:valid_per_class]:
                _add(val, f'ILSVRC2012_val_{index + 1:08d}.JPEG', _jpeg(rng, colours[wnid]))
    return wnids


def test_imagenet_protocol_trains_end_to_end_on_a_tiny_official_archive(tmp_path):
    wnids = write_archives(tmp_path / 'data' / 'downloads' / 'manual')
    command = [sys.executable, '-m', 'ssl_ema.train', '--flagfile=runs/protocols/imagenet.flags',
               '--algorithm=fixmatch', '--labels=6', '--valid=3', f'--data_dir={tmp_path / "data"}',
               # tiny overrides of the protocol's scale: everything else is the flagfile's
               '--image_size=16', '--arch=small_cnn', '--batch=3', '--uratio=2',
               '--train_steps=2', '--eval_every_kimg=0.003', f'--train_dir={tmp_path / "run"}']
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    extracted = tmp_path / 'data' / 'ssl_ema' / 'imagenet2012'
    assert sorted(p.name for p in (extracted / 'train').iterdir()) == wnids
    assert sum(1 for _ in (extracted / 'test').rglob('*.JPEG')) == 9
    with open(tmp_path / 'run' / 'classifier.json') as f:
        info = json.load(f)
    assert info['image_shape'] == [16, 16, 3] and info['num_classes'] == 3
    with open(tmp_path / 'run' / 'flags.json') as f:
        record = json.load(f)
    assert record['algorithm']['confidence_threshold'] == 0.7
    assert record['algorithm']['consistency_weight'] == 10
    assert record['config']['dataset'] == 'imagenet2012' and record['config']['uratio'] == 2


def test_imagenet_without_the_archives_names_them_and_the_manual_directory(tmp_path):
    from ssl_ema.data.datasets import load
    with pytest.raises(DataError, match=r'no ILSVRC2012_img_train.tar or ILSVRC2012_img_val.tar '
                                        r'in .*downloads/manual'):
        load('imagenet2012', str(tmp_path))
