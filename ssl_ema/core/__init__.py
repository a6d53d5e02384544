"""The library: the training loop, the EMA and other averages, evaluation, the run directory,
the exported classifier, post-hoc EMA, the NaN guard and distribution. Never imports a command."""
