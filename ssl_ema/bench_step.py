"""`python -m ssl_ema.bench_step`: the developer benchmark in ssl_ema/bench/step.py."""
from absl import app

from ssl_ema.bench.step import main

if __name__ == '__main__':
    app.run(main)
