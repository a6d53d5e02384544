"""Training steps/s of one process vs 2 local workers vs 2 mirrored replicas, on this machine.

    python -m ssl_ema.bench_distribute                      # FixMatch, small_cnn, digits
    python -m ssl_ema.bench_distribute --arch=wrn28_2 --dataset=fashion_mnist --steps=40

Each setting trains the same run (same flags, same global batch) in a fresh process:
`python -m ssl_ema.train` on one device, `python -m ssl_ema.launch --workers=2` (two processes,
MultiWorkerMirroredStrategy, all-reduce over gRPC on 127.0.0.1), and `python -m ssl_ema.train
--distribute=mirrored --cpu_devices=2` (one process, two logical CPUs). The rate is taken from the
chief's last progress line, which covers the second half of the steps (after compilation and the
first batches). Ratios are against one process measured in the same run. On one CPU machine the
workers share its cores: this measures the overhead of distribution, not a speed-up (that needs
one GPU or machine per worker).
"""
import re
import subprocess
import sys
import tempfile

from absl import app, flags

from ssl_ema.base.machine import cpu_model

flags.DEFINE_integer('steps', 40, 'Training steps per setting; the rate is measured over the '
                     'second half.')
flags.DEFINE_string('algorithm', 'fixmatch', 'Algorithm trained.')
flags.DEFINE_string('arch', 'small_cnn', 'Backbone.')
flags.DEFINE_string('dataset', 'digits', 'Dataset.')
flags.DEFINE_integer('batch', 32, 'Global labeled batch (the unlabeled one is uratio times it).')
flags.DEFINE_integer('uratio', 4, 'Unlabeled images per labeled image.')
FLAGS = flags.FLAGS

SETTINGS = {
    '1 process': ['-m', 'ssl_ema.train'],
    '2 local workers (launch)': ['-m', 'ssl_ema.launch', '--workers=2'],
    'mirrored, 2 logical CPUs': ['-m', 'ssl_ema.train', '--distribute=mirrored',
                                 '--cpu_devices=2'],
}
PROGRESS = re.compile(r'^step \d+/\d+ .*\| (\d+) img/s', re.M)


def steps_per_second(command: list, images_per_step: int) -> float:
    out = subprocess.run([sys.executable, *command], capture_output=True, text=True,
                         timeout=3600)
    rates = PROGRESS.findall(out.stdout)
    if out.returncode or not rates:
        sys.exit(f'error: {" ".join(command)} failed:\n{out.stderr[-2000:]}')
    return float(rates[-1]) / images_per_step


def main(argv):
    del argv
    half = max(1, FLAGS.steps // 2)
    images_per_step = FLAGS.batch * (1 + (FLAGS.uratio if FLAGS.algorithm != 'supervised' else 0))
    print(f'{cpu_model()}; {FLAGS.algorithm}, {FLAGS.arch}, {FLAGS.dataset}, global batch '
          f'{FLAGS.batch}+{FLAGS.batch * FLAGS.uratio}, steps/s over steps {half + 1}-{2 * half}')
    baseline = None
    for name, command in SETTINGS.items():
        with tempfile.TemporaryDirectory(prefix='ssl_ema_bench_') as train_dir:
            rate = steps_per_second(command + [
                f'--algorithm={FLAGS.algorithm}', f'--arch={FLAGS.arch}',
                f'--dataset={FLAGS.dataset}', f'--batch={FLAGS.batch}', f'--uratio={FLAGS.uratio}',
                f'--train_steps={2 * half}', f'--log_every_steps={half}',
                '--eval_every_kimg=1e9', f'--train_dir={train_dir}'], images_per_step)
        baseline = baseline or rate
        print(f'{name:<28} {rate:8.2f} steps/s   x{rate / baseline:.2f}', flush=True)
    print('The settings share this machine\'s cores: on one machine distribution can only cost; '
          'it pays with one GPU or machine per worker.')


if __name__ == '__main__':
    app.run(main)
