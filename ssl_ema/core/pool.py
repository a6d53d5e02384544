"""One pass of a classifier over the whole unlabeled pool, and the pseudo-labels made from it.

Written once for every method that needs the teacher's view of the pool at once (the
self-training round, ssl_ema/core/distilling.py; class-distribution estimates of the imbalanced
methods): inference mode, in index order (the indices `SSLData.unlabeled` yields), a bounded
number of images in memory at a time.
"""
import numpy as np
import tensorflow as tf


def predict_pool(model, data, flip=None, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities [pool size, K] of `model` (inference mode) on every pool image; with
    `flip` (default: where the dataset allows horizontal flips) the mean of the image's and its
    mirror image's probabilities, a test-time augmentation that the weak view already trains on
    (SimCLRv2 and Noisy Student label with the unaugmented image; flip-averaging is ours)."""
    flip = data.arrays.flip if flip is None else flip
    image_shape = data.image_shape

    @tf.function(input_signature=[tf.TensorSpec([None, *image_shape], tf.float32)])
    def probabilities(x):
        p = tf.nn.softmax(tf.cast(model(x, training=False), tf.float32))
        if flip:
            p = (p + tf.nn.softmax(tf.cast(model(tf.reverse(x, [2]), training=False),
                                           tf.float32))) / 2.
        return p

    pool = data.pool_images()
    out = [probabilities(tf.constant(pool[start:start + batch_size])).numpy()
           for start in range(0, len(pool), batch_size)]
    return np.concatenate(out) if out else np.zeros([0, data.num_classes], np.float32)


def pseudo_labels(probs: np.ndarray, kind: str = 'soft', per_class: int = 0,
                  temperature: float = 1.):
    """(targets [N, K], weights [N]) from the teacher's probabilities on the pool.

    kind='soft': the probabilities themselves, sharpened by `temperature` (p^(1/T), normalised;
    SimCLRv2's distillation loss, arXiv 2006.10029 Eq. 2, uses the teacher's softmax at T = 1).
    kind='hard': one-hot arg-max. `per_class` > 0 keeps, for each class, only the `per_class`
    images most confidently predicted as it (weight 0 for the rest), a class-balanced selection
    as Noisy Student's (arXiv 1911.04252, Sec. 3.1: the most confident images of each class; it
    also duplicates images of rare classes, which we do not); 0 keeps every image."""
    probs = np.asarray(probs, np.float64)
    if kind == 'hard':
        targets = np.eye(probs.shape[1])[probs.argmax(1)]
    else:
        powered = probs ** (1. / temperature)
        targets = powered / powered.sum(1, keepdims=True)
    weights = np.ones(len(probs))
    if per_class:
        weights[:] = 0.
        predicted, confidence = probs.argmax(1), probs.max(1)
        for c in range(probs.shape[1]):
            members = np.flatnonzero(predicted == c)
            # Most confident first; ties by index, so the selection is a pure function of probs.
            order = members[np.lexsort((members, -confidence[members]))]
            weights[order[:per_class]] = 1.
    return targets.astype(np.float32), weights.astype(np.float32)
