"""Weighted k-nearest-neighbour accuracy of a representation (DINO's protocol, Caron et al. 2021,
Sec. 4.1 and eval_knn.py knn_classifier; Wu et al. 2018).

Features are l2-normalised; each query's k most cosine-similar memory images vote for their
labels with weight exp(similarity / T), and the class with the largest total is the prediction
(ties go to the smaller class index; eval_knn.py leaves them to torch's sort). Defaults k = 20,
T = 0.07 are eval_knn.py's. The memory is the labeled split: what the representation buys when
only those labels exist.
"""
import numpy as np
import tensorflow as tf

from ssl_ema.core.accuracy import inference_batch


def predict(memory, memory_labels, queries, num_classes, k=20, temperature=0.07):
    """The k-NN class of every row of `queries` ([Q, D]) given `memory` ([M, D]) and its labels."""
    memory = tf.math.l2_normalize(tf.cast(memory, tf.float32), -1)
    queries = tf.math.l2_normalize(tf.cast(queries, tf.float32), -1)
    k = min(k, int(memory.shape[0]))
    similarity, index = tf.math.top_k(tf.matmul(queries, memory, transpose_b=True), k)
    votes = tf.one_hot(tf.gather(tf.cast(memory_labels, tf.int32), index), num_classes)
    scores = tf.reduce_sum(votes * tf.exp(similarity / temperature)[..., None], 1)
    return tf.argmax(scores, -1, output_type=tf.int32).numpy()


def features(model, x, batch_size=None) -> np.ndarray:
    """`model`'s inference-mode outputs on `x`, in batches (default inference_batch's), as
    float32."""
    batch_size = batch_size or inference_batch(x.shape[1:])
    return np.concatenate([np.asarray(model(x[i:i + batch_size], training=False), np.float32)
                           for i in range(0, len(x), batch_size)])


def accuracy(model, memory_x, memory_labels, x, y, num_classes, k=20, temperature=0.07,
             batch_size=None) -> float:
    """Percentage of `x` whose k-NN class, in `model`'s features, with (memory_x, memory_labels)
    as the memory, is `y`."""
    batch_size = batch_size or inference_batch(x.shape[1:])
    memory = features(model, memory_x, batch_size)
    correct = 0
    for i in range(0, len(x), batch_size):   # [batch, M] similarities at a time
        pred = predict(memory, memory_labels, features(model, x[i:i + batch_size], batch_size),
                       num_classes, k, temperature)
        correct += int((pred == y[i:i + batch_size]).sum())
    return 100. * correct / max(1, len(x))
