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
  DIR/curves.png   test accuracy against training kimg, raw and EMA, one panel per algorithm.

Flags: every training flag is accepted and applies to every run, except the three the grid spans,
which are lists here: --algorithms (instead of --algorithm), --labels (a comma-separated list) and
--seeds (instead of --seed); the benchmark names each run's --train_dir itself.
--algorithm_flags=DIR layers DIR/<algorithm>.flags over the shared flags for that algorithm's runs
(dataset -> algorithm, as runs/algorithms/ does for the anchors' per-algorithm settings).
"""
import copy
import csv
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np
from absl import app, flags

from ssl_ema import cli
from ssl_ema.base import config as config_lib, files
from ssl_ema import train   # defines the training flags and every algorithm's
from ssl_ema.algorithms import ALGORITHMS, create
from ssl_ema.base.errors import ConfigError, DataError, one_line
from ssl_ema.base.config import TrainConfig

FLAGS = flags.FLAGS
GRID_FLAGS = ('algorithm', 'labels', 'seed')   # one value per training run, lists in the benchmark
NAMED_HERE = ('train_dir',)                     # the benchmark names each run's directory
RESULT_FILES = ('results.csv', 'results.md', 'curves.png')
SPLITS, MODELS, STATS = ('valid', 'test'), ('raw', 'ema'), ('last', 'median_last_20')
TABLE_STAT = 'median_last_20'
CURVE_STYLES, CURVE_NAMES = {'ema': '-', 'raw': '--'}, {'ema': 'EMA', 'raw': 'raw'}
OTHER_STYLES = (':', '-.', (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))   # the other averages
# Flags that say nothing about a run's result: left out of results.csv.
_NOT_REPORTED = ('train_dir', 'data_dir', 'log_every_steps', 'keep_checkpoints')


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
                        'OUT/results.csv, OUT/results.md and OUT/curves.png.',
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


# ---- the grid -------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    cfg: TrainConfig      # arch resolved, train_dir set
    algorithm: object
    name: str             # <dataset>.<labels>@<seed>/<run directory>, relative to OUT/runs
    status: str           # 'new', 'resume' or 'done'
    step: int = 0         # step of the last evaluation on disk


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


def run_status(train_dir: str, total_steps: int):
    """('done', step) if the run in train_dir reached total_steps, ('resume', step) if it started,
    ('new', 0) otherwise; step is that of its last evaluation."""
    step = (read_json(os.path.join(train_dir, 'accuracy.json')) or {}).get('step', 0)
    if step >= total_steps:
        return 'done', step
    if os.path.exists(os.path.join(train_dir, 'flags.json')):
        return 'resume', step
    return 'new', 0


def plan(algorithms, label_counts, seeds, out: str, settings: Optional[dict] = None,
         per_algorithm: Optional[Dict[str, dict]] = None) -> List[Run]:
    """Every run of the grid, checked before anything is trained or written.

    Values come from the parsed flags (when they are), then `settings` (flag name -> value),
    then `per_algorithm[name]`. A bad value raises ConfigError or DataError with one line.
    """
    from ssl_ema.nn import backbones
    from ssl_ema import data
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown or not algorithms:
        raise ConfigError(f'--algorithms={",".join(algorithms)}: {", ".join(unknown) or "empty"} '
                          f'is unknown; valid: {", ".join(sorted(ALGORITHMS))}')
    config_fields = TrainConfig.__dataclass_fields__
    checked = {}   # (dataset, labels, ...) -> image shape; (arch, shape) -> True
    runs = []
    for name in dict.fromkeys(algorithms):
        values = dict(settings or {}, **(per_algorithm or {}).get(name, {}))
        hparams = ALGORITHMS[name].__dataclass_fields__
        algorithm = create(name, **{k: v for k, v in values.items() if k in hparams})
        for labels in label_counts:
            for seed in seeds:
                cfg = config_lib.from_flags(
                    TrainConfig, **{k: v for k, v in values.items() if k in config_fields},
                    algorithm=name, labels=labels, seed=seed, train_dir=None)
                key = (cfg.dataset, cfg.labels, cfg.valid, cfg.augment, cfg.data_dir)
                if key not in checked:   # the split's errors do not depend on the seed
                    dataset = data.build(cfg.dataset, cfg.labels, cfg.valid, cfg.seed,
                                         cfg.augment, cfg.data_dir)
                    checked[key] = (dataset.image_shape, dataset.num_classes)
                shape, num_classes = checked[key]
                arch = backbones.resolve(cfg.arch, shape)
                if (arch, shape) not in checked:
                    backbones.build(arch, shape, num_classes)   # unknown --arch fails here
                    checked[arch, shape] = True
                cfg = dataclasses.replace(cfg, arch=arch)
                run_name = os.path.relpath(train.default_train_dir(cfg, algorithm, arch),
                                           train.ROOT)
                cfg = dataclasses.replace(cfg, train_dir=os.path.join(out, 'runs', run_name))
                train.check_compatible(cfg.train_dir, train.run_record(cfg, algorithm))
                runs.append(Run(cfg, algorithm, run_name,
                                *run_status(cfg.train_dir, cfg.total_steps)))
    return runs


def train_command(run: Run) -> List[str]:
    """The `python -m ssl_ema.train` command of one run, every flag explicit."""
    args = []
    values = {**dataclasses.asdict(run.cfg), **dataclasses.asdict(run.algorithm)}
    for name, value in values.items():
        if isinstance(value, bool):
            args.append(f'--{name}' if value else f'--no{name}')
        elif value is not None:
            args.append(f'--{name}={value}')
    return [sys.executable, '-m', 'ssl_ema.train'] + args


def _ema_test(train_dir: str) -> str:
    summary = read_json(os.path.join(train_dir, 'accuracy.json')) or {}
    try:
        return (f'EMA test {summary["ema"]["test"][TABLE_STAT]:.2f}% (median of last 20), '
                f'raw {summary["raw"]["test"][TABLE_STAT]:.2f}%')
    except KeyError:
        return 'no evaluation yet'


def _last_line(path: str) -> str:
    with open(path, errors='replace') as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else '(no output)'


def run_grid(runs: List[Run], jobs: int = 1, log=print, poll_seconds: float = 0.5) -> List[Run]:
    """Train every run that is not done, `jobs` processes at a time; return the runs that failed.

    Each run's output goes to <train_dir>/train.log. Ctrl-C or SIGTERM (KeyboardInterrupt here)
    sends SIGTERM to the running trainings, which save a checkpoint, and is re-raised.
    """
    count = len(runs)
    pending = []
    for i, run in enumerate(runs, 1):
        if run.status == 'done':
            log(f'[{i}/{count}] done      {run.name}: finished earlier, not retrained; '
                f'{_ema_test(run.cfg.train_dir)}')
        else:
            pending.append((i, run))
    running, failed = {}, []
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get('TF_CPP_MIN_LOG_LEVEL', '2'))
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i, run = pending.pop(0)
                os.makedirs(run.cfg.train_dir, exist_ok=True)
                log_path = os.path.join(run.cfg.train_dir, 'train.log')
                with open(log_path, 'a') as log_file:
                    command = train_command(run)
                    log_file.write(' '.join(command) + '\n')
                    log_file.flush()
                    # Own session: a Ctrl-C reaches only this process, which forwards one SIGTERM.
                    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                               env=env, start_new_session=True)
                running[process] = (i, run, time.time(), log_path)
                what = (f'resume    {run.name} from step {run.step}/{run.cfg.total_steps}'
                        if run.status == 'resume' else
                        f'train     {run.name} ({run.cfg.total_steps} steps)')
                log(f'[{i}/{count}] {what}; log: {log_path}')
            time.sleep(poll_seconds)
            for process in list(running):
                if process.poll() is None:
                    continue
                i, run, start, log_path = running.pop(process)
                status, _ = run_status(run.cfg.train_dir, run.cfg.total_steps)
                if process.returncode == 0 and status == 'done':
                    log(f'[{i}/{count}] finished  {run.name} in {time.time() - start:.0f} s: '
                        f'{_ema_test(run.cfg.train_dir)}')
                else:
                    failed.append(run)
                    log(f'[{i}/{count}] FAILED    {run.name} (exit {process.returncode}): '
                        f'{_last_line(log_path)}; log: {log_path}')
    except KeyboardInterrupt:
        for process in running:
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                process.kill()
        log(f'Interrupted: {len(running)} running training(s) saved a checkpoint; run the same '
            'command again to resume the grid.')
        raise
    return failed


# ---- results --------------------------------------------------------------------------------
def read_json(path: str):
    """The JSON in `path`, None if there is no such file; ConfigError naming a damaged one."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f'{path} cannot be read ({one_line(e)})') from None


def read_history(path: str) -> list:
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise ConfigError(f'{path} cannot be read ({one_line(e)})') from None


def load_runs(out: str) -> List[dict]:
    """Every run under OUT/runs/<group>/<run>/ that recorded its flags: {'name', 'config',
    'hparams', 'accuracy' (accuracy.json or {}), 'history', 'total_steps', 'finished'}."""
    root = os.path.join(out, 'runs')
    if not os.path.isdir(root):
        raise ConfigError(f'{root} does not exist: no benchmark runs in {out}')
    records = []
    for group in sorted(os.listdir(root)):
        if not os.path.isdir(os.path.join(root, group)):
            continue
        for run_dir in sorted(os.listdir(os.path.join(root, group))):
            path = os.path.join(root, group, run_dir)
            saved = cli.read_run_record(path)
            if saved is None:
                continue   # never started (its train.log says why)
            accuracy = read_json(os.path.join(path, 'accuracy.json')) or {}
            total = cli.recorded_total_steps(saved)
            records.append(dict(name=f'{group}/{run_dir}', variant=run_dir,
                                config=saved['config'], hparams=saved['algorithm'],
                                accuracy=accuracy, history=read_history(
                                    os.path.join(path, 'evaluations.jsonl')),
                                total_steps=total, finished=accuracy.get('step', 0) >= total))
    return records


def _row_labels(records) -> Dict[tuple, str]:
    """(dataset, variant) -> the table's row name: the algorithm, or the run directory name when
    one algorithm was run with several settings on that dataset."""
    variants = {}
    for r in records:
        variants.setdefault((r['config']['dataset'], r['config']['algorithm']), set()).add(
            r['variant'])
    return {(r['config']['dataset'], r['variant']):
            r['config']['algorithm'] if len(variants[r['config']['dataset'],
                                                     r['config']['algorithm']]) == 1
            else r['variant'] for r in records}


def models_of(records) -> List[str]:
    """The models the runs evaluated: raw and ema, then every other tracked average (the
    --ema_decays horizons, polyak) in the order the runs list them."""
    names = dict.fromkeys(MODELS)
    for r in records:
        names.update(dict.fromkeys(k for k, v in r['accuracy'].items()
                                   if isinstance(v, dict) and 'test' in v))
    return list(names)


def csv_rows(records) -> (List[str], List[dict]):
    """results.csv: columns and one row per run."""
    flag_values = [{k: v for k, v in {**r['config'], **r['hparams']}.items()
                    if k not in _NOT_REPORTED} for r in records]
    names = list(dict.fromkeys(k for values in flag_values for k in values))
    fixed = ['algorithm', 'dataset', 'labels', 'seed']
    differing = [k for k in names if k not in fixed
                 and len({json.dumps(v.get(k)) for v in flag_values}) > 1]
    models = models_of(records)
    accuracy_columns = [f'{m}_{s}_{stat}' for m in models for s in SPLITS for stat in STATS]
    columns = (fixed + differing + accuracy_columns
               + ['step', 'total_steps', 'finished', 'evaluations', 'images_per_sec',
                  'wall_time_s', 'run'])
    rows = []
    for r, values in zip(records, flag_values):
        row = {k: values.get(k, '') for k in fixed + differing}
        acc = r['accuracy']
        for m in models:
            for s in SPLITS:
                for stat in STATS:
                    row[f'{m}_{s}_{stat}'] = acc.get(m, {}).get(s, {}).get(stat, '')
        row.update(step=acc.get('step', 0), total_steps=r['total_steps'], finished=r['finished'],
                   evaluations=acc.get('evaluations', 0),
                   images_per_sec=acc.get('images_per_sec', ''),
                   wall_time_s=acc.get('wall_time_s', ''), run=r['name'])
        rows.append(row)
    return columns, rows


def mean_std(values):
    """(mean, sample standard deviation with n - 1; None for one value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def _cell(ema, raw, seeds_expected: int) -> str:
    (m, s), (rm, rs) = mean_std(ema), mean_std(raw)
    if s is None:
        text = f'{m:.2f} (raw {rm:.2f})'
    else:
        text = f'{m:.2f} ± {s:.2f} (raw {rm:.2f} ± {rs:.2f})'
    return text if len(ema) == seeds_expected else text + f' [{len(ema)} seed{"s" * (len(ema) > 1)}]'


def markdown_table(records) -> str:
    """results.md: one table per dataset, over the finished runs."""
    finished = [r for r in records if r['finished']]
    rows = _row_labels(records)
    lines = ['# Benchmark results', '',
             'EMA test accuracy (%), median of the last 20 evaluations (the anchors\' protocol), '
             'mean ± sample standard deviation (n - 1) over seeds; the raw student\'s in '
             'parentheses. A cell averaging fewer seeds than the table says how many.']
    for dataset in dict.fromkeys(r['config']['dataset'] for r in records):
        runs = [r for r in finished if r['config']['dataset'] == dataset]
        labels = sorted({r['config']['labels'] for r in runs})
        seeds = sorted({r['config']['seed'] for r in runs})
        lines += ['', f'## {dataset}', '']
        if not runs:
            lines.append('No finished run yet.')
        else:
            lines.append(f'Seeds {", ".join(map(str, seeds))}.')
            lines += ['', '| algorithm | ' + ' | '.join(f'{n} labels' for n in labels) + ' |',
                      '|---|' + '---|' * len(labels)]
            for row in dict.fromkeys(rows[dataset, r['variant']] for r in runs):
                cells = []
                for n in labels:
                    cell = [r for r in runs if rows[dataset, r['variant']] == row
                            and r['config']['labels'] == n]
                    cells.append(_cell([r['accuracy']['ema']['test'][TABLE_STAT] for r in cell],
                                       [r['accuracy']['raw']['test'][TABLE_STAT] for r in cell],
                                       len(seeds)) if cell else '–')
                lines.append(f'| {row} | ' + ' | '.join(cells) + ' |')
        unfinished = [r for r in records if r['config']['dataset'] == dataset
                      and not r['finished']]
        if unfinished:
            lines += ['', 'Not finished, left out of the table: ' + ', '.join(
                f'{r["name"]} (step {r["accuracy"].get("step", 0)}/{r["total_steps"]})'
                for r in unfinished) + '.']
    return '\n'.join(lines) + '\n'


def plot_curves(records, path: str) -> Dict[str, List[str]]:
    """Test accuracy against training kimg, EMA solid and raw dashed (any other tracked average
    dotted or dash-dotted), one colour per label count (the mean over seeds at the evaluations
    they share), one panel per table row. Returns each panel's title and its curves' labels."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = _row_labels(records)
    panels = list(dict.fromkeys((r['config']['dataset'], rows[r['config']['dataset'],
                                                              r['variant']]) for r in records))
    several_datasets = len({d for d, _ in panels}) > 1
    columns = min(3, len(panels))
    lines = -(-len(panels) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(5 * columns, 3.6 * lines),
                                squeeze=False)
    drawn = {}
    for ax, (dataset, row) in zip(axes.flat, panels):
        runs = [r for r in records if r['config']['dataset'] == dataset
                and rows[dataset, r['variant']] == row and r['history']]
        for color, n in enumerate(sorted({r['config']['labels'] for r in runs})):
            histories = [r['history'] for r in runs if r['config']['labels'] == n]
            steps = sorted(set.intersection(*[{h['step'] for h in hist} for hist in histories]))
            if not steps:
                continue
            kimg = [next(h['kimg'] for h in histories[0] if h['step'] == s) for s in steps]
            tracked = [m for m in models_of(runs)
                       if all(m in h for hist in histories for h in hist)]
            for k, model in enumerate(tracked):
                by_step = [{h['step']: h[model]['test'] for h in hist} for hist in histories]
                mean = [np.mean([b[s] for b in by_step]) for s in steps]
                style = CURVE_STYLES.get(model, OTHER_STYLES[k % len(OTHER_STYLES)])
                ax.plot(kimg, mean, linestyle=style, color=f'C{color}',
                        label=f'{n} labels, {CURVE_NAMES.get(model, model)}')
        ax.set_title(f'{row} ({dataset})' if several_datasets else row)
        drawn[ax.get_title()] = [line.get_label() for line in ax.get_lines()]
        ax.set_xlabel('training kimg (thousands of labeled images)')
        ax.set_ylabel('test accuracy (%)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis('off')
    figure.suptitle('Test accuracy while training: EMA (solid), raw student (dashed), other '
                    'averages dotted, mean over seeds', fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.98))   # leave the top strip to the title
    files.write_atomically(path, lambda f: figure.savefig(f, format='png', dpi=100))
    plt.close(figure)
    return drawn


def write_results(out: str, log=print) -> List[str]:
    """Write OUT/results.csv, OUT/results.md and OUT/curves.png from the runs in OUT/runs."""
    records = load_runs(out)
    if not records:
        raise ConfigError(f'no run in {os.path.join(out, "runs")} has started yet')
    columns, rows = csv_rows(records)
    table = io.StringIO(newline='')
    writer = csv.DictWriter(table, columns)
    writer.writeheader()
    writer.writerows(rows)
    paths = [os.path.join(out, name) for name in RESULT_FILES]
    try:
        files.write_atomically(paths[0], lambda f: f.write(table.getvalue()), 'w', newline='')
        files.write_atomically(paths[1], lambda f: f.write(markdown_table(records)), 'w')
        plot_curves(records, paths[2])
    except OSError as e:
        raise ConfigError(f'cannot write the results in {out}: {e.strerror or one_line(e)}'
                          ) from None
    unfinished = sum(not r['finished'] for r in records)
    log(f'{len(records)} runs ({unfinished} not finished) -> {", ".join(paths)}')
    return paths


# ---- command line ---------------------------------------------------------------------------
def main(argv):
    if len(argv) > 1:
        sys.exit(f'error: unexpected arguments {argv[1:]}; flags look like --name=value')

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        try:   # checked before any training: curves.png needs it
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError('the benchmark plots with matplotlib: pip install -e ".[benchmark]"')
        if FLAGS.collect:
            write_results(FLAGS.collect)
            return
        if not FLAGS.out:
            raise ConfigError('--out=DIR is required: the benchmark directory for the runs and '
                              'results')
        if FLAGS.jobs < 1:
            raise ConfigError(f'--jobs={FLAGS.jobs} must be a positive integer')
        algorithms = FLAGS.algorithms or sorted(ALGORITHMS)
        per_algorithm = (read_algorithm_flags(FLAGS.algorithm_flags, algorithms)
                         if FLAGS.algorithm_flags else {})
        runs = plan(algorithms, parse_counts('labels', FLAGS.labels),
                    parse_counts('seeds', FLAGS.seeds), FLAGS.out, per_algorithm=per_algorithm)
        counts = {s: sum(r.status == s for r in runs) for s in ('done', 'resume', 'new')}
        print(f'{len(runs)} runs in {os.path.join(FLAGS.out, "runs")}: {counts["done"]} done, '
              f'{counts["resume"]} to resume, {counts["new"]} to train')
        if FLAGS.dry_run:
            for run in runs:
                print(f'{run.status:<7} {run.name} (step {run.step}/{run.cfg.total_steps})')
            return
        files.check_writable_dir(FLAGS.out, 'out')
        failed = run_grid(runs, FLAGS.jobs)
        write_results(FLAGS.out)
        if failed:
            sys.exit(f'error: {len(failed)} of {len(runs)} runs failed: '
                     f'{", ".join(r.name for r in failed)} (see their train.log)')
    except (ConfigError, DataError) as e:
        sys.exit(f'error: {e}')
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == '__main__':
    define_flags()
    flags.adopt_module_key_flags(config_lib)   # --help lists the training flags too
    app.run(main)
