"""Embedding memory: what SimMatch and CoMatch compute between a batch's unit-length embeddings
(the projection head, algorithms/base.Projection) and a memory of earlier ones with their labels
or class probabilities (algorithms/simmatch.py, comatch.py). Pure, static-shaped functions
(XLA); the memories themselves are algorithm state (base.scatter_last, base.enqueue)."""
import tensorflow as tf


def similarity_logits(embeddings, memory, temperature):
    """z_b . m_k / t for every embedding b [B, D] and memory row k [K, D]: [B, K] (cosine
    similarities over a temperature, both sides unit length)."""
    return tf.matmul(embeddings, memory, transpose_b=True) / temperature


def similarities(embeddings, memory, temperature):
    """softmax_k(z_b . m_k / t): how much each memory row is like each embedding, [B, K]
    (SimMatch's q, Sec. 3.2; CoMatch's a_k, its "memory-smoothing")."""
    return tf.nn.softmax(similarity_logits(embeddings, memory, temperature))


def unfold(similarity, probs, memory_labels):
    """SimMatch's unfolding (Sec. 3.3): the instance pseudo-label q^_bk proportional to
    q_bk * p_b[class of row k], normalised over k, so rows of classes the prediction p_b
    believes in gain weight. `memory_labels` [K] int."""
    scaled = similarity * tf.gather(probs, memory_labels, axis=1)
    return scaled / tf.reduce_sum(scaled, -1, keepdims=True)


def aggregate(similarity, memory_labels, num_classes):
    """SimMatch's aggregation (Sec. 3.3): sum_{k: class(k) = c} q_bk, the similarity mass on each
    class, [B, C]."""
    return tf.matmul(similarity, tf.one_hot(memory_labels, num_classes))


def smooth(probs, neighbours, alpha):
    """alpha p + (1 - alpha) p_neighbours: a prediction smoothed by its memory neighbours'
    labels (SimMatch's label propagation, CoMatch's memory-smoothed pseudo-label)."""
    return alpha * probs + (1. - alpha) * neighbours


def pseudo_label_graph(probs, column_probs, threshold, offset=0):
    """CoMatch's pseudo-label graph with self-loops (the authors' Q): W_bj = p_b . p_j, 1 where j
    is b itself, 0 where below `threshold`, each row normalised to sum 1. Rows are this replica's
    images `probs` [B, C]; columns the global batch's `column_probs` [M, C], in which this
    replica's images start at `offset`."""
    graph = tf.matmul(probs, column_probs, transpose_b=True)
    own = tf.one_hot(offset + tf.range(tf.shape(probs)[0]), tf.shape(column_probs)[0]) > 0
    graph = tf.where(own, 1., graph)
    graph *= tf.cast(graph >= threshold, graph.dtype)
    return graph / tf.reduce_sum(graph, -1, keepdims=True)


def graph_contrastive_loss(graph, embeddings, column_embeddings, temperature):
    """CoMatch's contrastive loss (the authors' loss_contrast): the cross-entropy between each
    row of the pseudo-label graph and the embedding graph softmax_j(z_b . z'_j / t) of one strong
    view's embeddings against the other's, averaged over the rows."""
    log_graph = tf.nn.log_softmax(similarity_logits(embeddings, column_embeddings, temperature))
    return tf.reduce_mean(-tf.reduce_sum(graph * log_graph, -1))
