import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope='session')
def digits_data():
    """The embedded digits with 50 labels (seed 1), built once for the whole session."""
    from ssl_ema import data
    return data.build('digits', labels=50, valid=200, seed=1)


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
