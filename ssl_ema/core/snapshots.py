"""The post-hoc EMA snapshot store (Karras et al. 2024, Sec. 3.2): while a run trains with
--posthoc_snapshot_every_kimg > 0, every profile's weights (core/ema.PowerEMA) are saved into
<train_dir>/posthoc/snapshot-<step>.npz; core/posthoc.py reconstructs any EMA from them."""
import glob
import os
import re
import zipfile

import numpy as np

from ssl_ema.base import files
from ssl_ema.base.errors import ConfigError
from ssl_ema.core.run_dir import SNAPSHOTS

_NAME = re.compile(r'snapshot-(\d+)\.npz$')


def save_snapshot(train_dir: str, step: int, profiles) -> None:
    """Every profile's weights at `step` in one file, written atomically."""
    arrays = {'step': np.int64(step),
              'sigma_rels': np.array([p.sigma_rel for p in profiles], np.float64)}
    for j, profile in enumerate(profiles):
        for i, weight in enumerate(profile.model.get_weights()):
            arrays[f'{j}/{i}'] = weight
    files.write_atomically(os.path.join(train_dir, SNAPSHOTS, f'snapshot-{step:08d}.npz'),
                           lambda f: np.savez(f, **arrays))


def _snapshot_files(train_dir: str) -> dict:
    paths = glob.glob(os.path.join(train_dir, SNAPSHOTS, 'snapshot-*.npz'))
    return {int(_NAME.search(p)[1]): p for p in paths if _NAME.search(p)}


def remove_snapshots_after(train_dir: str, step: int) -> None:
    """Drop snapshots newer than the checkpoint a run resumes from: it takes them again."""
    for saved_step, path in _snapshot_files(train_dir).items():
        if saved_step > step:
            os.unlink(path)


def load_snapshots(train_dir: str):
    """(steps, sigma_rels, weights): one entry per (snapshot, profile), weights a list of arrays."""
    steps, sigma_rels, weights = [], [], []
    for step, path in sorted(_snapshot_files(train_dir).items()):
        try:
            with np.load(path) as f:
                for j, sigma_rel in enumerate(f['sigma_rels']):
                    count = sum(1 for k in f.files if k.startswith(f'{j}/'))
                    weights.append([f[f'{j}/{i}'] for i in range(count)])
                    steps.append(step)
                    sigma_rels.append(float(sigma_rel))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ConfigError(f'{path} is unreadable ({e}); delete it and run '
                              'ssl_ema.posthoc again') from None
    return np.array(steps, np.float64), np.array(sigma_rels), weights


