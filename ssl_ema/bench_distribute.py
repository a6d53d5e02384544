"""`python -m ssl_ema.bench_distribute`: the developer benchmark in ssl_ema/bench/distribute.py."""
from absl import app, flags

from ssl_ema.bench import distribute

if __name__ == '__main__':
    flags.adopt_module_key_flags(distribute)   # --help lists its flags
    app.run(distribute.main)
