"""Collect the EMA-horizon runs of runs/ema_horizons.sh into a Markdown table and a plot.

    python runs/ema_horizons.py benchmarks/ema [--plot=runs/ema_horizons.png]

Reads DIR/runs/<protocol>.<labels>@<seed>/<run>/{accuracy.json,posthoc.json}: per run the test
accuracy of the raw student and of every average (last evaluation, and the median of the last
20 as in runs/RESULTS.md) and the post-hoc sweep (one reconstruction at the end of training per
sigma_rel, the best on validation marked). The plot puts sigma_rel on the x axis (post-hoc
sweep, mean over seeds) with the other models as horizontal lines (last evaluation).
"""
import glob
import json
import os
import sys

import numpy as np

MODELS = ('raw', 'ema', 'ema_0.9', 'ema_0.99', 'ema_0.9999', 'polyak')
LABELS = {'raw': 'raw student', 'ema': 'EMA 0.999 (teacher)', 'ema_0.9': 'EMA 0.9',
          'ema_0.99': 'EMA 0.99', 'ema_0.9999': 'EMA 0.9999', 'polyak': 'Polyak (last half)'}


def load(directory):
    """[(group, seed, run name, accuracy.json, posthoc.json or None)]."""
    rows = []
    for path in sorted(glob.glob(os.path.join(directory, 'runs', '*', '*', 'accuracy.json'))):
        run_dir = os.path.dirname(path)
        group, seed = os.path.basename(os.path.dirname(run_dir)).split('@')
        posthoc_path = os.path.join(run_dir, 'posthoc.json')
        with open(path) as f:
            accuracy = json.load(f)
        posthoc = json.load(open(posthoc_path)) if os.path.exists(posthoc_path) else None
        rows.append((group, int(seed), os.path.basename(run_dir), accuracy, posthoc))
    return rows


def table(rows) -> str:
    lines = ['| run | seed | step | ' + ' | '.join(LABELS[m] for m in MODELS)
             + ' | post-hoc best (sigma_rel) |', '|---' * (len(MODELS) + 4) + '|']
    for group, seed, name, acc, posthoc in rows:
        cells = []
        for m in MODELS:
            test = acc.get(m, {}).get('test')
            cells.append(f'{test["last"]:.2f} / {test["median_last_20"]:.2f}' if test else '-')
        best = (f'{posthoc["best"]["test"]:.2f} ({posthoc["best"]["sigma_rel"]:g})'
                if posthoc else '-')
        lines.append(f'| {group} {name} | {seed} | {acc["step"]} | ' + ' | '.join(cells)
                     + f' | {best} |')
    return '\n'.join(lines)


def summary_table(rows) -> str:
    """One row per protocol and --ema_bn mode: mean +- sample std over seeds of the test
    accuracy's median of the last 20 evaluations (the post-hoc pick: its test accuracy)."""
    runs = {}
    for group, seed, name, acc, posthoc in rows:
        runs.setdefault((group, name), []).append((acc, posthoc))
    lines = ['| run | seeds | ' + ' | '.join(LABELS[m] for m in MODELS) + ' | post-hoc pick |',
             '|---' * (len(MODELS) + 3) + '|']

    def cell(values):
        if not values:
            return '-'
        return (f'{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}' if len(values) > 1
                else f'{values[0]:.2f}')
    for (group, name), found in sorted(runs.items()):
        cells = [cell([a[m]['test']['median_last_20'] for a, _ in found if m in a])
                 for m in MODELS]
        cells.append(cell([p['best']['test'] for _, p in found if p]))
        lines.append(f'| {group} {name} | {len(found)} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def sweep_table(rows) -> str:
    sigmas = sorted({r['sigma_rel'] for *_, p in rows if p for r in p['sweep']})
    lines = ['| run | seed | ' + ' | '.join(f'{s:g}' for s in sigmas) + ' |',
             '|---' * (len(sigmas) + 2) + '|']
    for group, seed, name, _, posthoc in rows:
        if posthoc:
            by_sigma = {r['sigma_rel']: r for r in posthoc['sweep']}
            lines.append(f'| {group} {name} | {seed} | ' + ' | '.join(
                f'{by_sigma[s]["test"]:.2f} ({by_sigma[s]["valid"]:.1f})' if s in by_sigma
                else '-' for s in sigmas) + ' |')
    return '\n'.join(lines)


def plot(rows, out):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    groups = {}
    for group, seed, name, acc, posthoc in rows:
        if name.endswith('_average') and posthoc:
            groups.setdefault(group, []).append((acc, posthoc))
    figure, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, (group, runs) in zip(axes[0], sorted(groups.items())):
        sigmas = [r['sigma_rel'] for r in runs[0][1]['sweep']]
        curve = np.mean([[r['test'] for r in p['sweep']] for _, p in runs], axis=0)
        ax.plot(sigmas, curve, 'k-o', label='post-hoc EMA (reconstructed at the end)')
        colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
        for colour, m in zip(colours, MODELS):
            values = [a[m]['test']['last'] for a, _ in runs if m in a]
            if values:
                ax.axhline(np.mean(values), color=colour, ls='--' if m == 'raw' else '-',
                           lw=1.2, label=LABELS[m])
        ax.set_xscale('log')
        ax.set_xlabel('sigma_rel (post-hoc EMA profile width, relative to training length)')
        ax.set_ylabel('test accuracy (%), last evaluation')
        ax.set_title(f'{group} (mean of {len(runs)} seed{"s" * (len(runs) > 1)}), mean_teacher')
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main(argv):
    directory = argv[1]
    out = next((a.split('=', 1)[1] for a in argv if a.startswith('--plot=')),
               'runs/ema_horizons.png')
    rows = load(directory)
    print('Test accuracy (%), median of the last 20 evaluations, mean ± std over seeds:\n')
    print(summary_table(rows))
    print('\nEach run, test accuracy (%), last evaluation / median of the last 20:\n')
    print(table(rows))
    print('\nPost-hoc sweep, test accuracy (validation in parentheses):\n')
    print(sweep_table(rows))
    plot(rows, out)
    print(f'\nplot: {out}')


if __name__ == '__main__':
    main(sys.argv)
