"""Balanced accuracy, per-class recall and the open-set metrics (core/accuracy.py), by hand; the
inference batch size they are computed with."""
import numpy as np
import pytest

from ssl_ema.core import accuracy


def test_balanced_accuracy_and_recall_on_an_imbalanced_case():
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 0, 1, 1])
    # Accuracy 4/6; recalls 3/3, 1/2, 0/1; class 3 has no image.
    assert accuracy.recall_per_class(pred, y, 4) == [100., 50., 0., None]
    assert accuracy.balanced_accuracy(pred, y, 4) == pytest.approx(50.)


def test_auroc_counts_pairs_and_ties():
    known, unknown = [0.1, 0.4, 0.35, 0.8], [0.9, 0.4, 0.7]
    # Unknown-over-known pairs: 0.9 beats 4; 0.4 beats 2 and ties 1 (1/2); 0.7 beats 3: 9.5 / 12.
    assert accuracy.auroc(known, unknown) == pytest.approx(100 * 9.5 / 12)
    assert accuracy.auroc([0.1, 0.2], [0.3]) == 100. and accuracy.auroc([0.5], [0.1]) == 0.


def test_inference_batch_holds_about_2_17_pixels_and_leaves_predictions_alone():
    assert accuracy.inference_batch((28, 28, 1)) == 128          # Fashion-MNIST
    assert accuracy.inference_batch((32, 32, 3)) == 128          # CIFAR-10, SVHN
    assert accuracy.inference_batch((8, 8, 1)) == 1024           # digits: the cap
    assert accuracy.inference_batch((96, 96, 3)) == 64           # STL-10 and larger: the floor
    assert accuracy.inference_batch((224, 224, 3)) == 64
    import keras
    from ssl_ema.nn import backbones
    keras.utils.set_random_seed(0)
    model = backbones.build('small_cnn', (28, 28, 1), 10)
    x = np.random.default_rng(0).random((300, 28, 28, 1), np.float32)
    scores = accuracy.make_scores(model, (28, 28, 1))
    default = accuracy.predictions(scores, x)                    # slices of 128, the last of 44
    one_pass = accuracy.predictions(scores, x, batch_size=1024)
    np.testing.assert_array_equal(default[0], one_pass[0])
    np.testing.assert_allclose(default[1], one_pass[1], rtol=1e-5)


def fake_scores(table):
    """A make_scores stand-in: image value v -> (class, unknown score) = table[v]."""
    def scores(x):
        rows = [table[int(v)] for v in np.asarray(x).reshape(len(x), -1)[:, 0]]
        return (np.array([r[0] for r in rows]), np.array([r[1] for r in rows], np.float32))
    return lambda x: tuple(map(_Tensor, scores(x)))


class _Tensor:
    def __init__(self, value):
        self.value = value

    def numpy(self):
        return self.value


def test_open_set_evaluation_by_hand():
    table = {0: (0, 0.1), 1: (0, 0.2), 2: (1, 0.9), 3: (0, 0.6), 4: (1, 0.3)}
    x_test, y_test = np.array([0, 1, 2])[:, None], np.array([0, 1, 1])
    unknown = np.array([3, 4])[:, None]
    out = accuracy.evaluate(fake_scores(table), {'test': (x_test, y_test)}, 2, unknown)
    assert out['accuracy']['test'] == pytest.approx(200 / 3)   # closed set: image 1 is wrong
    assert out['balanced_accuracy']['test'] == pytest.approx((100 + 50) / 2)
    # Unknown scores: known 0.1, 0.2, 0.9; unknown 0.6 (beats 2 of 3), 0.3 (beats 2): 4 / 6.
    assert out['open_set']['test_auroc'] == pytest.approx(100 * 4 / 6)
    # (K+1)-way, unknown above 0.5: image 0 right, 1 wrong (class 0), 2 -> unknown (wrong), 3 ->
    # unknown (right), 4 -> class 1 (wrong): recalls 1/1, 0/2, 1/2.
    assert out['open_set']['test_balanced_accuracy_k1'] == pytest.approx(100 * (1 + 0 + .5) / 3)


def test_summary_keeps_old_records_readable():
    old = {'step': 1, 'kimg': 1., 'raw': {'test': 50.}, 'ema': {'test': 60.}}
    new = {'step': 2, 'kimg': 2., 'raw': {'test': 70.}, 'ema': {'test': 80.},
           'balanced_accuracy': {'raw': {'test': 65.}, 'ema': {'test': 75.}},
           'recall': {'raw': {'test': [60., 70.]}, 'ema': {'test': [70., 80.]}}}
    summary = accuracy.summarize([old, new])
    assert summary['ema']['test'] == {'last': 80., 'median_last_10': 70., 'median_last_20': 70.}
    assert summary['balanced_accuracy']['ema']['test']['median_last_20'] == 75.   # one record
    assert summary['recall']['ema']['test'] == [70., 80.]
    assert 'balanced_accuracy' not in accuracy.summarize([old])
    table = accuracy.format_table(summary)
    assert 'EMA balanced' in table and 'balanced' not in table.split('EMA balanced')[0]


def protocol_record(algorithm, accuracy_value, balanced, auroc):
    history = [{'step': 10, 'kimg': 1., 'raw': {'test': accuracy_value - 1},
                'ema': {'test': accuracy_value},
                'balanced_accuracy': {'raw': {'test': balanced - 1}, 'ema': {'test': balanced}},
                'open_set': {m: {'test_auroc': auroc, 'test_balanced_accuracy_k1': 50.}
                             for m in ('raw', 'ema')},
                'recall': {m: {'test': [balanced, None]} for m in ('raw', 'ema')}}]
    return dict(name=f'fashion_mnist.600@1/{algorithm}', variant=algorithm, finished=True,
                config={'dataset': 'fashion_mnist', 'algorithm': algorithm, 'labels': 600,
                        'seed': 1, 'known_classes': '0-5'},
                hparams={}, accuracy=accuracy.summarize(history), total_steps=10)


def test_benchmark_tables_of_a_protocol():
    from ssl_ema.core import report
    records = [protocol_record('supervised', 80., 70., 60.), protocol_record('fixmatch', 85., 75.,
                                                                             65.)]
    markdown = report.markdown_table(records)
    tables = markdown.split('Balanced accuracy (%)')
    assert len(tables) == 2 and '| fixmatch | 75.00 (raw 74.00) |' in tables[1]
    assert '| fixmatch | 85.00 (raw 84.00) |' in tables[0]
    assert '| supervised | 60.00 (raw 60.00) |' in markdown.split('AUROC (%)')[1]
    columns, rows = report.csv_rows(records)
    assert rows[1]['ema_test_balanced_accuracy_median_last_20'] == 75.
    assert rows[0]['ema_test_auroc_median_last_20'] == 60.
    assert rows[1]['ema_test_recall_last'] == '75.00;'
