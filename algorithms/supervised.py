"""Supervised baseline: the labeled cross-entropy only; unlabeled images are never read."""
from ssl_ema.algorithms.base import Algorithm, Losses, forward, register


@register('supervised')
class Supervised(Algorithm):
    views = ()

    def __call__(self, student, teacher, batch):
        xe, _ = forward(student, batch)
        return Losses(xe, 0. * xe)
