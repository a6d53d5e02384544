"""Self-supervised pretraining methods (installed as `ssl_ema.algorithms.pretraining`): one module
each, found automatically, registered with `@register` as the SSL algorithms are; the loop is
ssl_ema/core/pretraining.py, the command `python -m ssl_ema.pretrain`."""
import importlib
import pkgutil

from ssl_ema.algorithms.pretraining.base import METHODS, Losses, Method, create, register  # noqa: F401

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f'{__name__}.{_module.name}')

from ssl_ema.algorithms.pretraining.base import define_method_flags  # noqa: E402

define_method_flags()
