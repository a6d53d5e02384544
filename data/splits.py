"""Label splits: which training images are labeled, which are held out for validation."""
import dataclasses

import numpy as np

from ssl_ema.base.errors import DataError

VALID_SEED = 0   # the validation part is the same for every --seed, so seeds are comparable


@dataclasses.dataclass
class Split:
    labeled: np.ndarray     # indices into the training arrays
    valid: np.ndarray
    unlabeled: np.ndarray   # the whole training part minus validation; labeled images included,
                            # as in the anchors (FixMatch/MixMatch), so no image is wasted

    def as_dict(self):
        return {k: getattr(self, k).tolist() for k in ('labeled', 'valid', 'unlabeled')}


def _stratified_pick(rng, labels, candidates, per_class, num_classes):
    picked = []
    for c in range(num_classes):
        pool = candidates[labels[candidates] == c]
        picked.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(picked))


def _valid_images(n: int, num_valid: int) -> np.ndarray:
    return np.sort(np.random.RandomState(VALID_SEED).permutation(n)[:num_valid])


def _valid_that_fits(labels, num_labeled: int, num_classes: int):
    """The largest --valid of 10%, 5% or none of a small training set that leaves every class
    --labels / classes images outside it (None if no such value): what the error proposes when
    the default --valid=200, tuned for the public benchmarks, exceeds a small folder."""
    n, per_class = len(labels), num_labeled // num_classes
    for candidate in (n // 10, n // 20, 0):
        rest = np.setdiff1d(np.arange(n), _valid_images(n, candidate))
        if np.bincount(labels[rest], minlength=num_classes).min() >= per_class:
            return candidate
    return None


def make_split(labels: np.ndarray, num_labeled: int, num_valid: int, seed: int,
               num_classes: int) -> Split:
    """Class-balanced labeled set of `num_labeled` images chosen by `seed`; a fixed validation set.

    The validation part is drawn first: a uniformly random `num_valid` images chosen with the fixed
    VALID_SEED (not --seed), so every seed is validated on the same images. The labeled images are
    then drawn per class from the rest with `seed`. The unlabeled pool is the whole rest, labeled
    images included.
    """
    n = len(labels)
    if num_labeled <= 0:
        raise DataError(f'--labels={num_labeled} must be positive (a multiple of {num_classes})')
    if num_labeled % num_classes:
        raise DataError(f'--labels={num_labeled} must be a multiple of the {num_classes} classes '
                        f'(class-balanced split), e.g. {num_classes * max(1, num_labeled // num_classes)}')
    if num_valid < 0 or num_valid >= n or (num_labeled + num_valid > n and num_labeled < n):
        works = _valid_that_fits(labels, num_labeled, num_classes)
        hint = (f'; --valid={works} would work ({works * 100 // n}% of them)' if works is not None
                else '')
        if num_valid < 0 or num_valid >= n:
            raise DataError(f'--valid={num_valid} must be in [0, {n - 1}] (training set has {n} '
                            f'images){hint}')
        raise DataError(f'--labels={num_labeled} is larger than the training set: {n} images, '
                        f'{n - num_valid} of them outside --valid={num_valid}{hint}')
    if num_labeled + num_valid > n:
        raise DataError(f'--labels={num_labeled} is larger than the training set: {n} images, '
                        f'{n - num_valid} of them outside --valid={num_valid}')
    everything = np.arange(n)
    valid = _valid_images(n, num_valid)
    rest = np.setdiff1d(everything, valid)
    per_class = num_labeled // num_classes
    counts = np.bincount(labels[rest], minlength=num_classes)
    if counts.min() < per_class:
        raise DataError(f'--labels={num_labeled} needs {per_class} images per class, but class '
                        f'{int(counts.argmin())} has only {int(counts.min())} outside validation; '
                        f'use --labels<={num_classes * int(counts.min())}')
    labeled = _stratified_pick(np.random.RandomState(seed), labels, rest, per_class, num_classes)
    return Split(labeled=labeled, valid=valid, unlabeled=rest)
