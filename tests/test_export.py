"""The trained classifier as a product: export, predict, evaluate."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import quiet, tiny_config
from ssl_ema import algorithms, cli, predict
from ssl_ema.core import classifier as export
from ssl_ema.base.errors import ConfigError, DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A finished 20-step run (one evaluation, one checkpoint) and its automatic export."""
    from conftest import run
    train_dir = str(tmp_path_factory.mktemp('export') / 'run')
    cfg = tiny_config(algorithm='supervised', train_steps=20, train_dir=train_dir)
    run(cfg, algorithms.ALGORITHMS['supervised'](), log=quiet)
    return train_dir


@pytest.fixture(scope='module')
def in_training(run_dir, digits_data):
    """The Trainer's own models at the end of the run, restored by the Trainer itself, and their
    class probabilities on the test set."""
    import tensorflow as tf
    from ssl_ema.core.loop import Trainer
    cfg = tiny_config(algorithm='supervised', train_steps=20, train_dir=run_dir)
    trainer = Trainer(cfg, algorithms.ALGORITHMS['supervised'](), digits_data, run_dir)
    assert trainer.restore() == 20
    x = trainer.eval_arrays['test'][0]
    return {name: tf.nn.softmax(model(x, training=False)).numpy()
            for name, model in (('ema', trainer.ema.model), ('raw', trainer.student))}


def run_command(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env=SUBPROCESS_ENV, timeout=300)


def test_a_finished_run_exports_its_ema_classifier(run_dir):
    out = os.path.join(run_dir, 'export')
    assert {'model.keras', 'saved_model', 'export.json'} <= set(os.listdir(out))
    meta = json.load(open(os.path.join(out, 'export.json')))
    assert (meta['model'], meta['checkpoint'], meta['step']) == ('ema', 'ckpt-20', 20)
    assert meta['class_names'] == [str(i) for i in range(10)] and meta['image_shape'] == [8, 8, 1]
    # no temporary left (.lock is the run directory's lock file, ssl_ema/base/files.py)
    assert not [f for f in os.listdir(run_dir) if f.startswith('.') and f != '.lock']


# The exported files, loaded by a Python that cannot import ssl_ema: the repository is off its
# path and the editable install's finder is replaced by one that refuses the package.
ISOLATED = '''
import sys
repo, export_dir, images, out = sys.argv[1:]
sys.path[:] = [p for p in sys.path   # the venv may live in the repository: keep site-packages
              if p and (p.startswith(sys.prefix) or not p.startswith(repo))]
class Refuse:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split('.')[0] == 'ssl_ema':
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Refuse)
try:
    import ssl_ema
    sys.exit('ssl_ema is importable')
except ModuleNotFoundError:
    pass
import numpy as np, tensorflow as tf, keras
x = np.load(images)
served = tf.saved_model.load(export_dir + '/saved_model').signatures['serving_default']
by_saved_model = served(images=tf.constant(x))['probabilities'].numpy()
by_keras = keras.saving.load_model(export_dir + '/model.keras')(x).numpy()
np.savez(out, saved_model=by_saved_model, keras=by_keras)
'''


def test_exported_model_runs_without_the_package(run_dir, in_training, digits_data, tmp_path):
    images = tmp_path / 'x_test.npy'
    np.save(images, digits_data.arrays.x_test)   # raw uint8: the export normalises itself
    done = run_command('-I', '-c', ISOLATED, REPO, os.path.join(run_dir, 'export'),
                       str(images), str(tmp_path / 'out.npz'), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    expected = in_training['ema']
    with np.load(tmp_path / 'out.npz') as got:
        for loader in ('saved_model', 'keras'):
            np.testing.assert_allclose(got[loader], expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(got[loader].argmax(1), expected.argmax(1))
    assert not np.allclose(in_training['raw'], expected, atol=1e-3)   # the comparison can fail


def test_export_of_the_raw_student(run_dir, in_training, digits_data):
    import keras
    out = export.export_run(run_dir, model='raw', log=quiet)
    assert out == os.path.join(run_dir, 'export_raw')
    model = keras.saving.load_model(os.path.join(out, 'model.keras'))
    np.testing.assert_allclose(model(digits_data.arrays.x_test).numpy(), in_training['raw'],
                               rtol=1e-5, atol=1e-6)


def test_export_errors(run_dir, tmp_path):
    with pytest.raises(ConfigError, match='no such directory'):
        export.export_run(str(tmp_path / 'missing'))
    with pytest.raises(ConfigError, match='not a run directory'):
        export.export_run(str(tmp_path))
    with pytest.raises(ConfigError, match=r'--checkpoint=ckpt-7 .*has: ckpt-20'):
        export.export_run(run_dir, checkpoint='ckpt-7')
    keep = tmp_path / 'mine'
    keep.mkdir()
    (keep / 'notes.txt').write_text('precious')
    with pytest.raises(ConfigError, match='is not an export'):
        export.export_run(run_dir, out=str(keep))
    assert os.listdir(keep) == ['notes.txt']
    with pytest.raises(ConfigError, match='--model=best is unknown; valid: ema, raw'):
        export.export_run(run_dir, model='best')


def test_command_errors_are_one_line():
    def fails():
        raise DataError('--input=x.png: cannot decode x.png')
    with pytest.raises(SystemExit, match=r'^error: --input=x.png: cannot decode x.png$'):
        cli.main(fails)(['prog'])
    with pytest.raises(SystemExit, match='unexpected arguments'):
        cli.main(fails)(['prog', 'stray'])


def test_plotting_commands_name_the_extra_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)   # import matplotlib -> ImportError
    with pytest.raises(ConfigError, match=r'matplotlib: pip install -e "\.\[benchmark\]"'):
        cli.require_matplotlib('ssl_ema.evaluate')


def write_pngs(folder, images):
    from PIL import Image
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0]).save(folder / f'{i:03d}.png')


def test_predict_on_a_folder_of_pngs(run_dir, in_training, digits_data, tmp_path):
    """docs/classifier.md's predict command, as a user runs it."""
    write_pngs(tmp_path / 'photos', digits_data.arrays.x_test[:12])
    out = tmp_path / 'predictions.csv'
    done = run_command('-m', 'ssl_ema.predict', f'--model={run_dir}/export',
                       f'--input={tmp_path / "photos"}', f'--out={out}', '--top_k=3')
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(open(out)))
    assert [r['file'] for r in rows] == [f'{i:03d}.png' for i in range(12)]
    assert list(rows[0]) == ['file', 'class_id', 'class', 'probability', 'class_2',
                             'probability_2', 'class_3', 'probability_3']
    expected = in_training['ema'][:12]
    for row, p in zip(rows, expected):
        top = np.argsort(-p)[:3]
        assert [int(row['class_id']), row['class'], row['class_2'], row['class_3']] == \
            [top[0], str(top[0]), str(top[1]), str(top[2])]
        assert float(row['probability']) == pytest.approx(p[top[0]], abs=1e-6)
        assert float(row['probability']) >= float(row['probability_2'])


def test_predict_refuses_another_size_unless_resize(run_dir, tmp_path):
    """Exit 1, one line naming the file and both sizes, no CSV; --resize classifies it."""
    from PIL import Image
    Image.fromarray(np.full((16, 12, 3), 200, np.uint8)).save(tmp_path / 'big.png')
    out = tmp_path / 'p.csv'
    args = ('-m', 'ssl_ema.predict', f'--model={run_dir}/export', f'--input={tmp_path}/*.png',
            f'--out={out}')
    done = run_command(*args)
    assert done.returncode == 1 and 'Traceback' not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f'error: {tmp_path}/big.png is 12x16 pixels but the model takes 8x8: resize it, or pass '
        '--resize to let predict resize every such image')
    assert not out.exists()
    config = predict.PredictConfig(model=f'{run_dir}/export', input=str(tmp_path / 'big.png'),
                                   out=str(out), resize=True)
    assert predict.predict(config, log=quiet).images == 1
    assert len(list(csv.reader(open(out)))) == 2


def test_predict_inputs(run_dir, in_training, digits_data, tmp_path):
    np.savez(tmp_path / 'x.npz', x_test=digits_data.arrays.x_test[:5] / 255.)   # float 0..1
    out = tmp_path / 'p.csv'
    config = predict.PredictConfig(model=f'{run_dir}/export/saved_model',
                                   input=str(tmp_path / 'x.npz'), out=str(out), top_k=20)
    assert predict.predict(config, log=quiet).images == 5
    rows = list(csv.DictReader(open(out)))
    assert rows[0]['file'] == 'x.npz:x_test[0]' and 'class_10' in rows[0]   # top_k <= 10 classes
    assert [int(r['class_id']) for r in rows] == list(in_training['ema'][:5].argmax(1))
    (tmp_path / 'broken.png').write_bytes(b'not a png')   # the folder's only image: skipped
    done = predict.predict(predict.PredictConfig(model=f'{run_dir}/export', input=str(tmp_path),
                                                 out=str(out)), log=quiet)
    assert (done.images, done.skipped, done.exit_status) == (
        0, [('broken.png', 'not a readable image (truncated or corrupt?)')], 2)
    assert len(list(csv.reader(open(out)))) == 1   # the header
    with pytest.raises(DataError, match='no such folder'):
        predict.image_sources(str(tmp_path / 'nothing*.png'))
    with pytest.raises(ConfigError, match='--model=.* is not an export directory'):
        export.load_classifier(str(tmp_path))
    with pytest.raises(ConfigError, match='no such file or directory'):
        export.load_classifier(str(tmp_path / 'nowhere'))


def test_fit_converts_channels_and_resizes():
    grey = np.arange(4, dtype=np.uint8).reshape(2, 2, 1)
    np.testing.assert_array_equal(predict.fit(grey, (2, 2, 3), False, 'g'), np.repeat(grey, 3, -1))
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 1] = 100   # luma 0.587 * 100
    np.testing.assert_array_equal(predict.fit(rgb, (2, 2, 1), False, 'c'), np.full((2, 2, 1), 59))
    flat = np.full((4, 6, 1), 77, np.uint8)
    np.testing.assert_array_equal(predict.fit(flat, (2, 3, 1), True, 'f'), np.full((2, 3, 1), 77))


def test_progress_every_tenth(tmp_path):
    import io
    stream = io.StringIO()
    progress = predict.Progress(1000, stream)
    for done in range(100, 1001, 50):
        progress(done)
    assert stream.getvalue().count('\n') == 10 and '1000/1000 images (100%)' in stream.getvalue()


def test_evaluate_reproduces_the_runs_accuracy(run_dir, tmp_path):
    from ssl_ema import evaluate
    result = evaluate.evaluate(evaluate.EvaluateConfig(train_dir=run_dir), log=quiet)
    summary = json.load(open(os.path.join(run_dir, 'accuracy.json')))
    for model in ('raw', 'ema'):
        assert result[model]['accuracy'] == summary[model]['test']['last']
        confusion = np.array(result[model]['confusion'])
        assert confusion.sum() == result['images'] == 540
        assert 100 * np.trace(confusion) / 540 == pytest.approx(result[model]['accuracy'])
    assert os.path.getsize(os.path.join(run_dir, 'evaluation', 'digits.png')) > 1000
    # Another dataset of the same classes: the first 100 test digits, as npz.
    from ssl_ema import data
    a = data.load('digits')
    np.savez(tmp_path / 'd.npz', x_train=a.x_train, y_train=a.y_train, x_test=a.x_test[:100],
             y_test=a.y_test[:100])
    other = evaluate.evaluate(evaluate.EvaluateConfig(
        train_dir=run_dir, dataset=f'npz:{tmp_path}/d.npz', out=str(tmp_path / 'e')), log=quiet)
    assert other['images'] == 100 and os.path.exists(tmp_path / 'e.png')
    np.savez(tmp_path / 'rgb.npz', x_train=np.repeat(a.x_train, 3, -1), y_train=a.y_train)
    with pytest.raises(DataError, match=r'classifies 10 classes of \(8, 8, 1\)'):
        evaluate.evaluate(evaluate.EvaluateConfig(train_dir=run_dir,
                                                  dataset=f'npz:{tmp_path}/rgb.npz'), log=quiet)


def test_a_recompute_run_exports_its_reestimated_statistics(digits_data, tmp_path):
    """--ema_bn=recompute: the checkpointed EMA holds the student's batch-norm statistics; the
    export (and ssl_ema.evaluate, which shares it) re-estimates them for the EMA weights over the
    Trainer's batches, so it reproduces the in-training evaluation of the EMA model."""
    import keras
    import tensorflow as tf
    from ssl_ema import evaluate
    from conftest import run
    from ssl_ema.core.loop import Trainer
    train_dir = str(tmp_path / 'run')
    cfg = tiny_config(algorithm='supervised', train_steps=20, ema_bn='recompute',
                      ema_bn_batches=2, train_dir=train_dir)
    run(cfg, algorithms.ALGORITHMS['supervised'](), log=quiet)
    trainer = Trainer(cfg, algorithms.ALGORITHMS['supervised'](), digits_data, train_dir)
    assert trainer.restore() == 20
    x = trainer.eval_arrays['test'][0]
    as_checkpointed = tf.nn.softmax(trainer.ema.model(x, training=False)).numpy()
    with trainer._evaluation_statistics('ema'):
        as_evaluated = tf.nn.softmax(trainer.ema.model(x, training=False)).numpy()
    assert np.abs(as_evaluated - as_checkpointed).max() > 1e-3   # the statistics matter here
    images = digits_data.arrays.x_test
    exported = keras.saving.load_model(os.path.join(train_dir, 'export', 'model.keras'))
    np.testing.assert_allclose(exported(images).numpy(), as_evaluated, atol=1e-5)
    result = evaluate.evaluate(evaluate.EvaluateConfig(train_dir=train_dir), log=quiet)
    summary = json.load(open(os.path.join(train_dir, 'accuracy.json')))
    assert result['ema']['accuracy'] == summary['ema']['test']['last']


def test_confusion_matrix_by_hand():
    from ssl_ema.evaluate import confusion_matrix
    got = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    np.testing.assert_array_equal(got, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
