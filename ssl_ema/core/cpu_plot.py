"""A benchmark's accuracy against CPU time (cpu_time.png): EMA test accuracy at each evaluation
against the CPU-seconds the run had used by then (evaluations.jsonl's cpu_time_s), its
self-training rounds continuing the curve where the run ended, mean over seeds with the spread
(min to max) shaded; one panel per dataset and label count, one curve per table row. What a
practitioner wants to see before spending an afternoon: where each recipe gets, at what cost."""
import os
from typing import Dict, List

import numpy as np

from ssl_ema.core import figures, run_dir


def cpu_curve(train_dir: str, summary: dict) -> List[tuple]:
    """[(CPU-seconds, EMA test %)] of every evaluation of the run, then of its rounds (listed in
    its accuracy.json, core/distilling.run_rounds), each round's CPU time added to the ones
    before; [] if the run predates cpu_time_s."""
    parts = [r['train_dir'] for r in summary.get('rounds', [])] or ['.']
    curve, offset = [], 0.
    for part in parts:
        history = run_dir.read_history(os.path.join(train_dir, part))
        points = [(offset + h['cpu_time_s'], h['ema']['test']) for h in history
                  if 'cpu_time_s' in h and 'test' in h.get('ema', {})]
        if not points:
            return curve
        curve += points
        offset = points[-1][0]
    return curve


def plot_cpu_time(records, path: str, row_labels) -> Dict[str, List[str]]:
    """Draw cpu_time.png from the benchmark's records (report.load_runs, each with its
    'cpu_curve'); `row_labels`: (dataset, variant) -> row. Returns each panel's curves."""
    panels = sorted({(r['config']['dataset'], r['config']['labels']) for r in records
                     if r['cpu_curve']})
    figure, axes = figures.panels(len(panels), 5.5, 4)
    # One colour per row in every panel (a row is the same recipe or algorithm across datasets).
    colours = {row: f'C{k}' for k, row in enumerate(dict.fromkeys(
        row_labels[r['config']['dataset'], r['variant']] for r in records if r['cpu_curve']))}
    drawn = {}
    for ax, (dataset, labels) in zip(axes.flat, panels):
        runs = [r for r in records if (r['config']['dataset'], r['config']['labels']) == (
            dataset, labels) and r['cpu_curve']]
        for row in dict.fromkeys(row_labels[dataset, r['variant']] for r in runs):
            curves = [r['cpu_curve'] for r in runs if row_labels[dataset, r['variant']] == row]
            n = min(len(c) for c in curves)   # the evaluations every seed has reached
            cpu = np.array([[p[0] for p in c[:n]] for c in curves])
            acc = np.array([[p[1] for p in c[:n]] for c in curves])
            ax.plot(cpu.mean(0), acc.mean(0), color=colours[row], marker='.',
                    label=f'{row} ({len(curves)} seed{"s" * (len(curves) > 1)})')
            if len(curves) > 1:
                ax.fill_between(cpu.mean(0), acc.min(0), acc.max(0), color=colours[row],
                                alpha=0.2)
        ax.set_title(f'{dataset}, {labels} labels')
        figures.label(ax, 'CPU-seconds (every thread, start-up and evaluations included)',
                      'EMA test accuracy (%)', drawn)
    figures.save(figure, axes, len(panels), 'EMA test accuracy against CPU time: mean over '
                 'seeds, min-max shaded', path)
    return drawn
