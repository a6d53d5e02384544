"""Train a grid of runs and turn it into the SSL accuracy table and its curves.

    python -m ssl_ema.benchmark --algorithms=supervised,mean_teacher,vat --dataset=digits \\
        --labels=50,100 --seeds=1,2,3 --out=DIR [any training flag]
    python -m ssl_ema.benchmark --collect=DIR     # rebuild DIR's results without training

Each (algorithm, label count, seed) is one `python -m ssl_ema.train` process with its own
directory, DIR/runs/<dataset>.<labels>@<seed>/<algorithm>_<arch>[_<non-default flags>] (the name
`ssl_ema.train` would give it under experiments/), so running the same command again resumes the
grid: finished runs are reported and left alone, interrupted ones continue from their last
checkpoint. Then:
  DIR/results.csv  one row per run: its flags that differ between runs, raw and EMA accuracy on
                   validation and test (last, median of the last 20 evaluations), images/s, time;
  DIR/results.md   rows algorithms, columns label counts, cells the mean +- sample standard
                   deviation (n - 1) over seeds of the EMA test accuracy's median over the last 20
                   evaluations (the anchors' protocol), the raw student's beside it;
  DIR/curves.png   test accuracy against training kimg, raw and EMA, one panel per algorithm;
  DIR/cpu_time.png EMA test accuracy against CPU-seconds (self-training rounds included), mean
                   and spread over seeds, one panel per dataset and label count.

Flags: every training flag is accepted and applies to every run, except the three the grid spans,
which are lists here: --algorithms (instead of --algorithm), --labels (a comma-separated list) and
--seeds (instead of --seed); the benchmark names each run's --train_dir itself.
--algorithm_flags=DIR layers DIR/<algorithm>.flags over the shared flags for that algorithm's runs
(dataset -> algorithm, as runs/algorithms/ does for the anchors' per-algorithm settings).
"""
import copy
import dataclasses
import os
from typing import Dict, List

from absl import flags

from ssl_ema import cli
from ssl_ema.algorithms import ALGORITHMS
from ssl_ema.base import files
from ssl_ema.base.config import TrainConfig
from ssl_ema.base.errors import ConfigError, RunError
from ssl_ema.core import grid, report

FLAGS = flags.FLAGS
GRID_FLAGS = ('algorithm', 'labels', 'seed')   # one value per training run, lists in the benchmark
NAMED_HERE = ('train_dir',)                     # the benchmark names each run's directory


def define_flags(flag_values=FLAGS):
    """Turn the training flags into the benchmark's: the flags the grid spans become lists."""
    for name in GRID_FLAGS + NAMED_HERE:
        if name in flag_values:
            delattr(flag_values, name)
    labels_default = TrainConfig.__dataclass_fields__['labels'].default
    flags.DEFINE_list('algorithms', None, 'Algorithms to run, comma-separated (default: every '
                      f'registered one: {",".join(sorted(ALGORITHMS))}).', flag_values=flag_values)
    flags.DEFINE_list('labels', [str(labels_default)], 'Label counts, comma-separated, e.g. '
                      '50,100 (a list here; ssl_ema.train takes one).', flag_values=flag_values)
    flags.DEFINE_list('seeds', ['1', '2', '3'], 'Seeds, comma-separated: one run per seed, label '
                      'count and algorithm; the table averages over them.', flag_values=flag_values)
    flags.DEFINE_string('out', None, 'Benchmark directory: runs in OUT/runs/, results in '
                        'OUT/results.csv, OUT/results.md, OUT/curves.png and OUT/cpu_time.png.',
                        flag_values=flag_values)
    flags.DEFINE_integer('jobs', 1, 'Runs trained at the same time, one process each (each '
                         'process uses every core: 1 suits a small CPU machine).',
                         flag_values=flag_values)
    flags.DEFINE_string('algorithm_flags', None, 'Directory of per-algorithm flagfiles: '
                        'DIR/<algorithm>.flags, where it exists, overrides the shared flags for '
                        'that algorithm\'s runs (e.g. runs/algorithms).', flag_values=flag_values)
    flags.DEFINE_string('collect', None, 'Rebuild the results of this benchmark directory from '
                        'the runs in it, without training (other flags are ignored).',
                        flag_values=flag_values)
    flags.DEFINE_bool('dry_run', False, 'Check every flag and print what would be trained, '
                      'resumed or is done, then stop.', flag_values=flag_values)


def parse_counts(flag: str, values) -> List[int]:
    """['50', '100'] -> [50, 100], each once, in the given order."""
    try:
        counts = [int(v) for v in values]
    except ValueError:
        raise ConfigError(f'--{flag}={",".join(values)} must be comma-separated integers, e.g. '
                          f'--{flag}=1,2,3') from None
    if not counts:
        raise ConfigError(f'--{flag} is empty; give at least one value')
    return list(dict.fromkeys(counts))


def parse_flagfile(path: str, flag_values=FLAGS) -> dict:
    """{flag: value} that the flagfile `path` sets, parsed by the real training flags.

    An unknown flag, or one the grid spans (--algorithm, --labels, --seed, --train_dir), is a
    ConfigError: a flagfile in runs/ can never silently mean nothing.
    """
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    names += [f.name for cls in ALGORITHMS.values() for f in dataclasses.fields(cls)]
    parser = flags.FlagValues()
    for name in dict.fromkeys(names):
        if name in flag_values and name not in GRID_FLAGS + NAMED_HERE:
            flag = copy.deepcopy(flag_values[name])
            flag.unparse()
            parser[name] = flag
    if not os.path.isfile(path):
        raise ConfigError(f'flagfile {path} does not exist')
    try:
        parser(['', f'--flagfile={path}'])
    except flags.Error as e:
        raise ConfigError(f'{path}: {str(e).splitlines()[0]}') from None
    return {name: parser[name].value for name in parser if parser[name].present}


def read_algorithm_flags(directory: str, algorithms) -> Dict[str, dict]:
    """{algorithm: the values DIR/<algorithm>.flags sets} for the algorithms that have one."""
    if not os.path.isdir(directory):
        raise ConfigError(f'--algorithm_flags={directory} is not a directory')
    return {name: parse_flagfile(os.path.join(directory, f'{name}.flags'))
            for name in algorithms if os.path.exists(os.path.join(directory, f'{name}.flags'))}


# ---- command line ---------------------------------------------------------------------------
def main():
    cli.require_matplotlib('the benchmark')   # checked before any training: curves.png needs it
    if FLAGS.collect:
        report.write_results(FLAGS.collect)
        return
    if not FLAGS.out:
        raise ConfigError('--out=DIR is required: the benchmark directory for the runs and '
                          'results')
    if FLAGS.jobs < 1:
        raise ConfigError(f'--jobs={FLAGS.jobs} must be a positive integer')
    algorithms = FLAGS.algorithms or sorted(ALGORITHMS)
    per_algorithm = (read_algorithm_flags(FLAGS.algorithm_flags, algorithms)
                     if FLAGS.algorithm_flags else {})
    runs = grid.plan(algorithms, parse_counts('labels', FLAGS.labels),
                     parse_counts('seeds', FLAGS.seeds), FLAGS.out, per_algorithm=per_algorithm)
    counts = {s: sum(r.status == s for r in runs) for s in ('done', 'resume', 'new')}
    print(f'{len(runs)} runs in {os.path.join(FLAGS.out, "runs")}: {counts["done"]} done, '
          f'{counts["resume"]} to resume, {counts["new"]} to train')
    if FLAGS.dry_run:
        for run in runs:
            print(f'{run.status:<7} {run.name} (step {run.step}/{run.cfg.total_steps})')
        return
    files.check_writable_dir(FLAGS.out, 'out')
    failed = grid.run_grid(runs, FLAGS.jobs)
    report.write_results(FLAGS.out)
    if failed:
        raise RunError(f'{len(failed)} of {len(runs)} runs failed: '
                       f'{", ".join(r.name for r in failed)} (see their train.log)')


def _define_all_flags():
    cli.define_train_flags()
    define_flags()


if __name__ == '__main__':
    cli.run(main, setup=_define_all_flags)
