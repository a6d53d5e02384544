"""`python -m ssl_ema.bench_ema`: the developer benchmark in ssl_ema/bench/ema.py."""
from absl import app

from ssl_ema.bench.ema import main

if __name__ == '__main__':
    app.run(main)
