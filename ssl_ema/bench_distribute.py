"""`python -m ssl_ema.bench_distribute`: the developer benchmark in ssl_ema/bench/distribute.py."""
from absl import app

from ssl_ema.bench.distribute import main

if __name__ == '__main__':
    app.run(main)
