"""The self-training round (ssl_ema.distill): pseudo-labels are the teacher's, the student learns
them, a round resumes exactly, and bad teachers are refused in one line."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import quiet, tiny_config, weights_of
from ssl_ema import algorithms
from ssl_ema.algorithms.distillation import ROUNDS
from ssl_ema.base.errors import ConfigError
from ssl_ema.core import distilling, fitting, pool, run_dir


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    """A finished Mean Teacher run on digits (50 labels)."""
    cfg = tiny_config(algorithm='mean_teacher', train_steps=200, eval_every_kimg=1.5625,
                      train_dir=str(tmp_path_factory.mktemp('teacher') / 'run'))
    return fitting.fit(cfg, algorithms.ALGORITHMS['mean_teacher'](), log=quiet)


def distill(teacher_dir, train_dir, steps=60, log=quiet, **hyperparameters):
    cfg = tiny_config(train_steps=steps, eval_every_kimg=0.46875)   # evaluations every 30 steps
    return distilling.distill(cfg, ROUNDS['distill'](**hyperparameters), teacher_dir, log=log,
                              train_dir=str(train_dir))


def test_pseudo_labels_are_the_teachers_predictions(teacher, tmp_path):
    import ssl_ema
    student = ssl_ema.distill(teacher, log=quiet, train_steps=30, batch=16, uratio=2,
                              arch='small_cnn', train_dir=str(tmp_path / 'round'),
                              pseudo_labels='hard', per_class=20).train_dir
    with np.load(os.path.join(student, distilling.PSEUDO_LABELS)) as z:
        probs, targets, weights = z['probabilities'], z['targets'], z['weights']
    # The teacher's exported EMA classifier (uint8 images in) on the pool, image by image.
    from ssl_ema.core.classifier import load_classifier
    exported = load_classifier(os.path.join(teacher, 'export'))
    data = run_dir.open_run_dir(teacher).dataset()
    split = data.split
    x = data.arrays.x_train[split.unlabeled]
    np.testing.assert_allclose(probs, exported.predict(x), atol=1e-5)
    np.testing.assert_array_equal(targets.argmax(1), probs.argmax(1))
    assert set(np.unique(targets)) == {0., 1.}
    # Class-balanced: at most 20 of each predicted class, the most confident ones.
    predicted = probs.argmax(1)
    for c in range(10):
        members = predicted == c
        assert weights[members].sum() == min(20, members.sum())
        if members.sum() > 20:
            kept, dropped = probs.max(1)[members & (weights == 1)], probs.max(1)[members & (weights == 0)]
            assert kept.min() >= dropped.max()
    flags = json.loads(open(os.path.join(student, run_dir.RECORD)).read())
    assert flags['teacher']['train_dir'] == os.path.abspath(teacher)
    assert flags['config']['labels'] == 50 and flags['config']['algorithm'] == 'distill'


def test_flip_averaged_pool_predictions():
    """Where flips keep the class, each pool image's label is the mean of its and its mirror's."""
    import keras
    from ssl_ema import data
    rng = np.random.RandomState(0)
    arrays = data.from_arrays(rng.randint(0, 256, [60, 8, 8, 1]).astype(np.uint8),
                              np.arange(60) % 3)
    ssl = data.build(arrays, labels=9, valid=0, seed=1)
    assert arrays.flip
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    x = ssl.pool_images()[0:len(ssl.pool_images())]
    softmax = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)
    expected = (softmax(model.predict(x, verbose=0))
                + softmax(model.predict(x[:, :, ::-1], verbose=0))) / 2
    np.testing.assert_allclose(pool.predict_pool(model, ssl), expected, atol=1e-5)
    assert not np.allclose(pool.predict_pool(model, ssl, flip=False), expected, atol=1e-3)


def test_soft_pseudo_labels_and_temperature():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    targets, weights = pool.pseudo_labels(probs)
    np.testing.assert_allclose(targets, probs, rtol=1e-6)
    sharp, _ = pool.pseudo_labels(probs, temperature=0.5)
    np.testing.assert_allclose(sharp[0], np.array([36, 9, 1]) / 46, rtol=1e-6)
    assert weights.tolist() == [1, 1]


def test_a_distilled_student_learns_its_teacher(teacher, tmp_path):
    student = distill(teacher, tmp_path / 'round', steps=300)
    teacher_acc = run_dir.read_summary(teacher)['ema']['test']['last']
    student_acc = run_dir.read_summary(student)['ema']['test']['last']
    assert student_acc >= teacher_acc - 1., (teacher_acc, student_acc)
    from ssl_ema.core.classifier import load_classifier
    data = run_dir.open_run_dir(teacher).dataset()
    x = data.arrays.x_train[data.split.unlabeled]
    agree = (load_classifier(os.path.join(student, 'export')).predict(x).argmax(1)
             == load_classifier(os.path.join(teacher, 'export')).predict(x).argmax(1)).mean()
    assert agree >= 0.95, agree


def test_an_interrupted_round_resumes_to_the_same_weights(teacher, tmp_path):
    straight = distill(teacher, tmp_path / 'straight', steps=60)

    def interrupt(line):
        if line.startswith('step 40/'):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, tmp_path / 'resumed', steps=60, log=interrupt)
    logged = []
    resumed = distill(teacher, tmp_path / 'resumed', steps=60, log=logged.append)
    assert any(line.startswith('Resuming') for line in logged)
    assert not any(line.startswith('labelled the pool') for line in logged)   # read back
    import keras
    a, b = (keras.saving.load_model(os.path.join(d, 'export', 'model.keras'))
            for d in (straight, resumed))
    assert len(a.weights) > 4
    for x, y in zip(weights_of(a), weights_of(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_bad_teachers_are_refused_in_one_line(teacher, tmp_path):
    def refused(teacher_dir, **settings):
        with pytest.raises(ConfigError) as e:
            cfg = tiny_config(train_steps=10, **settings)
            distilling.distill(cfg, ROUNDS['distill'](), teacher_dir, log=quiet,
                               train_dir=str(tmp_path / 'student'),
                               explicit=tuple(settings))
        assert '\n' not in str(e.value)
        return str(e.value)

    assert 'no such directory' in refused(str(tmp_path / 'missing'))
    assert 'is not a training run directory' in refused(str(tmp_path))
    unfinished = tmp_path / 'unfinished'
    shutil.copytree(teacher, unfinished)
    summary = json.loads((unfinished / 'accuracy.json').read_text())
    (unfinished / 'accuracy.json').write_text(json.dumps(dict(summary, step=100)))
    assert 'is unfinished (step 100 of 200)' in refused(str(unfinished))
    assert "differs from the teacher's --labels=50" in refused(teacher, labels=100)
    assert "differs from the teacher's --dataset=digits" in refused(teacher, dataset='fashion_mnist')

    # A round started from a teacher that then changed (retrained, other checkpoint) is refused.
    changing = tmp_path / 'changing'
    shutil.copytree(teacher, changing)
    distill(str(changing), tmp_path / 'round', steps=10)
    flags = json.loads((changing / 'flags.json').read_text())
    flags['algorithm']['consistency_weight'] = 1.5
    (changing / 'flags.json').write_text(json.dumps(flags))
    with pytest.raises(ConfigError, match='changed after the round'):
        distill(str(changing), tmp_path / 'round', steps=10)


def test_distill_from_python_refuses_an_unknown_setting(teacher):
    import ssl_ema
    with pytest.raises(ConfigError, match=r'distill\(confidence_threshold=...\) is not a '):
        ssl_ema.distill(teacher, confidence_threshold=0.9)


def test_distill_command_refuses_a_missing_teacher(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'ssl_ema.distill',
                          f'--teacher_run={tmp_path / "nope"}'], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == f'error: --teacher_run={tmp_path / "nope"}: no such directory'
