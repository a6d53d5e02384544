"""ssl_ema: semi-supervised image classification on TensorFlow 2, built around an EMA teacher.

The Python API (ssl_ema/api.py): `ssl_ema.fit(...)` trains, `ssl_ema.open_run(dir)` opens a run,
`ssl_ema.pretrain(...)` pretrains a backbone without labels (BYOL, DINO), `ssl_ema.distill(run)`
trains a self-training round from a finished run,
`ssl_ema.data.from_arrays(...)` makes a dataset of in-memory arrays; errors are
`ssl_ema.ConfigError`, `ssl_ema.DataError` and `ssl_ema.RunError`. They load on first use, so
`import ssl_ema` stays light and the package's own modules can import each other freely.
"""
import importlib
import os

# TensorFlow's C++ start-up chatter (CPU feature notices, oneDNN) hides the progress lines;
# users who want it set TF_CPP_MIN_LOG_LEVEL themselves.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

__version__ = '0.2.0'
_API = {'fit': 'ssl_ema.api', 'open_run': 'ssl_ema.api', 'Run': 'ssl_ema.api',
        'pretrain': 'ssl_ema.api', 'Pretraining': 'ssl_ema.api', 'distill': 'ssl_ema.api',
        'ConfigError': 'ssl_ema.base.errors', 'DataError': 'ssl_ema.base.errors',
        'RunError': 'ssl_ema.base.errors'}
__all__ = sorted(_API) + ['data']


def __getattr__(name):   # PEP 562: resolved on first use
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name in ('data', 'algorithms'):
        return importlib.import_module(f'ssl_ema.{name}')
    raise AttributeError(f'module ssl_ema has no attribute {name}')
