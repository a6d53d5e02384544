"""What tracking extra EMA horizons costs per training step (a benchmark, not a test).

    python -m ssl_ema.bench_ema [--archs=small_cnn,wrn28_2] [--steps=40] [--rounds=5]

For each backbone, two trainers on --dataset (default the embedded digits; Mean Teacher, batch
32 + 128 unlabeled, the CPU protocol's step): one tracking the teacher's EMA only, one with two
extra horizons (--ema_decays=0.99,0.9999: three in all). Both compiled steps are timed in
alternating rounds of --steps steps, so a busy machine slows both alike; the medians of steps/s
(wall clock) and of CPU seconds per step (process time, all threads: less sensitive to other
jobs on a shared machine) and their ratios are printed with the CPU's name. More precise than
the difference of two noisy step times: the time of the two extra averages' update alone, as a
share of the step (an upper bound: it pays a function call of its own). The digits are 8x8: the
step's own compute is far smaller than at 32x32 while the EMA's cost (one update per variable)
is the same, so the share on digits is a pessimistic bound for CIFAR-sized images.
"""
import dataclasses
import subprocess
import tempfile
import time

import numpy as np
from absl import app, flags

flags.DEFINE_list('archs', ['small_cnn', 'wrn28_2'], 'Backbones to time.')
flags.DEFINE_integer('steps', 40, 'Training steps per timed round.')
flags.DEFINE_integer('rounds', 5, 'Alternating timed rounds per configuration.')
flags.DEFINE_string('dataset', 'digits', 'Dataset whose images are trained on (digits: 8x8; '
                    'fashion_mnist: 28x28, closer to the published 32x32).')
FLAGS = flags.FLAGS
EXTRA = '0.99,0.9999'


def cpu_name() -> str:
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        return next(l.split(':', 1)[1].strip() for l in out.splitlines()
                    if l.startswith('Model name'))
    except (OSError, StopIteration):
        return 'unknown CPU'


def time_horizons(arch: str, steps: int, rounds: int, dataset: str = 'digits') -> dict:
    """{'1': (steps/s, CPU s/step), '3': ...} (medians over rounds) and 'update': the extra
    averages' update alone (update_seconds), for one backbone."""
    from ssl_ema import algorithms, data
    from ssl_ema.base.config import TrainConfig
    from ssl_ema.core.loop import Trainer
    base = TrainConfig(arch=arch, dataset=dataset, train_steps=10 * steps * rounds)
    dataset = data.build(dataset, labels=50, valid=200, seed=1)
    trainers, iterators = {}, {}
    for label, decays in (('1', ''), ('3', EXTRA)):
        cfg = dataclasses.replace(base, ema_decays=decays)
        trainer = Trainer(cfg, algorithms.create('mean_teacher'), dataset, tempfile.mkdtemp())
        trainers[label], iterators[label] = trainer, trainer.batches(0)
        for _ in range(3):   # compile and warm up
            trainer.train_step(iterators[label])
    rates = {label: [] for label in trainers}
    for _ in range(rounds):
        for label, trainer in trainers.items():
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                out = trainer.train_step(iterators[label])
            float(out['loss/total'])   # wait for the last step
            rates[label].append((steps / (time.perf_counter() - start),
                                 (time.process_time() - cpu) / steps))
    result = {label: tuple(np.median(r, axis=0)) for label, r in rates.items()}
    result['update'] = update_seconds(trainers['3'], steps * rounds)
    return result


def update_seconds(trainer, calls: int) -> float:
    """Wall seconds of one update of the trainer's extra averages alone (every average but the
    teacher), compiled as one function: an upper bound of what they add to a step, where the
    same update runs inside the step's graph without a function call of its own."""
    import tensorflow as tf
    extra = [a for a in trainer._all_averages() if a is not trainer.ema]
    update = tf.function(lambda: [a.update() for a in extra])
    update()   # trace
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            update()
        float(extra[0].updates.numpy())   # wait for the last update
        times.append((time.perf_counter() - start) / calls)
    return float(np.median(times))


def main(argv):
    import tensorflow as tf
    tf.get_logger().setLevel('ERROR')
    print(f'CPU: {cpu_name()}; Mean Teacher on {FLAGS.dataset}, batch 32+128; median of '
          f'{FLAGS.rounds} alternating rounds of {FLAGS.steps} steps')
    print(f'{"arch":<10} {"steps/s: 1 EMA":>15} {"3 EMAs":>7} {"3/1":>6} | '
          f'{"CPU ms/step: 1 EMA":>18} {"3 EMAs":>7} {"3/1":>6} | '
          f'{"2 extra updates alone: ms":>25} {"% of step":>9}')
    for arch in FLAGS.archs:
        timed = time_horizons(arch, FLAGS.steps, FLAGS.rounds, FLAGS.dataset)
        (w1, c1), (w3, c3), update = timed['1'], timed['3'], timed['update']
        print(f'{arch:<10} {w1:15.2f} {w3:7.2f} {w3 / w1:6.3f} | '
              f'{1e3 * c1:18.1f} {1e3 * c3:7.1f} {c3 / c1:6.3f} | '
              f'{1e3 * update:25.2f} {100 * update * w1:8.1f}%', flush=True)


if __name__ == '__main__':
    app.run(main)
