"""One pass of a classifier over the whole unlabeled pool, and the pseudo-labels made from it.

Written once for every method that needs the teacher's view of the pool at once (the
self-training round, ssl_ema/core/distilling.py; class-distribution estimates of the imbalanced
methods): inference mode, in index order (the indices `SSLData.unlabeled` yields), a bounded
number of images in memory at a time.
"""
import numpy as np
import tensorflow as tf

from ssl_ema.core.accuracy import inference_batch


def pass_interval(algorithm, total_steps: int, pool_size: int, unlabeled_per_step: int) -> int:
    """The steps between two of `algorithm`'s passes over the pool (0: it makes none): its
    pool_pass_every_steps, else its pool_pass_every_fraction of `total_steps`, but no fewer than
    its pool_pass_every_pool_epochs epochs of the pool (each pool_size / unlabeled_per_step
    steps; alone, exactly that many)."""
    every = int(algorithm.pool_pass_every_steps) or (
        max(1, round(algorithm.pool_pass_every_fraction * total_steps))
        if algorithm.pool_pass_every_fraction else 0)
    if algorithm.pool_pass_every_pool_epochs:
        every = max(every, int(np.ceil(algorithm.pool_pass_every_pool_epochs * pool_size
                                       / max(1, unlabeled_per_step))))
    return every


def pass_due(algorithm, step: int, total_steps: int, pool_size: int,
             unlabeled_per_step: int) -> bool:
    """Whether `algorithm` passes over the pool before `step`: every pass_interval steps from
    its pool_pass_start fraction of training on (from one interval on where that is 0), never at
    step 0 (the untrained model)."""
    every = pass_interval(algorithm, total_steps, pool_size, unlabeled_per_step)
    if not every or step < 1:
        return False
    start = algorithm.pool_pass_start
    first = max(1, int(np.ceil(start * total_steps - 1e-9))) if start else every
    return step >= first and (step - first) % every == 0


def predict_pool(model, data, flip=None, batch_size: int = None, unknown: bool = False):
    """Class probabilities [pool size, K] of `model` (inference mode) on every pool image; with
    `flip` (default: where the dataset allows horizontal flips) the mean of the image's and its
    mirror image's probabilities, a test-time augmentation that the weak view already trains on
    (SimCLRv2 and Noisy Student label with the unaugmented image; flip-averaging is ours).
    `unknown`: `model` returns [logits, unknown score] (nn/heads.scoring_model, an open-set
    algorithm's), and the result is (probabilities, unknown scores [pool size]), each the mean
    over the image and its mirror image with `flip`."""
    flip = data.arrays.flip if flip is None else flip
    image_shape = data.image_shape

    def scores(x):
        out = model(x, training=False)
        logits, score = out if unknown else (out, tf.zeros(tf.shape(x)[:1]))
        return tf.nn.softmax(tf.cast(logits, tf.float32)), tf.cast(score, tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, *image_shape], tf.float32)])
    def probabilities(x):
        p, u = scores(x)
        if flip:
            p_flip, u_flip = scores(tf.reverse(x, [2]))
            p, u = (p + p_flip) / 2., (u + u_flip) / 2.
        return p, u

    pool = data.pool_images()
    batch_size = batch_size or inference_batch(image_shape)
    out = [[t.numpy() for t in probabilities(tf.constant(pool[start:start + batch_size]))]
           for start in range(0, len(pool), batch_size)]
    if out:
        probs, score = (np.concatenate(parts) for parts in zip(*out))
    else:
        probs, score = np.zeros([0, data.num_classes], np.float32), np.zeros([0], np.float32)
    return (probs, score) if unknown else probs


def pseudo_labels(probs: np.ndarray, kind: str = 'soft', per_class: int = 0,
                  temperature: float = 1., certainty=None):
    """(targets [N, K], weights [N]) from the teacher's probabilities on the pool.

    kind='soft': the probabilities themselves, sharpened by `temperature` (p^(1/T), normalised;
    SimCLRv2's distillation loss, arXiv 2006.10029 Eq. 2, uses the teacher's softmax at T = 1).
    kind='hard': one-hot arg-max. `certainty` (label propagation's, per image): the weights start
    from it instead of 1 (Iscen et al.'s per-image weight). `per_class` > 0 keeps, for each class, only the `per_class`
    images most confidently predicted as it (weight 0 for the rest), a class-balanced selection
    as Noisy Student's (arXiv 1911.04252, Sec. 3.1: the most confident images of each class; it
    also duplicates images of rare classes, which we do not); 0 keeps every image."""
    probs = np.asarray(probs, np.float64)
    if kind == 'hard':
        targets = np.eye(probs.shape[1])[probs.argmax(1)]
    else:
        powered = probs ** (1. / temperature)
        targets = powered / powered.sum(1, keepdims=True)
    weights = np.ones(len(probs)) if certainty is None else np.asarray(certainty, np.float64)
    if per_class:
        chosen = np.zeros(len(probs))
        predicted, confidence = probs.argmax(1), probs.max(1)
        for c in range(probs.shape[1]):
            members = np.flatnonzero(predicted == c)
            # Most confident first; ties by index, so the selection is a pure function of probs.
            order = members[np.lexsort((members, -confidence[members]))]
            chosen[order[:per_class]] = 1.
        weights = weights * chosen
    return targets.astype(np.float32), weights.astype(np.float32)


def features_model(model):
    """The model's pooled features (its layer named 'features', nn/backbones.features) as a
    Keras model of the same input."""
    import keras
    from ssl_ema.nn import backbones
    return keras.Model(model.inputs, backbones.features(model))


def embed(model, images, flip: bool, batch_size: int = None) -> np.ndarray:
    """L2-normalised penultimate features of `images` (sliceable, normalised), summed over the
    image and its mirror image when `flip`."""
    features = features_model(model)

    @tf.function(reduce_retracing=True)
    def run(x):
        f = tf.cast(features(x, training=False), tf.float32)
        if flip:
            f += tf.cast(features(tf.reverse(x, [2]), training=False), tf.float32)
        return tf.math.l2_normalize(f, axis=-1)
    batch_size = batch_size or inference_batch(images.shape[1:])
    return np.concatenate([run(tf.constant(images[s:s + batch_size])).numpy()
                           for s in range(0, len(images), batch_size)])


def propagate(labeled_features, labels, pool_features, num_classes: int, k: int = 50,
              alpha: float = 0.99, gamma: float = 3., iterations: int = 20):
    """Label propagation over the k-nearest-neighbour graph of the labeled and pool features
    (Iscen et al., CVPR 2019, arXiv 1904.04717, Sec. 3.2; Zhou et al. 2004): affinities
    w_ij = max(0, cos)^gamma (Eq. 9), W symmetrised and normalised W_n = D^-1/2 W D^-1/2, then
    (I - alpha W_n) Z = Y solved by conjugate gradient per class (Eq. 10, `iterations` steps, as
    theirs). Returns the pool's class scores Z, each row normalised to sum to 1 (a soft
    pseudo-label), and each pool image's certainty 1 - H(z) / log K (their Eq. 11 weight)."""
    import scipy.sparse as sparse
    from scipy.sparse.linalg import cg
    from sklearn.neighbors import NearestNeighbors
    x = np.concatenate([labeled_features, pool_features]).astype(np.float32)
    n, k = len(x), min(k, len(x) - 1)
    distances, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    cosine = 1. - distances[:, 1:] ** 2 / 2.   # unit vectors: |a - b|^2 = 2 - 2 cos
    w = sparse.csr_matrix((np.maximum(cosine, 0.).ravel() ** gamma,
                           (np.repeat(np.arange(n), k), neighbours[:, 1:].ravel())), shape=(n, n))
    w = w + w.T
    d = 1. / np.sqrt(np.asarray(w.sum(1)).ravel() + 1e-12)
    system = sparse.eye(n) - alpha * sparse.diags(d) @ w @ sparse.diags(d)
    z = np.zeros((n, num_classes))
    for c in range(num_classes):
        y = np.zeros(n)
        y[:len(labels)][np.asarray(labels) == c] = 1.
        z[:, c], _ = cg(system, y, maxiter=iterations)
    z = np.maximum(z[len(labels):], 0.) + 1e-12
    probs = z / z.sum(1, keepdims=True)
    certainty = 1. + (probs * np.log(probs)).sum(1) / np.log(num_classes)
    return probs.astype(np.float32), certainty.astype(np.float32)
