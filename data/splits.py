"""Label splits: which training images are labeled, which are held out for validation."""
import dataclasses
from typing import Optional

import numpy as np

from ssl_ema.base.errors import ConfigError, DataError

VALID_SEED = 0   # the validation part is the same for every --seed, so seeds are comparable


@dataclasses.dataclass
class Split:
    labeled: np.ndarray     # indices into the training arrays
    valid: np.ndarray
    unlabeled: np.ndarray   # the whole training part minus validation; labeled images included,
                            # as in the anchors (FixMatch/MixMatch), so no image is wasted
    protocol: Optional[dict] = None   # a Protocol's flags and class counts (long tail, mismatch)

    def as_dict(self):
        out = {k: getattr(self, k).tolist() for k in ('labeled', 'valid', 'unlabeled')}
        if self.protocol is not None:   # absent at the defaults: older split.json files match
            out['protocol'] = self.protocol
        return out


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


# ---- protocols over any source: long-tailed parts, known classes and class mismatch ------------
POOL_ORDERS = ('consistent', 'uniform', 'reversed')


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The split flags beyond --labels/--valid (TrainConfig's fields of the same names). At their
    defaults a split is exactly make_split's, and split.json has no `protocol` entry."""
    labeled_head: int = 0          # N_1: labeled images of the head class; 0 = balanced --labels
    unlabeled_head: int = 0        # M_1: pool images of the head class (with labeled_head)
    imbalance_ratio: float = 100.  # gamma = N_1 / N_K
    class_order: str = ''          # classes from head to tail, e.g. 9,8,...,0; '' = 0..K-1
    pool_order: str = 'consistent'   # consistent, uniform (M_1 every class) or reversed
    known_classes: str = ''        # classes the labels name, e.g. 0-5; '' = all
    mismatch: float = 0.           # fraction of the pool drawn from the other classes
    pool_size: int = 0             # with known_classes; 0 = the largest any mismatch allows

    @classmethod
    def of(cls, config) -> 'Protocol':
        """The protocol fields of a TrainConfig (or any object with them; absent: defaults)."""
        return cls(**{f.name: getattr(config, f.name, f.default)
                      for f in dataclasses.fields(cls)})

    @property
    def long_tailed(self) -> bool:
        return self.labeled_head > 0

    @property
    def open_set(self) -> bool:
        return bool(self.known_classes)

    @property
    def active(self) -> bool:
        return self.long_tailed or self.open_set


def parse_classes(text: str, flag: str, num_classes: int) -> list:
    """'0-5', '9-0' or '9,8,7' -> [class ids]; ConfigError naming --flag if out of range or repeated."""
    ids = []
    for part in filter(None, (p.strip() for p in text.split(','))):
        low, _, high = part.partition('-')
        try:
            low, high = int(low), int(high or low)
            ids += list(range(low, high + 1) if high >= low else range(low, high - 1, -1))
        except ValueError:
            raise ConfigError(f'--{flag}={text} must be class ids such as 0-5 or 2,0,1') from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= num_classes:
        raise ConfigError(f'--{flag}={text} must name distinct classes among 0..{num_classes - 1}')
    return ids


def long_tail_counts(head: int, gamma: float, num_classes: int) -> list:
    """N_c = N_1 * gamma^(-(c-1)/(K-1)), c = 1..K, rounded down (LDAM's and DARP's profile; USB's
    semilearn/datasets/utils.make_imbalance_data, whose tail is int(N_1 / gamma))."""
    if num_classes == 1:
        return [int(head)]
    return [int(np.floor(head * gamma ** (-c / (num_classes - 1)) + 1e-9))
            for c in range(num_classes)]


def _check_protocol(p: Protocol, arrays_extra, num_classes: int):
    if p.long_tailed and p.open_set:
        raise ConfigError('--labeled_head and --known_classes cannot be combined yet; give one')
    if arrays_extra is not None:
        flag = '--labeled_head' if p.long_tailed else '--known_classes'
        raise ConfigError(f'{flag} needs the label of every pool image, but this dataset\'s extra '
                          'unlabeled images have none: use a dataset without them (e.g. svhn, '
                          'not svhn_extra)')
    if p.long_tailed and (p.unlabeled_head <= 0 or not 1 <= p.imbalance_ratio < float('inf')):
        raise ConfigError(f'--labeled_head={p.labeled_head} needs --unlabeled_head > 0 (M_1) '
                          f'and a finite --imbalance_ratio >= 1, not {p.unlabeled_head} and '
                          f'{p.imbalance_ratio:g}')
    if p.pool_order not in POOL_ORDERS:
        raise ConfigError(f'--pool_order={p.pool_order} is unknown; valid: '
                          f'{", ".join(POOL_ORDERS)}')
    if not 0. <= p.mismatch <= 1. or p.pool_size < 0:
        raise ConfigError(f'--mismatch={p.mismatch:g} must be in [0, 1] and --pool_size='
                          f'{p.pool_size} >= 0')
    if (p.mismatch or p.pool_size) and not p.open_set:
        raise ConfigError('--mismatch and --pool_size need --known_classes (e.g. 0-5)')
    if not p.long_tailed and (p.unlabeled_head or p.class_order or p.pool_order != 'consistent'
                              or p.imbalance_ratio != Protocol.imbalance_ratio):
        raise ConfigError('--unlabeled_head, --imbalance_ratio, --class_order and --pool_order '
                          'need --labeled_head (a long-tailed split)')


def _draw(rng, candidates, count, what, flag):
    if count > len(candidates):
        raise ConfigError(f'{flag} asks for {count} {what}, but the data has only '
                          f'{len(candidates)}; use a smaller value')
    return rng.choice(candidates, count, replace=False)


def long_tailed_split(labels, p: Protocol, num_labeled: int, num_valid: int, seed: int,
                      num_classes: int) -> Split:
    """Long-tailed labeled and unlabeled parts (USB's classic_cv_imb protocol): class order[c]
    gets N_c labeled images and M_c pool images (consistent: the same profile from M_1; uniform:
    M_1 each; reversed: the profile tail to head), drawn with `seed` from outside validation;
    labeled images are not in the pool (USB's include_lb_to_ulb: False)."""
    order = (parse_classes(p.class_order, 'class_order', num_classes) if p.class_order
             else list(range(num_classes)))
    if len(order) != num_classes:
        raise ConfigError(f'--class_order={p.class_order} must list all {num_classes} classes, '
                          'head first')
    n_c = long_tail_counts(p.labeled_head, p.imbalance_ratio, num_classes)
    m_c = ([p.unlabeled_head] * num_classes if p.pool_order == 'uniform' else
           long_tail_counts(p.unlabeled_head, p.imbalance_ratio, num_classes))
    if p.pool_order == 'reversed':
        m_c = m_c[::-1]
    if num_labeled != sum(n_c):
        raise ConfigError(f'--labeled_head={p.labeled_head} --imbalance_ratio='
                          f'{p.imbalance_ratio:g} makes {sum(n_c)} labeled images '
                          f'({",".join(map(str, n_c))}): give --labels={sum(n_c)}')
    valid = _valid_images(len(labels), num_valid)
    rest = np.setdiff1d(np.arange(len(labels)), valid)
    rng = np.random.RandomState(seed)
    labeled, pool = [], []
    for rank, c in enumerate(order):
        candidates = rest[labels[rest] == c]
        if n_c[rank] + m_c[rank] > len(candidates):
            raise ConfigError(f'class {c} (rank {rank + 1} in the class order) needs '
                              f'{n_c[rank]} labeled + {m_c[rank]} pool images, but has '
                              f'{len(candidates)} outside --valid: lower --labeled_head or '
                              '--unlabeled_head')
        drawn = rng.permutation(candidates)
        labeled.append(drawn[:n_c[rank]])
        pool.append(drawn[n_c[rank]:n_c[rank] + m_c[rank]])
    protocol = dict({k: getattr(p, k) for k in ('labeled_head', 'unlabeled_head',
                                                'imbalance_ratio', 'pool_order')},
                    class_order=order, labeled_per_class=_per_class(order, n_c, num_classes),
                    unlabeled_per_class=_per_class(order, m_c, num_classes))
    return Split(np.sort(np.concatenate(labeled)), valid, np.sort(np.concatenate(pool)),
                 protocol)


def _per_class(order, counts, num_classes):
    out = [0] * num_classes
    for c, n in zip(order, counts):
        out[c] = int(n)
    return out


def mismatch_split(labels, p: Protocol, num_labeled: int, num_valid: int, seed: int,
                   num_classes: int) -> Split:
    """Class mismatch (Oliver et al., NeurIPS 2018, arXiv 1804.09170, Sec. 4.5): the labeled
    images and the validation set come from the known classes only; the pool holds `pool_size`
    images whatever the mismatch, a fraction `mismatch` of them drawn from the other classes
    (labeled images left out, so the fraction is exact). The default pool size is the largest
    that every mismatch level can supply, so runs at 0%, 50% and 100% share it. `labels` are
    the source's own; the caller renumbers the known classes 0..K'-1 (known_arrays)."""
    known = parse_classes(p.known_classes, 'known_classes', num_classes)
    if len(known) == num_classes:
        raise ConfigError(f'--known_classes={p.known_classes} names every class: leave one out')
    is_known = np.isin(labels, known)
    # The validation part: the first --valid known-class images of the fixed permutation.
    order = np.random.RandomState(VALID_SEED).permutation(len(labels))
    valid = np.sort(order[is_known[order]][:num_valid])
    rest = np.setdiff1d(np.arange(len(labels)), valid)
    known_rest = rest[is_known[rest]]
    renumber = np.full(num_classes, -1)
    renumber[known] = np.arange(len(known))
    labeled = known_rest[make_split(renumber[labels[known_rest]], num_labeled, 0, seed,
                                    len(known)).labeled]
    known_pool = np.setdiff1d(known_rest, labeled)
    unknown_pool = rest[~is_known[rest]]
    size = p.pool_size or min(len(known_pool), len(unknown_pool))
    n_unknown = int(round(p.mismatch * size))
    rng = np.random.RandomState(seed)
    pool = np.sort(np.concatenate([
        _draw(rng, known_pool, size - n_unknown, 'known-class pool images',
              f'--pool_size={size} at --mismatch={p.mismatch:g}'),
        _draw(rng, unknown_pool, n_unknown, 'other-class pool images',
              f'--pool_size={size} at --mismatch={p.mismatch:g}')]))
    protocol = dict(known_classes=known, mismatch=p.mismatch, pool_size=int(size),
                    unknown_in_pool=n_unknown)
    return Split(labeled, valid, pool, protocol)


def protocol_split(labels, num_labeled: int, num_valid: int, seed: int, num_classes: int,
                   protocol: Protocol = None, extra=None) -> Split:
    """make_split, or the split of `protocol`'s flags when any is given."""
    p = protocol or Protocol()
    if not p.active:
        if p != Protocol():
            _check_protocol(p, None, num_classes)   # names the flag that needs another
        return make_split(labels, num_labeled, num_valid, seed, num_classes)
    _check_protocol(p, extra, num_classes)
    if num_valid < 0 or num_valid >= len(labels):
        raise ConfigError(f'--valid={num_valid} must be in [0, {len(labels) - 1}]')
    make = long_tailed_split if p.long_tailed else mismatch_split
    return make(np.asarray(labels), p, num_labeled, num_valid, seed, num_classes)


def known_arrays(arrays, known: list):
    """An open-set protocol's view of a dataset: the known classes renumbered 0..K'-1 in the
    order --known_classes names them, every other class K' ("unknown"), num_classes = K'."""
    renumber = np.full(arrays.num_classes, len(known), np.int64)
    renumber[known] = np.arange(len(known))
    names = (tuple(arrays.class_names[c] for c in known) if arrays.class_names else None)
    return dataclasses.replace(arrays, y_train=renumber[arrays.y_train],
                               y_test=renumber[arrays.y_test], num_classes=len(known),
                               class_names=names)
