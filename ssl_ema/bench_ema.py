"""`python -m ssl_ema.bench_ema`: the developer benchmark in ssl_ema/bench/ema.py."""
from absl import app, flags

from ssl_ema.bench import ema

if __name__ == '__main__':
    flags.adopt_module_key_flags(ema)   # --help lists its flags
    app.run(ema.main)
