"""Accuracy of a model on arrays, and the run summary written to accuracy.json.

The summary follows the anchors' protocol (FixMatch's extract_accuracy.py): besides the last
value, the median over the last 10 and 20 evaluations, for the raw student and every averaged
model (the EMA teacher, extra horizons, Polyak), on validation and test.
"""
import numpy as np
import tensorflow as tf

MEDIAN_WINDOWS = (10, 20)


def make_predict(model, image_shape):
    """A compiled inference-mode arg-max for `model`, traced once for any batch size."""
    @tf.function(input_signature=[tf.TensorSpec([None, *image_shape], tf.float32)])
    def predict(x):
        return tf.argmax(model(x, training=False), axis=-1)
    return predict


def accuracy(predict, x, y, batch_size: int = 1024) -> float:
    """Percentage of `x` that `predict` classifies as `y`."""
    correct = 0
    for start in range(0, len(x), batch_size):
        pred = predict(tf.constant(x[start:start + batch_size])).numpy()
        correct += int((pred == y[start:start + batch_size]).sum())
    return 100. * correct / max(1, len(x))


def summarize(history: list) -> dict:
    """accuracy.json from the list of evaluations (each {'step', 'kimg', 'raw': {split: acc},
    'ema': {split: acc}, ...}): every model evaluated (a dict of splits: raw, ema and any extra
    average such as ema_0.99 or polyak) gets the statistics, other entries are the last value."""
    if not history:
        return {}
    last = history[-1]
    models = [k for k, v in last.items() if isinstance(v, dict)]
    out = {k: v for k, v in last.items() if k not in models}
    out['evaluations'] = len(history)
    for model in models:
        out[model] = {}
        for split in last[model]:
            values = [h[model][split] for h in history]
            stats = {'last': values[-1]}
            for n in MEDIAN_WINDOWS:
                stats[f'median_last_{n}'] = float(np.median(values[-n:]))
            out[model][split] = stats
    return out


def format_table(summary: dict) -> str:
    splits = list(summary['ema'])
    lines = [f'{"accuracy (%)":<14}' + ''.join(f'{s:>8}' for s in splits)]
    models = [m for m in summary if isinstance(summary[m], dict) and m not in ('raw', 'ema')]
    labels = {'raw': 'raw student', 'ema': 'EMA'}
    for model in ['raw', 'ema'] + models:   # extra averages (--ema_decays, Polyak) after the EMA
        label = labels.get(model, model)
        lines.append(f'{label:<14}' + ''.join(f'{summary[model][s]["last"]:8.2f}' for s in splits))
    return '\n'.join(lines)
