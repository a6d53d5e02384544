"""An algorithm's state, as the trainer keeps it: declared (`State`, `Algorithm.state`), started
(`initial_state`), made the same on every replica (`replica_mean`, `replica_concat`), and the
memories algorithms carry across steps: a per-index bank of rows updated by `scatter_last`
(FlexMatch's per-image record, SimMatch's labeled embeddings) and a FIFO queue with its pointer
updated by `enqueue` (CoMatch's). Every update is static-shaped, so it compiles with XLA.
Re-exported by algorithms/base.py."""
import dataclasses
from typing import Dict, Tuple

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class State:
    shape: Tuple[int, ...]
    initial: float
    dtype: tf.DType = tf.float32
    # A [K] state that starts at the labeled images' class distribution when the trainer gives
    # it (as a LABELED_PRIOR state does), `initial` otherwise (ReMixMatch's p(y)).
    from_prior: bool = False


def declared_state(algorithm, num_classes: int, pool_size: int, labeled_size: int = 0
                   ) -> Dict[str, State]:
    """algorithm.state(...), with the labeled set's size for the algorithms that index it (a
    self-supervised method, which has no labeled set, never does)."""
    if getattr(algorithm, 'needs_labeled_indices', False):
        return algorithm.state(num_classes, pool_size, labeled_size)
    return algorithm.state(num_classes, pool_size)


# A state of this name [K] starts at the labeled images' class distribution (the trainer's data).
LABELED_PRIOR = 'labeled_prior'

# A dimension of a State's shape of this value is the width of the student's pooled features
# (nn/backbones.features), which the trainer knows once the model is built (DASO's prototypes).
FEATURES = -1


def uses_feature_width(states: Dict[str, State]) -> bool:
    """Whether a dimension of any of `states` is FEATURES."""
    return any(FEATURES in s.shape for s in states.values())


def initial_state(algorithm, num_classes: int, pool_size: int, labeled_size: int = 0,
                  labeled_prior=None, feature_width: int = None) -> Dict[str, tf.Tensor]:
    """The algorithm's declared state at its initial values (the trainer's variables start so);
    a LABELED_PRIOR state at `labeled_prior` when given; FEATURES dimensions `feature_width`."""
    declared = declared_state(algorithm, num_classes, pool_size, labeled_size)
    if uses_feature_width(declared) and feature_width is None:
        raise ValueError(f'{algorithm.name}\'s state needs the feature width')
    out = {name: tf.fill([feature_width if d == FEATURES else d for d in s.shape],
                         tf.cast(s.initial, s.dtype)) for name, s in declared.items()}
    if labeled_prior is not None:
        for name, s in declared.items():
            if name == LABELED_PRIOR or s.from_prior:
                out[name] = tf.constant(labeled_prior, s.dtype)
    return out


def starts_at_prior(states: Dict[str, State]) -> bool:
    """Whether any of `states` starts at the labeled class distribution."""
    return any(name == LABELED_PRIOR or s.from_prior for name, s in states.items())


def replica_mean(x):
    """Mean of `x` over the replicas of a tf.distribute step (`x` itself on one device). The
    per-replica batches are equal, so the mean of per-replica means is the global batch's."""
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.MEAN, x)


def replica_concat(x):
    """`x` of every replica concatenated along the batch axis, in replica order: the global
    batch, the same on every replica."""
    return tf.distribute.get_replica_context().all_gather(x, axis=0)


def scatter_last(state, index, values, mask):
    """`state` with state[index[i]] = values[i] for every i where mask[i]; where an index repeats
    (a global batch straddling two epochs holds an image twice), its last masked-in copy in batch
    order wins. Static-shaped, so it compiles with XLA (tf.boolean_mask's data-dependent shape
    does not), and deterministic (tensor_scatter_nd_update leaves the winner of duplicates
    unspecified): each entry of `state` takes the value at the last position that writes it."""
    positions = tf.range(tf.shape(index)[0])
    last = tf.math.unsorted_segment_max(tf.where(mask, positions, -1), index, tf.shape(state)[0])
    # Entries no position writes get the dtype's smallest value from the segment max, or -1.
    # Rows of a bank [n, ...] are written whole.
    written = tf.reshape(last >= 0, [-1] + [1] * (len(state.shape) - 1))
    return tf.where(written, tf.gather(values, tf.maximum(last, 0)), state)


def enqueue(queue, pointer, rows):
    """A FIFO queue `queue` [size, ...] with `rows` [n, ...] written at rows pointer, pointer+1,
    ... modulo size (over the oldest rows), and the pointer moved on by n: (queue, pointer).
    Static-shaped (XLA), and with n > size the last rows win (scatter_last). CoMatch's memory
    bank; USB truncates a write that passes the end instead of wrapping, the same when the size
    is a multiple of n (as in their configs)."""
    size, n = tf.shape(queue)[0], tf.shape(rows)[0]
    positions = (pointer + tf.range(n, dtype=pointer.dtype)) % size
    queue = scatter_last(queue, positions, tf.cast(rows, queue.dtype), tf.ones([n], tf.bool))
    return queue, (pointer + n) % size


def replica_offset(rows):
    """Where this replica's `rows` [n, ...] start in the global batch replica_concat makes."""
    context = tf.distribute.get_replica_context()
    return tf.cast(context.replica_id_in_sync_group, tf.int32) * tf.shape(rows)[0]
