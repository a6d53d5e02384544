"""predict at scale (issue 31): image files read in parallel by tf.data give the CSV the serial
reading gave, a damaged file is skipped and named, an interrupted run leaves no CSV."""
import csv
import io
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import quiet
from ssl_ema import predict
from ssl_ema.data import images as image_lib

SUBPROCESS_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')


def tiny_model(path, shape, classes=4, seed=0):
    """A .keras classifier of uint8 images `shape`: random weights, softmax over `classes`."""
    import keras
    keras.utils.set_random_seed(seed)
    images = keras.Input(shape, dtype='uint8')
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255.)(images))
    keras.Model(images, keras.layers.Dense(classes, activation='softmax')(x)).save(path)
    return str(path)


def encode(image: np.ndarray, fmt: str, **kwargs) -> bytes:
    from PIL import Image
    f = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(f, format=fmt,
                                                                               **kwargs)
    return f.getvalue()


def wild_folder(root, seed=0):
    """Images from the wild, 6-13 pixels a side: grey, RGB, RGBA, grey+alpha, palette and 16-bit
    PNGs, JPEGs, a GIF, a BMP; one in a sub-folder."""
    from PIL import Image
    rng = np.random.RandomState(seed)

    def pixels(channels):
        h, w = rng.randint(6, 14, 2)
        return rng.randint(0, 256, (h, w, channels)).astype(np.uint8).squeeze()
    (root / 'sub').mkdir(parents=True)
    files = {'a_grey.png': encode(pixels(1), 'PNG'), 'b_rgb.jpg': encode(pixels(3), 'JPEG'),
             'c_rgba.png': encode(pixels(4), 'PNG'), 'd_la.png': encode(
                 Image.fromarray(pixels(2), 'LA'), 'PNG'),
             'e_palette.png': encode(Image.fromarray(pixels(3)).quantize(16), 'PNG'),
             'f_16bit.png': encode(Image.fromarray(pixels(1).astype(np.uint16) * 257), 'PNG'),
             'g.gif': encode(pixels(3), 'GIF'), 'h.bmp': encode(pixels(3), 'BMP'),
             'i_grey.jpg': encode(pixels(1), 'JPEG'), 'sub/j_rgb.png': encode(pixels(3), 'PNG')}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return sorted(files)


def serial_csv(model, names, paths, shape, batch, k=3) -> str:
    """The CSV as predict wrote it before issue 31: one file at a time, decoded eagerly
    (custom.read_image), converted in numpy (predict.fit), one forward pass per `batch`."""
    import tensorflow as tf
    from ssl_ema.core.classifier import load_classifier

    def read(path):   # read_image, as it was
        image = tf.io.decode_image(open(path, 'rb').read(), channels=0, dtype=tf.uint8,
                                   expand_animations=False).numpy()
        return image[..., :3] if image.shape[-1] == 4 else image[..., :1] if \
            image.shape[-1] == 2 else image

    def fit(image):   # predict.fit with --resize, as it was
        h, w, c = shape
        if image.shape[-1] != c:
            image = (np.repeat(image, c, -1) if image.shape[-1] == 1 else
                     np.round(tf.image.rgb_to_grayscale(image.astype(np.float32)).numpy()))
        if image.shape[:2] != (h, w):
            image = image_lib.to_uint8(image_lib.cover_and_crop(
                np.clip(np.round(image), 0, 255).astype(np.uint8), (h, w))).numpy()
        return np.clip(np.round(image), 0, 255).astype(np.uint8)
    classifier = load_classifier(model)
    table = io.StringIO(newline='')
    writer = csv.writer(table)
    writer.writerow(['file', 'class_id', 'class', 'probability'] +
                    [f'{c}_{r}' for r in range(2, k + 1) for c in ('class', 'probability')])
    for start in range(0, len(names), batch):
        p = classifier.probabilities(np.stack([fit(read(f)) for f in paths[start:start + batch]]))
        for name, q in zip(names[start:start + batch], p):
            top = np.argsort(-q, kind='stable')[:k]
            writer.writerow([name, int(top[0]), str(top[0]), f'{q[top[0]]:.6f}'] +
                            [v for c in top[1:] for v in (str(c), f'{q[c]:.6f}')])
    return table.getvalue()


@pytest.mark.parametrize('shape', [(8, 8, 1), (8, 8, 3)])
def test_folder_and_glob_give_the_serial_csv(shape, tmp_path):
    """Same rows, same order, same probabilities as the one-file-at-a-time reading, for every
    channel conversion and resize; a batch that does not divide the folder."""
    names = wild_folder(tmp_path / 'photos')
    model = tiny_model(tmp_path / 'm.keras', shape)
    paths = [str(tmp_path / 'photos' / n) for n in names]
    out = tmp_path / 'p.csv'
    done = predict.predict(predict.PredictConfig(model=model, input=str(tmp_path / 'photos'),
                                                 out=str(out), resize=True, batch=3), log=quiet)
    assert (done.images, done.skipped, done.exit_status) == (len(names), [], 0)
    expected = serial_csv(model, names, paths, shape, batch=3)
    assert out.read_bytes().decode() == expected
    predict.predict(predict.PredictConfig(model=model, input=str(tmp_path / 'photos/**/*.*'),
                                          out=str(out), resize=True, batch=3), log=quiet)
    assert out.read_bytes().decode() == serial_csv(model, paths, paths, shape, batch=3)


def test_npz_converts_channels_as_before(tmp_path):
    """A .npz of colour images for a grey model: each image turned grey as files are."""
    x = np.random.RandomState(1).randint(0, 256, (5, 8, 8, 3)).astype(np.uint8)
    np.savez(tmp_path / 'x.npz', x=x)
    for i, image in enumerate(x):
        (tmp_path / f'{i}.png').write_bytes(encode(image, 'PNG'))
    model = tiny_model(tmp_path / 'm.keras', (8, 8, 1))
    out = tmp_path / 'p.csv'
    predict.predict(predict.PredictConfig(model=model, input=str(tmp_path / 'x.npz'),
                                          out=str(out), batch=2), log=quiet)
    files = [str(tmp_path / f'{i}.png') for i in range(5)]
    names = [f'x.npz:x[{i}]' for i in range(5)]
    assert out.read_bytes().decode() == serial_csv(model, names, files, (8, 8, 1), batch=2)


def test_damaged_files_are_skipped_named_and_listed(tmp_path):
    """A 0-byte PNG and a JPEG cut short (its header still reads) among good images: each named
    on stderr and in OUT.skipped.csv, every other image its row, exit status 2."""
    names = wild_folder(tmp_path / 'photos')
    model = tiny_model(tmp_path / 'm.keras', (8, 8, 3))
    clean = tmp_path / 'clean.csv'
    predict.predict(predict.PredictConfig(model=model, input=str(tmp_path / 'photos'),
                                          out=str(clean), resize=True, batch=4), log=quiet)
    jpeg = encode(np.random.RandomState(2).randint(0, 256, (40, 40, 3)).astype(np.uint8), 'JPEG')
    (tmp_path / 'photos' / 'b_cut.jpg').write_bytes(jpeg[:len(jpeg) // 2])
    assert image_lib.header(jpeg[:len(jpeg) // 2]) == (40, 40, 3)
    (tmp_path / 'photos' / 'sub' / 'z_empty.png').write_bytes(b'')
    out = tmp_path / 'p.csv'
    done = subprocess.run([sys.executable, '-m', 'ssl_ema.predict', f'--model={model}',
                           f'--input={tmp_path / "photos"}', f'--out={out}', '--resize',
                           '--batch=4'], capture_output=True, text=True, env=SUBPROCESS_ENV,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    reason = 'not a readable image (truncated or corrupt?)'
    for name in ('b_cut.jpg', 'sub/z_empty.png'):
        assert f'warning: --input={tmp_path / "photos"}: skipped {name}: {reason}' in done.stderr
    assert done.stdout.strip() == (
        f'{len(names)} images -> {out}; skipped 2 file(s) that could not be read as images, '
        f'listed in {tmp_path / "p.skipped.csv"} (exit status 2)')
    assert out.read_bytes() == clean.read_bytes()   # the others' rows, in order, as without them
    assert list(csv.reader(open(tmp_path / 'p.skipped.csv'))) == [
        ['file', 'reason'], ['b_cut.jpg', reason], ['sub/z_empty.png', reason]]
    # Repaired: exit status 0, and the stale list of skipped files goes.
    (tmp_path / 'photos' / 'b_cut.jpg').unlink()
    (tmp_path / 'photos' / 'sub' / 'z_empty.png').unlink()
    done = predict.predict(predict.PredictConfig(model=model, input=str(tmp_path / 'photos'),
                                                 out=str(out), resize=True), log=quiet)
    assert done.exit_status == 0 and not (tmp_path / 'p.skipped.csv').exists()


def test_an_interrupted_predict_leaves_no_csv(tmp_path, monkeypatch):
    """Ctrl-C after the first batch: no CSV (an earlier one stays as it was), no temporary."""
    names = wild_folder(tmp_path / 'photos')
    model = tiny_model(tmp_path / 'm.keras', (8, 8, 3))
    load = predict.load_classifier
    calls = []

    def interrupted(path):
        classifier = load(path)
        forward = classifier.outputs

        def outputs(x):
            calls.append(len(x))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return forward(x)
        classifier.outputs = outputs
        return classifier
    monkeypatch.setattr(predict, 'load_classifier', interrupted)
    out = tmp_path / 'out' / 'p.csv'
    config = predict.PredictConfig(model=model, input=str(tmp_path / 'photos'), out=str(out),
                                   resize=True, batch=4)
    out.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        predict.predict(config, log=quiet)
    assert calls == [4, 4] and os.listdir(out.parent) == []
    out.write_text('earlier\n')
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        predict.predict(config, log=quiet)
    assert os.listdir(out.parent) == ['p.csv'] and out.read_bytes().decode() == 'earlier\n'
    assert len(names) > 8   # the interruption came before the last batch
