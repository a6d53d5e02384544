"""Accuracy of a model on arrays, the per-class and open-set metrics, and the run summary written
to accuracy.json.

The summary follows the anchors' protocol (FixMatch's extract_accuracy.py): besides the last
value, the median over the last 10 and 20 evaluations, for the raw student and every averaged
model (the EMA teacher, extra horizons, Polyak), on validation and test. An evaluation record
holds `{model: {split: accuracy}}` (what every reader of evaluations.jsonl knows) and, under the
METRICS keys, `{metric: {model: {split: value}}}`: balanced accuracy and per-class recall on
every split, and for an open-set protocol (data/splits.py) the known-vs-unknown AUROC and the
(K+1)-way balanced accuracy on the test images.
"""
import math

import numpy as np
import tensorflow as tf

from ssl_ema.nn.heads import UNKNOWN_THRESHOLD

MEDIAN_WINDOWS = (10, 20)
# Evaluation-record entries that are metrics of every model, not a model: {model: {split: value}}.
METRICS = ('balanced_accuracy', 'recall', 'open_set')
# An image is called unknown when its unknown score exceeds UNKNOWN_THRESHOLD (0.5, OpenMatch's
# one-vs-all rule, nn/heads.py): the score of OpenMatch's and IOMatch's heads
# (nn/heads.unknown_score); for a closed-set model 1 - max softmax (Hendrycks & Gimpel 2017's
# baseline).


# Images per inference batch: about 2^17 pixels a batch (128 images of 28x28 or 32x32, 1,024 of
# 8x8), between 64 and 1,024, so that a layer's activations stay near the CPU's caches. Our
# measurement (runs/SPEED.md, "Inference batch"; `python -m ssl_ema.bench.inference`): on
# small_cnn at 28x28 a batch of 128 costs ~0.7x the CPU-seconds of 1,024, at 8x8 1,024 is best.
PIXELS_PER_BATCH = 2 ** 17


def inference_batch(image_shape) -> int:
    """Images per inference-mode forward pass for images of `image_shape` (height, width, ...):
    the power of two nearest below PIXELS_PER_BATCH / (height x width), within 64..1,024."""
    height, width = (tuple(image_shape) + (1, 1))[:2]
    fit = PIXELS_PER_BATCH / max(1, int(height) * int(width))
    return int(min(1024, max(64, 2 ** math.floor(math.log2(fit)))))


def make_predict(model, image_shape):
    """A compiled inference-mode arg-max for `model`, traced once for any batch size."""
    @tf.function(input_signature=[tf.TensorSpec([None, *image_shape], tf.float32)])
    def predict(x):
        return tf.argmax(model(x, training=False), axis=-1)
    return predict


def accuracy(predict, x, y, batch_size: int = None) -> float:
    """Percentage of `x` that `predict` classifies as `y` (`batch_size` images at a time, by
    default inference_batch's)."""
    batch_size = batch_size or inference_batch(x.shape[1:])
    correct = 0
    for start in range(0, len(x), batch_size):
        pred = predict(tf.constant(x[start:start + batch_size])).numpy()
        correct += int((pred == y[start:start + batch_size]).sum())
    return 100. * correct / max(1, len(x))


def make_scores(model, image_shape):
    """A compiled inference-mode (arg-max, unknown score) for `model`; the score is 1 - max
    softmax, the baseline every closed-set classifier has, or the model's own when it returns
    [logits, unknown score] (an open-set algorithm's head, nn/heads.scoring_model)."""
    @tf.function(input_signature=[tf.TensorSpec([None, *image_shape], tf.float32)])
    def scores(x):
        out = model(x, training=False)
        logits = tf.cast(out[0] if isinstance(out, (list, tuple)) else out, tf.float32)
        if isinstance(out, (list, tuple)):
            return tf.argmax(logits, axis=-1), tf.cast(out[1], tf.float32)
        return tf.argmax(logits, axis=-1), 1. - tf.reduce_max(tf.nn.softmax(logits), axis=-1)
    return scores


def predictions(scores, x, batch_size: int = None):
    """(arg-max [N], unknown score [N]) of `scores` (make_scores) over `x` by slices of
    `batch_size` (default inference_batch's)."""
    batch_size = batch_size or inference_batch(x.shape[1:])
    out = [[t.numpy() for t in scores(tf.constant(x[start:start + batch_size]))]
           for start in range(0, len(x), batch_size)]
    if not out:
        return np.zeros([0], np.int64), np.zeros([0], np.float32)
    return tuple(np.concatenate(parts) for parts in zip(*out))


def recall_per_class(pred, y, num_classes: int) -> list:
    """Per-class recall in %: of the images of class c, the share predicted c (None for a class
    without images)."""
    pred, y = np.asarray(pred), np.asarray(y)
    return [float(100. * (pred[y == c] == c).mean()) if (y == c).any() else None
            for c in range(num_classes)]


def balanced_accuracy(pred, y, num_classes: int) -> float:
    """Mean per-class recall in % over the classes that have images (what a long-tailed test
    reports: every class weighs the same)."""
    recalls = [r for r in recall_per_class(pred, y, num_classes) if r is not None]
    return float(np.mean(recalls)) if recalls else 0.


def auroc(known_scores, unknown_scores) -> float:
    """Area under the ROC curve, in %, of telling unknown images (positives, higher score) from
    known ones: the probability that an unknown image outscores a known one, ties counting half
    (the Mann-Whitney statistic, exact, from average ranks)."""
    from scipy.stats import rankdata
    k, u = np.asarray(known_scores, np.float64), np.asarray(unknown_scores, np.float64)
    if not len(k) or not len(u):
        return float('nan')
    ranks = rankdata(np.concatenate([k, u]))
    return float(100. * (ranks[len(k):].sum() - len(u) * (len(u) + 1) / 2) / (len(k) * len(u)))


def evaluate(scores, eval_arrays: dict, num_classes: int, unknown_images=None) -> dict:
    """One model on the evaluation sets: {'accuracy': {split: %}, 'balanced_accuracy': {split:
    %}, 'recall': {split: [% per class]}} and, with an open-set protocol's `unknown_images`,
    'open_set': {'test_auroc': %, 'test_balanced_accuracy_k1': % over K+1 classes (unknown the
    last, predicted where the unknown score exceeds UNKNOWN_THRESHOLD)}."""
    out = {'accuracy': {}, 'balanced_accuracy': {}, 'recall': {}}
    for split, (x, y) in eval_arrays.items():
        pred, score = predictions(scores, x)
        out['accuracy'][split] = 100. * float((pred == y).sum()) / max(1, len(y))
        out['balanced_accuracy'][split] = balanced_accuracy(pred, y, num_classes)
        out['recall'][split] = recall_per_class(pred, y, num_classes)
        if split == 'test':
            known = (pred, score, y)
    if unknown_images is not None and 'test' in eval_arrays:
        pred, score, y = known
        unknown_pred, unknown_score = predictions(scores, unknown_images)
        open_pred = np.concatenate([np.where(score > UNKNOWN_THRESHOLD, num_classes, pred),
                                    np.where(unknown_score > UNKNOWN_THRESHOLD, num_classes,
                                             unknown_pred)])
        open_y = np.concatenate([y, np.full(len(unknown_pred), num_classes)])
        out['open_set'] = {'test_auroc': auroc(score, unknown_score),
                           'test_balanced_accuracy_k1': balanced_accuracy(
                               open_pred, open_y, num_classes + 1)}
    return out


def summarize(history: list) -> dict:
    """accuracy.json from the list of evaluations (each {'step', 'kimg', 'raw': {split: acc},
    'ema': {split: acc}, ...}): every model evaluated (a dict of splits: raw, ema and any extra
    average such as ema_0.99 or polyak) gets the statistics, other entries are the last value."""
    if not history:
        return {}
    last = history[-1]
    models = [k for k, v in last.items() if isinstance(v, dict) and k not in METRICS]
    out = {k: v for k, v in last.items() if k not in models and k not in METRICS}
    out['evaluations'] = len(history)
    for model in models:
        out[model] = {split: _stats([h[model][split] for h in history]) for split in last[model]}
    # The metrics, over the evaluations that recorded them (older records have none); recall is
    # a list per class, kept as the last evaluation's.
    for metric in METRICS:
        if metric not in last:
            continue
        recorded = [h[metric] for h in history if metric in h]
        out[metric] = {model: {split: (value if metric == 'recall' else
                                       _stats([r[model][split] for r in recorded
                                               if split in r.get(model, {})]))
                               for split, value in splits.items()}
                       for model, splits in last[metric].items()}
    return out


def _stats(values) -> dict:
    stats = {'last': values[-1]}
    for n in MEDIAN_WINDOWS:
        stats[f'median_last_{n}'] = float(np.median(values[-n:]))
    return stats


def format_table(summary: dict) -> str:
    splits = list(summary['ema'])
    lines = [f'{"accuracy (%)":<14}' + ''.join(f'{s:>8}' for s in splits)]
    models = [m for m in summary if isinstance(summary[m], dict)
              and m not in ('raw', 'ema') + METRICS]
    labels = {'raw': 'raw student', 'ema': 'EMA'}
    for model in ['raw', 'ema'] + models:   # extra averages (--ema_decays, Polyak) after the EMA
        label = labels.get(model, model)
        lines.append(f'{label:<14}' + ''.join(f'{summary[model][s]["last"]:8.2f}' for s in splits))
    # Balanced accuracy where it says something the accuracy does not (an imbalanced split), and
    # an open-set protocol's metrics.
    balanced = summary.get('balanced_accuracy', {}).get('ema', {})
    if any(abs(balanced[s]['last'] - summary['ema'][s]['last']) > 0.005
           for s in splits if s in balanced):
        lines.append(f'{"EMA balanced":<14}' + ''.join(
            f'{balanced[s]["last"]:8.2f}' if s in balanced else f'{"-":>8}' for s in splits))
    open_set = summary.get('open_set', {}).get('ema')
    if open_set:
        lines.append(f'EMA open set: AUROC known vs unknown {open_set["test_auroc"]["last"]:.2f}, '
                     f'(K+1)-way balanced accuracy '
                     f'{open_set["test_balanced_accuracy_k1"]["last"]:.2f} (test)')
    return '\n'.join(lines)
