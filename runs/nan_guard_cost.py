"""What the NaN/Inf guard (ssl_ema/core/guard.py) costs per training step: steps/s with and without it.

    python runs/nan_guard_cost.py --arch=small_cnn --batch=32 --uratio=4 --steps=40 --repeats=7
                                  [--algorithm=mean_teacher --dataset=digits]

Two trainers, identical but for the guard's per-step check (replaced by nothing in the second),
time `--steps` compiled steps in turn, `--repeats` times each, alternating so that load from
other processes falls on both alike. Prints the CPU, both medians and their ratio. The smallest
model is the worst case: the guard's few scalar ops are a fixed cost.
"""
import statistics
import sys
import tempfile
import time

from absl import app, flags

from ssl_ema import algorithms, data
from ssl_ema.base.config import TrainConfig
from ssl_ema.data.bench import cpu_model
from ssl_ema.core.guard import NonFiniteGuard
from ssl_ema.core.loop import Trainer

# --steps (per repetition), --batch, --uratio and --arch are ssl_ema.data.bench's flags.
flags.DEFINE_integer('repeats', 7, 'Timed repetitions of each trainer (alternating).')
flags.DEFINE_string('algorithm', 'mean_teacher', "As ssl_ema.train's --algorithm.")
flags.DEFINE_string('dataset', 'digits', "As ssl_ema.train's --dataset.")
FLAGS = flags.FLAGS


class NoGuard(NonFiniteGuard):
    def observe(self, metrics, step):
        pass


def main(argv):
    del argv
    cfg = TrainConfig(algorithm=FLAGS.algorithm, arch=FLAGS.arch, dataset=FLAGS.dataset,
                      batch=FLAGS.batch, uratio=FLAGS.uratio, train_steps=10 ** 6)
    dataset = data.build(cfg.dataset, cfg.labels, cfg.valid, cfg.seed, cfg.augment)
    trainers = {}
    for label, guard in (('with guard', NonFiniteGuard), ('without', NoGuard)):
        from ssl_ema.core import loop
        loop.NonFiniteGuard = guard   # what Trainer builds
        trainer = Trainer(cfg, algorithms.create(cfg.algorithm), dataset, tempfile.mkdtemp())
        iterator = trainer.batches(0)
        for _ in range(5):   # trace and warm up
            trainer.train_step(iterator)
        trainers[label] = trainer, iterator
    times = {label: [] for label in trainers}
    cpu = {label: [] for label in trainers}   # steps per CPU-second: less sensitive to other load
    for _ in range(FLAGS.repeats):
        for label, (trainer, iterator) in trainers.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(FLAGS.steps):
                metrics = trainer.train_step(iterator)
            float(metrics['loss/total'])   # wait for the last step
            times[label].append(FLAGS.steps / (time.perf_counter() - start))
            cpu[label].append(FLAGS.steps / (time.process_time() - start_cpu))
    print(f'{cpu_model()}; {cfg.algorithm}, {cfg.arch}, {cfg.dataset}, batch {cfg.batch}+'
          f'{cfg.batch * cfg.uratio}; {FLAGS.repeats} x {FLAGS.steps} steps each, alternating')
    median = {label: statistics.median(v) for label, v in times.items()}
    for label, v in times.items():
        print(f'{label:>11}: median {median[label]:.1f} steps/s (min {min(v):.1f}, max {max(v):.1f})')
    print(f'steps/s with / without the guard: {median["with guard"] / median["without"]:.3f} '
          f'(median), {max(times["with guard"]) / max(times["without"]):.3f} (best)')
    cpu = {label: statistics.median(v) for label, v in cpu.items()}
    print(f'steps per CPU-second with / without: {cpu["with guard"]:.2f} / {cpu["without"]:.2f} '
          f'= {cpu["with guard"] / cpu["without"]:.3f}')


if __name__ == '__main__':
    sys.exit(app.run(main))
