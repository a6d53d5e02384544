"""The recipe study's table from run directories: one row per run (or mean +- spread over the
seeds of a row), EMA validation and test accuracy (last evaluation), CPU-seconds, FixMatch-like
runs' mask rate (the last logged `algorithm/mask`, fraction of unlabeled images above the
threshold) and a self-training round's pseudo-label accuracy against the pool's hidden labels.

    python runs/recipe/table.py NAME=DIR[,DIR...] ...     # a row per NAME, seeds comma-separated
"""
import glob
import json
import os
import sys

import numpy as np


def mask_rate(train_dir):
    from tensorboard.backend.event_processing import event_accumulator
    import tensorflow as tf
    events = glob.glob(os.path.join(train_dir, 'tensorboard', 'events.*'))
    if not events:
        return None
    acc = event_accumulator.EventAccumulator(events[0], size_guidance={'tensors': 0})
    acc.Reload()
    if 'algorithm/mask' not in acc.Tags()['tensors']:
        return None
    return float(tf.make_ndarray(acc.Tensors('algorithm/mask')[-1].tensor_proto))


def row(train_dir):
    summary = json.load(open(os.path.join(train_dir, 'accuracy.json')))
    flags = json.load(open(os.path.join(train_dir, 'flags.json')))
    plabel = flags.get('teacher', {}).get('pseudo_label_accuracy')
    if 'rounds' in summary:   # the last round's pseudo-labels
        last = os.path.join(train_dir, summary['rounds'][-1]['train_dir'])
        plabel = json.load(open(os.path.join(last, 'flags.json')))['teacher'].get(
            'pseudo_label_accuracy')
    return (summary['ema']['valid']['last'], summary['ema']['test']['last'],
            summary.get('cpu_time_s'), mask_rate(train_dir), plabel)


def cell(values, digits=2):
    values = [v for v in values if v is not None]
    if not values:
        return ''
    if len(values) == 1:
        return f'{values[0]:.{digits}f}'
    return f'{np.mean(values):.{digits}f} +- {np.std(values, ddof=1):.{digits}f}'


def main(args):
    print('| row | seeds | EMA valid | EMA test | CPU-s | mask | pseudo-label acc. |')
    print('|---|---|---|---|---|---|---|')
    for arg in args:
        name, dirs = arg.split('=', 1)
        rows = [row(d) for d in dirs.split(',')]
        cols = list(zip(*rows))
        print(f'| {name} | {len(rows)} | {cell(cols[0])} | {cell(cols[1])} | {cell(cols[2], 0)} '
              f'| {cell(cols[3])} | {cell(cols[4])} |')


if __name__ == '__main__':
    main(sys.argv[1:])
