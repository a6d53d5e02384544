"""`python -m ssl_ema.bench_step`: the developer benchmark in ssl_ema/bench/step.py."""
from absl import app, flags

from ssl_ema.bench import step

if __name__ == '__main__':
    flags.adopt_module_key_flags(step)   # --help lists its flags
    app.run(step.main)
