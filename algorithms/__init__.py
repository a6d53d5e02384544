"""SSL algorithms (installed as `ssl_ema.algorithms`): one module each, found automatically.

Adding an algorithm is adding a module here that defines a class decorated with `@register`.
"""
import importlib
import pkgutil

from ssl_ema.algorithms.base import ALGORITHMS, Algorithm, Batch, Losses, create, forward, register

for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg:   # pretraining/: the self-supervised methods, a registry of their own
        continue
    importlib.import_module(f'{__name__}.{_module.name}')

from ssl_ema.algorithms.base import define_algorithm_flags  # noqa: E402

define_algorithm_flags()
