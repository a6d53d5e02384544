"""Post-hoc EMA (Karras et al. 2024, Algorithm 3): the least squares by hand, a reconstruction
against a profile tracked directly, and the command on a tiny run."""
import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

from conftest import tiny_config
from ssl_ema import algorithms
from ssl_ema.core import posthoc, snapshots
from ssl_ema.base.errors import ConfigError
from ssl_ema.core.ema import PowerEMA, sigma_rel_to_gamma
from conftest import run


def test_profile_inner_product_by_hand():
    # p_{1,0} = 1 on (0, 1], p_{2,0} = 1/2 on (0, 2]: <p_1, p_2> = 1 * 1/2 over (0, 1] = 1/2
    assert posthoc.profile_inner_product(1., 0., 2., 0.) == pytest.approx(0.5)
    # p_{2,1}(s) = s / 2 on (0, 2]: <p_{2,1}, p_{2,1}> = integral of s^2 / 4 over (0, 2] = 2/3
    assert posthoc.profile_inner_product(2., 1., 2., 1.) == pytest.approx(2 / 3)


def test_reconstruction_coefficients_on_a_hand_sized_case():
    """Snapshots of the uniform profile (gamma 0) at t=1 and t=2, target gamma=1 at t=2:
    A = [[1, 1/2], [1/2, 1/2]], b = [<p_{1,0}, s/2>, <p_{2,0}, s/2>] = [1/4, 1/2], so
    x = [-1/2, 3/2]: 3/4 on (1, 2] and 1/4 on (0, 1], the means of s/2 on each half."""
    x = posthoc.reconstruction_coefficients([1., 2.], [0., 0.], 2., 1.)
    np.testing.assert_allclose(x, [-0.5, 1.5], atol=1e-12)


def test_sigma_rel_to_gamma_matches_karras_values():
    # Karras et al. 2024 (Sec. 3.1): sigma_rel 0.10 <-> gamma 6.94, sigma_rel 0.05 <-> 16.97
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    g = sigma_rel_to_gamma(0.2)
    assert ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 == pytest.approx(0.2)


def test_reconstruction_matches_a_profile_tracked_directly(tmp_path):
    """Profiles sigma_rel 0.05 and 0.10 snapshotted every 20 of 400 steps rebuild the
    sigma_rel 0.07 EMA tracked alongside them to within 0.01, on weights that wander over a
    range of ~40 (standard deviation ~12), while either tracked profile is > 1 away from it."""
    inputs = keras.Input((1,))
    student = keras.Model(inputs, keras.layers.Dense(5, use_bias=False)(inputs))
    tracked = [PowerEMA(student, s) for s in (0.05, 0.10)]
    direct = PowerEMA(student, 0.07)
    rng = np.random.RandomState(0)
    steps = 400
    trajectory = (np.cumsum(rng.normal(0., 1., (steps, 5)), 0)
                  + 5. * np.sin(np.arange(1, steps + 1) / 30.)[:, None]).astype(np.float32)
    for t in range(1, steps + 1):
        student.weights[0].assign(trajectory[t - 1][None])
        for average in tracked + [direct]:
            average.update()
        if t % 20 == 0:
            snapshots.save_snapshot(str(tmp_path), t, tracked)
    snapshot_steps, sigma_rels, weights = snapshots.load_snapshots(str(tmp_path))
    assert len(snapshot_steps) == 40 and sorted(set(sigma_rels)) == [0.05, 0.1]
    x = posthoc.reconstruction_coefficients(
        snapshot_steps, [sigma_rel_to_gamma(s) for s in sigma_rels], steps, direct.gamma)
    rebuilt = posthoc.reconstruct(weights, x)[0]
    expected = np.array(direct.model.weights[0])
    np.testing.assert_allclose(rebuilt, expected, atol=0.01)
    for average in tracked:
        assert np.abs(np.array(average.model.weights[0]) - expected).max() > 1.


def test_resumed_run_drops_snapshots_newer_than_its_checkpoint(tmp_path):
    (tmp_path / snapshots.SNAPSHOTS).mkdir()
    for step in (8, 16, 24):
        (tmp_path / snapshots.SNAPSHOTS / f'snapshot-{step:08d}.npz').write_bytes(b'x')
    snapshots.remove_snapshots_after(str(tmp_path), 16)
    assert sorted(os.listdir(tmp_path / snapshots.SNAPSHOTS)) == ['snapshot-00000008.npz',
                                                                 'snapshot-00000016.npz']


def test_posthoc_sweep_on_a_tiny_run(tmp_path):
    train_dir = str(tmp_path / 'run')
    cfg = tiny_config(algorithm='supervised', train_steps=40, posthoc_snapshot_every_kimg=0.125,
                      input_norm='plus_minus_one',   # the sweep must normalise as the run did
                      train_dir=train_dir)   # a snapshot every 8 steps of 16 images
    run(cfg, algorithms.ALGORITHMS['supervised'](), log=lambda *a: None)
    assert sorted(os.listdir(os.path.join(train_dir, snapshots.SNAPSHOTS))) == [
        f'snapshot-{s:08d}.npz' for s in (8, 16, 24, 32, 40)]
    summary = posthoc.sweep(train_dir, [0.05, 0.1, 0.2], log=lambda *a: None)
    saved = json.loads((tmp_path / 'run' / 'posthoc.json').read_text())
    assert saved == json.loads(json.dumps(summary))
    assert [r['sigma_rel'] for r in saved['sweep']] == [0.05, 0.1, 0.2]
    assert saved['best']['valid'] == max(r['valid'] for r in saved['sweep'])
    assert saved['step'] == 40 and saved['snapshots'] == 5
    assert os.path.exists(saved['best']['weights'])
    # exported like any classifier: uint8 images in, class probabilities out
    import keras
    keras_file = os.path.join(saved['best']['export'], 'model.keras')
    with zipfile.ZipFile(keras_file) as archive:   # stock layers: loads without ssl_ema
        assert 'ssl_ema' not in archive.read('config.json').decode()
    exported = keras.saving.load_model(keras_file)
    images = np.random.RandomState(0).randint(0, 256, (4, *exported.input_shape[1:]), np.uint8)
    probabilities = np.array(exported(images))
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(-1), 1., rtol=1e-5)
    # ... and it is the model the sweep chose: its test accuracy on the raw test images
    from ssl_ema import data
    digits = data.load('digits')
    predicted = np.argmax(exported(digits.x_test), -1)
    assert 100 * np.mean(predicted == digits.y_test) == pytest.approx(saved['best']['test'])


def test_posthoc_keeps_the_students_statistics_with_ema_bn_student(tmp_path):
    """--ema_bn=student: the profiles copy the student's batch-norm statistics instead of
    averaging them, so a reconstruction takes them from the last snapshot; a least-squares mix of
    older statistics (sigma_rel 0.01 lies far outside the tracked 0.05 and 0.1: coefficients of
    both signs) could even turn a variance negative."""
    from ssl_ema.nn import backbones
    train_dir = str(tmp_path / 'run')
    run(tiny_config(algorithm='supervised', train_steps=24, posthoc_snapshot_every_kimg=0.125,
                    ema_bn='student', train_dir=train_dir),
        algorithms.ALGORITHMS['supervised'](), log=lambda *a: None)
    summary = posthoc.sweep(train_dir, [0.01], log=lambda *a: None)
    model = backbones.build('small_cnn', (8, 8, 1), 10, portable=True)
    model.load_weights(summary['best']['weights'])
    steps, _, weights = snapshots.load_snapshots(train_dir)
    final, first = weights[int(np.argmax(steps))], weights[0]
    statistics = [k for k, v in enumerate(model.weights) if not v.trainable]
    assert statistics and any(not np.allclose(final[k], first[k]) for k in statistics)
    for k in statistics:
        np.testing.assert_array_equal(model.weights[k].numpy(), final[k])


def test_posthoc_without_snapshots_is_a_one_line_error(tmp_path):
    train_dir = str(tmp_path / 'run')
    run(tiny_config(algorithm='supervised', train_steps=10, train_dir=train_dir),
        algorithms.ALGORITHMS['supervised'](), log=lambda *a: None)
    with pytest.raises(ConfigError, match='posthoc_snapshot_every_kimg'):
        posthoc.sweep(train_dir, [0.1])
    out = subprocess.run([sys.executable, '-m', 'ssl_ema.posthoc', f'--train_dir={tmp_path}/none'],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith('error: --train_dir=')
    assert 'Traceback' not in out.stderr
