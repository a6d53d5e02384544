"""A benchmark's results, rebuilt from its run directories alone: results.csv (one row per run;
balanced accuracy, the open-set metrics and the EMA's per-class test recalls where runs recorded
them), results.md (EMA test accuracy, median of the last 20 evaluations as the anchors report,
mean +- sample std over seeds, raw beside it; the same tables of balanced accuracy and the
open-set metrics for a split protocol's runs), curves.png (every tracked average) and
cpu_time.png (accuracy against CPU-seconds, core/cpu_plot.py)."""
import csv
import io
import json
import os
from typing import Dict, List

import numpy as np

from ssl_ema.base import files
from ssl_ema.base.errors import ConfigError, one_line
from ssl_ema.core import cpu_plot, figures, run_dir

RESULT_FILES = ('results.csv', 'results.md', 'curves.png', 'cpu_time.png')
SPLITS, MODELS, STATS = ('valid', 'test'), ('raw', 'ema'), ('last', 'median_last_20')
TABLE_STAT = 'median_last_20'
CURVE_STYLES, CURVE_NAMES = {'ema': '-', 'raw': '--'}, {'ema': 'EMA', 'raw': 'raw'}
OTHER_STYLES = (':', '-.', (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))   # the other averages
# Flags that say nothing about a run's result: left out of results.csv.
_NOT_REPORTED = ('train_dir', 'data_dir', 'log_every_steps', 'keep_checkpoints')



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
        for name in sorted(os.listdir(os.path.join(root, group))):
            path = os.path.join(root, group, name)
            saved = run_dir.read_run_record(path)
            if saved is None:
                continue   # never started (its train.log says why)
            accuracy = read_json(os.path.join(path, run_dir.SUMMARY)) or {}
            total = run_dir.recorded_total_steps(saved)
            records.append(dict(name=f'{group}/{name}', variant=name,
                                cpu_curve=cpu_plot.cpu_curve(path, accuracy),
                                config=saved['config'], hparams=saved['algorithm'],
                                accuracy=accuracy, history=read_history(
                                    os.path.join(path, run_dir.HISTORY)),
                                total_steps=total, finished=run_dir.finished(path, saved)))
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
    # The metrics beside accuracy (core/accuracy.METRICS), where some run recorded them.
    metric_columns = [(metric, m, key, f'{m}_{key}_{metric}_{TABLE_STAT}' if metric != 'open_set'
                       else f'{m}_{key}_{TABLE_STAT}')
                      for metric, keys in (('balanced_accuracy', SPLITS),
                                           ('open_set', ('test_auroc',
                                                         'test_balanced_accuracy_k1')))
                      for m in MODELS for key in keys
                      if any(_metric(r['accuracy'], metric, m, key) is not None for r in records)]
    accuracy_columns += [c[-1] for c in metric_columns]
    # The last evaluation's per-class recalls of the EMA on test, 'r_0;r_1;...' (%).
    recall_column = any('recall' in r['accuracy'] for r in records)
    accuracy_columns += ['ema_test_recall_last'] if recall_column else []
    columns = (fixed + differing + accuracy_columns
               + ['step', 'total_steps', 'finished', 'evaluations', 'images_per_sec',
                  'wall_time_s', 'cpu_time_s', 'run'])
    rows = []
    for r, values in zip(records, flag_values):
        row = {k: values.get(k, '') for k in fixed + differing}
        acc = r['accuracy']
        for m in models:
            for s in SPLITS:
                for stat in STATS:
                    row[f'{m}_{s}_{stat}'] = acc.get(m, {}).get(s, {}).get(stat, '')
        for metric, m, key, column in metric_columns:
            value = _metric(acc, metric, m, key)
            row[column] = '' if value is None else value
        if recall_column:
            recalls = acc.get('recall', {}).get('ema', {}).get('test')
            row['ema_test_recall_last'] = '' if recalls is None else ';'.join(
                '' if v is None else f'{v:.2f}' for v in recalls)
        row.update(step=acc.get('step', 0), total_steps=r['total_steps'], finished=r['finished'],
                   evaluations=acc.get('evaluations', 0),
                   images_per_sec=acc.get('images_per_sec', ''),
                   wall_time_s=acc.get('wall_time_s', ''),
                   cpu_time_s=acc.get('cpu_time_s', ''), run=r['name'])
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
            lines += _table(runs, rows, dataset, labels, seeds, lambda a: a)
            # A protocol's own measures (data/splits.py), in tables of the same layout.
            for title, metric, key in PROTOCOL_TABLES:
                if all(_metric(r['accuracy'], metric, 'ema', key) is not None for r in runs) \
                        and any(_protocol(r['config']) for r in runs):
                    lines += ['', title]
                    lines += _table(runs, rows, dataset, labels, seeds,
                                    lambda a, m=metric, k=key: {x: {'test': a[m][x][k]}
                                                                for x in MODELS})

        unfinished = [r for r in records if r['config']['dataset'] == dataset
                      and not r['finished']]
        if unfinished:
            lines += ['', 'Not finished, left out of the table: ' + ', '.join(
                f'{r["name"]} (step {r["accuracy"].get("step", 0)}/{r["total_steps"]})'
                for r in unfinished) + '.']
    return '\n'.join(lines) + '\n'


# (title, accuracy.json metric, its key) of the tables a protocol's runs add.
PROTOCOL_TABLES = (
    ('Balanced accuracy (%), the mean of the per-class recalls, test:', 'balanced_accuracy',
     'test'),
    ('AUROC (%) of known against unknown test images (1 - max softmax, or the method\'s '
     'unknown score):', 'open_set', 'test_auroc'),
    ('(K+1)-way balanced accuracy (%), unknown as a class, test:', 'open_set',
     'test_balanced_accuracy_k1'))


def _protocol(config) -> bool:
    return bool(config.get('labeled_head') or config.get('known_classes'))


def _metric(summary, metric, model, key):
    """summary[metric][model][key][TABLE_STAT], None where it was not recorded."""
    return summary.get(metric, {}).get(model, {}).get(key, {}).get(TABLE_STAT)


def _table(runs, rows, dataset, labels, seeds, view) -> List[str]:
    """One table: a row per algorithm, a column per label count, each cell the EMA's and the
    raw student's test value of view(accuracy.json) over seeds."""
    lines = ['', '| algorithm | ' + ' | '.join(f'{n} labels' for n in labels) + ' |',
             '|---|' + '---|' * len(labels)]
    for row in dict.fromkeys(rows[dataset, r['variant']] for r in runs):
        cells = []
        for n in labels:
            cell = [view(r['accuracy']) for r in runs if rows[dataset, r['variant']] == row
                    and r['config']['labels'] == n]
            cells.append(_cell([a['ema']['test'][TABLE_STAT] for a in cell],
                               [a['raw']['test'][TABLE_STAT] for a in cell],
                               len(seeds)) if cell else '–')
        lines.append(f'| {row} | ' + ' | '.join(cells) + ' |')
    return lines


def plot_curves(records, path: str) -> Dict[str, List[str]]:
    """Test accuracy against training kimg, EMA solid and raw dashed (any other tracked average
    dotted or dash-dotted), one colour per label count (the mean over seeds at the evaluations
    they share), one panel per table row. Returns each panel's title and its curves' labels."""
    rows = _row_labels(records)
    panels = list(dict.fromkeys((r['config']['dataset'], rows[r['config']['dataset'],
                                                              r['variant']]) for r in records))
    several_datasets = len({d for d, _ in panels}) > 1
    figure, axes = figures.panels(len(panels), 5, 3.6)
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
        figures.label(ax, 'training kimg (thousands of labeled images)', 'test accuracy (%)',
                      drawn)
    figures.save(figure, axes, len(panels), 'Test accuracy while training: EMA (solid), raw '
                 'student (dashed), other averages dotted, mean over seeds', path)
    return drawn


def write_results(out: str, log=print) -> List[str]:
    """Write OUT/results.csv, results.md, curves.png and cpu_time.png from the runs in
    OUT/runs."""
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
        cpu_plot.plot_cpu_time(records, paths[3], _row_labels(records))
    except OSError as e:
        raise ConfigError(f'cannot write the results in {out}: {e.strerror or one_line(e)}'
                          ) from None
    unfinished = sum(not r['finished'] for r in records)
    log(f'{len(records)} runs ({unfinished} not finished) -> {", ".join(paths)}')
    return paths
