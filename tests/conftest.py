import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope='session')
def digits_data():
    """The embedded digits with 50 labels (seed 1), built once for the whole session."""
    from ssl_ema import data
    return data.build('digits', labels=50, valid=200, seed=1)


@pytest.fixture(scope='session')
def kink_free_backbone(tmp_path_factory):
    """`keras:PATH` of a digits backbone whose outputs are smooth functions of its weights: three
    3x3 convolutions (16, 32, 64 channels; the second strided), each with batch norm and softplus,
    no ReLU-type kink, no max-pool (the toolkit adds pooling and the head). Where two runs sum in
    another order (XLA, two replicas), small_cnn's weights 1e-7 apart sometimes put an activation
    on the other side of a LeakyReLU's kink or swap a max-pool window's two largest inputs, and a
    derivative jumps there: tests that compare two summation orders to 1e-4 compare on this."""
    import keras
    path = str(tmp_path_factory.mktemp('backbone') / 'kink_free.keras')
    inputs = keras.Input((8, 8, 1))
    x = inputs
    for filters, stride in ((16, 1), (32, 2), (64, 1)):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding='same', use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Activation('softplus')(x)
    keras.Model(inputs, x).save(path)
    return 'keras:' + path


def tiny_config(**overrides):
    """A TrainConfig for fast tests: small batches, few steps, every setting overridable."""
    from ssl_ema.base.config import TrainConfig
    settings = dict(batch=16, uratio=2, train_steps=40, eval_every_kimg=0.3125,
                    log_every_steps=10, arch='small_cnn')
    settings.update(overrides)
    return TrainConfig(**settings)


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def quiet(*args):
    pass


def script_over_names(script, args, names, timeout, processes=2):
    """`python -c script *args *names` run as `processes` processes at once, each over a share of
    `names` (tracing and XLA compiling are mostly one thread: two processes use two cores), each
    printing one JSON dict as its last line; returns the dicts merged."""
    import json
    import subprocess
    import sys
    shares = [names[i::processes] for i in range(processes) if names[i::processes]]
    running = [subprocess.Popen([sys.executable, '-c', script, *args, *share],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for share in shares]
    merged = {}
    for process in running:
        out, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, err[-3000:]
        merged.update(json.loads(out.strip().splitlines()[-1]))
    return merged


def straight_and_resumed(cfg, algorithm, data, tmp_path, stop_at):
    """Train `cfg` straight through in tmp_path/straight, and in tmp_path/resumed stopped at step
    `stop_at` (a KeyboardInterrupt from the log line, as Ctrl-C) then continued by a new Trainer
    from the checkpoint. Returns (straight Trainer, resumed Trainer, the resumed run's summary)."""
    from ssl_ema.core.loop import Trainer
    straight = Trainer(cfg, algorithm, data, str(tmp_path / 'straight'))
    straight.train(log=quiet)

    def interrupt(line):
        if line.startswith(f'step {stop_at}/'):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, algorithm, data, str(tmp_path / 'resumed')).train(log=interrupt)
    resumed = Trainer(cfg, algorithm, data, str(tmp_path / 'resumed'))
    assert resumed.restore() == stop_at
    summary = resumed.train(log=quiet)
    assert int(resumed.step.numpy()) == cfg.total_steps
    return straight, resumed, summary


def run(cfg, algorithm, log=quiet, **kwargs):
    """A whole training run as `python -m ssl_ema.train` makes it (core/fitting.fit): its
    accuracy summary (accuracy.json)."""
    from ssl_ema.core import fitting, run_dir
    return run_dir.read_summary(fitting.fit(cfg, algorithm, log=log, **kwargs))


def logged_values(lines, key):
    """The values of `key=` in the training log's lines."""
    return [float(line.split(f' {key}=')[1].split()[0]) for line in lines if f' {key}=' in line]


def check_learns(cfg, algorithm, data, tmp_path):
    """Train `cfg`: the labeled loss falls below half its first value, the unlabeled loss is
    alive (positive and changing: USB's Mean Teacher's was always zero), and both the raw and the
    EMA model reach 60% on the test set (chance is 10% on digits). Returns the summary."""
    from ssl_ema.core.loop import Trainer
    logged = []
    summary = Trainer(cfg, algorithm, data, str(tmp_path)).train(log=logged.append)
    labeled, unlabeled = logged_values(logged, 'labeled'), logged_values(logged, 'unlabeled')
    assert np.mean(labeled[-3:]) < 0.5 * labeled[0], labeled
    assert max(unlabeled) > 0 and len(set(unlabeled)) > 5, unlabeled
    assert summary['ema']['test']['last'] > 60, summary
    assert summary['raw']['test']['last'] > 60, summary
    return summary


def check_resumes(cfg, algorithm, data, tmp_path, stop_at):
    """straight_and_resumed: the resumed run ends with the straight one's weights and algorithm
    state. Returns the straight Trainer."""
    straight, resumed, _ = straight_and_resumed(cfg, algorithm, data, tmp_path, stop_at)
    for a, b in zip(weights_of(straight.student), weights_of(resumed.student)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for key, value in straight.state.items():
        np.testing.assert_allclose(np.array(resumed.state[key]), np.array(value), rtol=1e-5)
    return straight


def assert_resumed_exactly(straight, resumed):
    """The resumed run ended where the straight one did: the student's weights, the algorithm's
    heads (ABC's, ACR's, ...), the EMA teacher's averaged heads (when it carries them) and the
    algorithm's state."""
    def weights(t):
        return (weights_of(t.student) + [np.array(v) for v in t.head_variables]
                + [np.array(v) for v in t.ema.head_variables])
    ours, theirs = weights(straight), weights(resumed)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for key, value in straight.state.items():
        np.testing.assert_allclose(np.array(resumed.state[key]), np.array(value), rtol=1e-4,
                                   atol=1e-6)
