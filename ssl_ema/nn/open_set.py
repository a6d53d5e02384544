"""The one-vs-all losses of the open-set algorithms (OpenMatch, IOMatch), on one-vs-all logits
[N, 2K] laid out as nn/heads.OneVsAll's: row 0 of [N, 2, K] "not class k", row 1 "class k"."""
import tensorflow as tf

from ssl_ema.nn.heads import ova_probabilities

EPS = 1e-8   # inside the logarithms, as the authors' (OP_Match utils/misc.py)


def ova_loss(ova_logits, labels):
    """OpenMatch's one-vs-all loss on labeled images (Saito et al. 2021, Eq. 1, the hard-negative
    form): -log p_y(inlier) - min over k != y of log p_k(outlier), the batch mean; the
    negative term is the most confident wrong classifier's alone (OP_Match's ova_loss;
    IOMatch's mb_sup_loss)."""
    probs = ova_probabilities(ova_logits)
    k = probs.shape[-1]
    positive = tf.one_hot(labels, k)
    inlier = -tf.reduce_sum(positive * tf.math.log(probs[:, 1, :] + EPS), -1)
    outlier = tf.reduce_max((1. - positive) * -tf.math.log(probs[:, 0, :] + EPS), -1)
    return tf.reduce_mean(inlier + outlier)


def ova_entropy(ova_logits):
    """OpenMatch's open-set entropy minimisation term: the entropy of each one-vs-all
    classifier's pair, mean over the K classifiers and the batch (OP_Match's ova_ent)."""
    probs = ova_probabilities(ova_logits)
    return tf.reduce_mean(tf.reduce_sum(-probs * tf.math.log(probs + EPS), 1))


def soft_open_set_consistency(ova_logits_1, ova_logits_2):
    """SOCR (OpenMatch Eq. 3): sum over classes k and the pair t of |p_k(t | view 1) - p_k(t |
    view 2)|^2, the batch mean; both views carry gradients, as the authors'."""
    difference = ova_probabilities(ova_logits_1) - ova_probabilities(ova_logits_2)
    return tf.reduce_mean(tf.reduce_sum(tf.square(difference), [1, 2]))
