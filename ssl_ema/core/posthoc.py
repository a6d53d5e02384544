"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Sec. 3): choose the EMA's length after training.

A run trained with --posthoc_snapshot_every_kimg > 0 tracks power-function EMAs of two relative
widths (--posthoc_sigma_rels, core/ema.PowerEMA) and saves both every that many kimg into
DIR/posthoc/snapshot-<step>.npz (core/snapshots.py). The average of profile (t, gamma) weighs the weights after step
tau by the mass of p_{t,gamma}(s) = (gamma + 1) s^gamma / t^(gamma + 1) on (tau - 1, tau], so
any other profile is approximated, in the least-squares sense in function space, by a linear
combination of the snapshots (their Algorithm 3): A x = b with A_ij = <p_i, p_j>, b_i =
<p_i, p_target>, and the same combination of the snapshots' weights is the reconstructed EMA.

`sweep` (the command `python -m ssl_ema.posthoc`) sweeps sigma_rel at the run's last snapshot, evaluates each reconstruction on the
validation and test sets (batch-norm statistics as the run's --ema_bn: 'recompute' re-estimates
them, otherwise the same combination of the snapshots' statistics), picks the best on validation,
writes DIR/posthoc.json, exports the chosen reconstruction as any classifier is exported
(core/classifier.py: DIR/export_posthoc/ with model.keras and saved_model/) and keeps its weights as
DIR/posthoc/best.weights.h5 (Keras weights of the run's --arch).
"""
import os

import numpy as np

from ssl_ema.base import files
from ssl_ema.base.errors import ConfigError
from ssl_ema.core import run_dir
from ssl_ema.core.snapshots import load_snapshots

SWEEP = '0.01,0.02,0.03,0.05,0.07,0.1,0.15,0.2,0.25'   # our grid around the two tracked by default


# ---- the least squares (Algorithm 3) --------------------------------------------------------
def profile_inner_product(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> = integral over s of p_{t_a,gamma_a}(s) p_{t_b,gamma_b}(s), elementwise.

    With t_a <= t_b the product lives on (0, t_a] and integrates to
    (g_a+1)(g_b+1) t_a^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1))
    = (g_a+1)(g_b+1) / ((g_a+g_b+1) t_b) * (t_a / t_b)^g_b, written with the ratio <= 1 so that
    large exponents cannot overflow."""
    t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(*map(np.asarray, (t_a, gamma_a, t_b, gamma_b)))
    later_gamma = np.where(t_a <= t_b, gamma_b, gamma_a)
    t_min, t_max = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    return ((gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_max)
            * (t_min / t_max) ** later_gamma)


def reconstruction_coefficients(steps, gammas, target_step, target_gamma):
    """x minimising || sum_i x_i p_i - p_target || over the snapshots' profiles (A x = b)."""
    steps, gammas = np.asarray(steps, np.float64), np.asarray(gammas, np.float64)
    a = profile_inner_product(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    b = profile_inner_product(steps, gammas, target_step, target_gamma)
    return np.linalg.lstsq(a, b, rcond=None)[0]


def reconstruct(weights, coefficients):
    """sum_i coefficients[i] * weights[i], variable by variable."""
    return [sum(c * w[k].astype(np.float64) for c, w in zip(coefficients, weights)).astype(w0.dtype)
            for k, w0 in enumerate(weights[0])]


# ---- the sweep ------------------------------------------------------------------------------
def sweep(train_dir: str, sigma_rels, log=print) -> dict:
    """Reconstruct and evaluate every sigma_rel; the result written to DIR/posthoc.json."""
    from ssl_ema.core import accuracy
    from ssl_ema.core.ema import recompute_statistics, sigma_rel_to_gamma
    from ssl_ema.nn import backbones

    run = run_dir.open_run_dir(train_dir)
    cfg = run.config
    steps, tracked, weights = load_snapshots(train_dir)
    if not len(steps):
        raise ConfigError(f'--train_dir={train_dir} has no post-hoc EMA snapshots in '
                          f'{os.path.join(train_dir, run_dir.SNAPSHOTS)}; train with '
                          '--posthoc_snapshot_every_kimg > 0')
    target = steps.max()
    if target < cfg.total_steps:
        log(f'warning: the run stopped at step {target:.0f} of {cfg.total_steps}: reconstructing '
            'the EMA at its last snapshot')
    dataset = run.dataset()   # the run's normalisation and architecture flags, as trained
    # Stock float32 Keras layers (as core/classifier.py): the chosen model is exported from it.
    model = backbones.for_run(cfg, dataset.image_shape, dataset.num_classes,
                              (dataset.mean, dataset.std), portable=True)
    predict = accuracy.make_predict(model, dataset.image_shape)
    eval_arrays = dataset.eval_arrays()
    batches = run.statistics_batches(dataset)
    gammas = np.array([sigma_rel_to_gamma(s) for s in tracked])
    final = weights[int(np.argmax(steps))]   # a profile of the last snapshot
    results, best = [], None
    for sigma_rel in sigma_rels:
        gamma = sigma_rel_to_gamma(sigma_rel)
        coefficients = reconstruction_coefficients(steps, gammas, target, gamma)
        reconstructed = reconstruct(weights, coefficients)
        if cfg.ema_bn != 'average':
            # The profiles copy the student's statistics rather than average them: the last
            # snapshot's (the student's at the end), not a least-squares mix of older ones.
            reconstructed = [w if v.trainable else last
                             for v, w, last in zip(model.weights, reconstructed, final)]
        else:
            # Averaged variances mixed with coefficients of both signs can dip below zero.
            clipped = [np.maximum(w, 0.) if v.path.endswith('moving_variance') and w.min() < 0
                       else w for v, w in zip(model.weights, reconstructed)]
            if any(c is not w for c, w in zip(clipped, reconstructed)):
                log(f'sigma_rel {sigma_rel:g}: negative batch-norm variances in the '
                    'reconstruction set to 0 (sigma_rel far from the tracked profiles)')
            reconstructed = clipped
        model.set_weights(reconstructed)
        if batches is not None:
            recompute_statistics(model, batches)
        row = {'sigma_rel': sigma_rel, 'gamma': gamma}
        row.update({split: accuracy.accuracy(predict, x, y)
                    for split, (x, y) in eval_arrays.items()})
        results.append(row)
        log(f'sigma_rel {sigma_rel:<6g} ' + ' '.join(f'{s} {row[s]:.2f}' for s in eval_arrays))
        choose_by = 'valid' if 'valid' in row else 'test'
        if best is None or row[choose_by] > best[0][choose_by]:
            best = (row, model.get_weights())
    row, best_weights = best
    model.set_weights(best_weights)
    out = os.path.join(train_dir, run_dir.SNAPSHOTS, 'best.weights.h5')
    tmp = os.path.join(train_dir, run_dir.SNAPSHOTS, '.tmp-best.weights.h5')
    model.save_weights(tmp)
    os.replace(tmp, out)
    exported = export_best(train_dir, model, row, int(target))
    summary = {'step': int(target), 'snapshots': int(len(set(steps))),
               'tracked_sigma_rels': sorted(set(tracked.tolist())), 'ema_bn': cfg.ema_bn,
               'sweep': results, 'best': dict(row, weights=out, export=exported),
               'chosen_by': 'valid' if 'valid' in row else 'test'}
    files.write_json(os.path.join(train_dir, run_dir.POSTHOC), summary)
    log(f'best sigma_rel {row["sigma_rel"]:g} on {summary["chosen_by"]}: test '
        f'{row.get("test", float("nan")):.2f}%; exported to {exported} (weights also in {out}), '
        f'sweep in {os.path.join(train_dir, run_dir.POSTHOC)}')
    return summary


def export_best(train_dir: str, model, row: dict, step: int) -> str:
    """The chosen reconstruction as a classifier like any other (core/classifier.py):
    DIR/export_posthoc/ with model.keras, saved_model/ and export.json."""
    from ssl_ema.core import classifier
    info = classifier.classifier_info(run_dir.open_run_dir(train_dir))
    out = os.path.join(train_dir, 'export_posthoc')
    meta = {'model': f'posthoc sigma_rel {row["sigma_rel"]:g}', 'step': step,
            'train_dir': os.path.abspath(train_dir), 'image_shape': info['image_shape'],
            'num_classes': info['num_classes'], 'class_names': classifier.class_names(info),
            'mean': info['mean'], 'std': info['std'], 'checkpoint': None,
            'input': 'uint8 images [N, H, W, C], 0..255; standardised inside the model',
            'output': 'class probabilities [N, num_classes] (softmax)'}
    classifier.save(classifier.classifier(model, info), out, meta)
    return out
