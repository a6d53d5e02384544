"""CoMatch (Li, Xiong and Hoi, ICCV 2021, arXiv:2011.11183): pseudo-labels smoothed by a memory of
embeddings, and a contrastive loss shaped by the pseudo-label graph.

Every image gets class probabilities and a unit-length embedding (base.Projection). For the
unlabeled images, with a weak and two strong views (Sec. 3.2-3.3):
- p^w, the weak view's prediction aligned to a uniform class distribution over the last 32
  batches (USB's DistAlignQueueHook, da_len 32; base.align_to_uniform);
- memory-smoothed pseudo-label: q = alpha p^w + (1 - alpha) sum_k a_k q_k, a_k =
  softmax_k(z^w . z_k / t) over a FIFO queue of the last weak-view and labeled embeddings z_k
  with their probabilities q_k (p^w, or the label's one-hot) (nn/memory.similarities, smooth;
  the state `queue_embeddings`, `queue_probs`, `queue_pointer`: base.enqueue);
- L_u: cross-entropy of the first strong view's prediction to q (a soft target), where
  max q >= tau;
- the pseudo-label graph W^q_bj = q_b . q_j with self-loops, zeroed below T = 0.8, rows
  normalised, is the target of the embedding graph softmax_j(z^s1_b . z^s2_j / t) between the
  two strong views: L_ctr, their cross-entropy (nn/memory.pseudo_label_graph,
  graph_contrastive_loss).
Loss = L_s + lambda_u L_u + lambda_c L_ctr. The graph spans the global batch: under
tf.distribute each replica's rows meet every replica's columns (replica_concat), so two replicas
train as one device does (USB's graph is per GPU).

Defaults: USB's config/classic_cv/comatch/comatch_cifar10_40_0.yaml and the paper's CIFAR
setting: tau = 0.95, T = 0.8, t = 0.2, alpha = 0.9, lambda_u = lambda_c = 1, soft pseudo-labels
(hard_label: False), 64-dimensional embeddings, a queue of 5 batches of (1 + uratio) x 64 =
2560 rows (queue_batch 5), DA over 32 batches, uratio 7 (runs/algorithms/comatch.flags). Those
configs now carry use_epass: True, added after USB's published results; we follow the published
setting, one projection head.

Deliberate differences: USB smooths from its second epoch once queue_batch steps have passed;
here once the queue is full (`metrics['queue_full']`), which is what the wait stands for (its rows
start at zero). USB's DA window starts at zeros; here at 1/C. The contrastive loss uses the exact
log-softmax (USB adds 1e-7 inside the log). With --teacher=ema p^w comes from the EMA model; the
embeddings stay the student's (gradient stopped): heads are not averaged (core/ema.py).
"""
import tensorflow as tf

from ssl_ema.nn import losses, memory
from ssl_ema.algorithms.base import (EmbeddingMemory, Losses, State, align_to_uniform,
                                     concat_forward_heads, enqueue, hparam, register,
                                     replica_concat, replica_offset, target_logits,
                                     teacher_field)


@register('comatch')
class CoMatch(EmbeddingMemory):
    views = ('weak', 'strong', 'strong')
    ramp_up = 'none'
    consistency_weight: float = hparam(1., 'lambda_u: weight of the pseudo-label loss (USB\'s '
                                       'ulb_loss_ratio, not ramped).')
    contrast_weight: float = hparam(1., 'lambda_c: weight of the graph contrastive loss (USB\'s '
                                    'contrast_loss_ratio).')
    confidence_threshold: float = hparam(0.95, 'tau: the smoothed pseudo-label counts when its '
                                         'largest probability reaches it (USB\'s p_cutoff).')
    contrast_threshold: float = hparam(0.8, 'T: pseudo-label similarities below it are no edge '
                                       'of the graph (USB\'s contrast_p_cutoff).')
    similarity_temperature: float = hparam(0.2, 't of the memory\'s and the embedding graph\'s '
                                           'similarities (USB\'s T).')
    smoothing_alpha: float = hparam(0.9, 'alpha: weight of p^w against its memory neighbours\' '
                                    'probabilities (USB\'s smoothing_alpha).')
    queue_size: int = hparam(2560, 'Rows of the embedding memory (USB\'s queue_batch 5 x (1 + '
                             'uratio 7) x batch 64).')
    projection_units: int = hparam(64, 'Width of the embeddings (USB\'s proj_size).')
    prediction_window: int = hparam(32, 'Distribution alignment over the mean predictions of the '
                                    'last this many batches (USB\'s da_len), >= 1.')
    teacher: str = teacher_field()

    def state(self, num_classes, pool_size):
        return {**self.alignment_state(num_classes),
                'queue_embeddings': State((self.queue_size, self.projection_units), 0.),
                'queue_probs': State((self.queue_size, num_classes), 0.),
                'queue_pointer': State((), 0, tf.int32),
                'queue_full': State((), 0, tf.int32)}

    def __call__(self, student, teacher, batch):
        weak, strong1, strong2 = batch.unlabeled
        (labeled_logits, weak_logits, strong_logits, _), (labeled_z, weak_z, z1, z2) = \
            concat_forward_heads(batch.heads, batch.labeled_x, weak, strong1, strong2)
        xe = losses.cross_entropy(batch.labels, labeled_logits)
        probs = tf.nn.softmax(target_logits(self, teacher, weak, weak_logits))
        probs, p_model = align_to_uniform(probs, batch.state['p_model'])
        old, t = batch.state, self.similarity_temperature
        weak_z, labeled_z = tf.stop_gradient(weak_z), tf.stop_gradient(labeled_z)
        full = old['queue_full'] > 0
        neighbours = tf.matmul(memory.similarities(weak_z, old['queue_embeddings'], t),
                               old['queue_probs'])
        target = tf.where(full, memory.smooth(probs, neighbours, self.smoothing_alpha), probs)
        mask = losses.confidence_mask(target, self.confidence_threshold)
        pseudo = losses.soft_cross_entropy(target, strong_logits, mask)
        graph = memory.pseudo_label_graph(target, replica_concat(target),
                                          self.contrast_threshold, replica_offset(target))
        contrast = memory.graph_contrastive_loss(graph, z1, replica_concat(z2), t)
        # The queue takes the global batch's weak views (with p^w) then its labeled images.
        embeddings = tf.concat([replica_concat(weak_z), replica_concat(labeled_z)], 0)
        rows_probs = tf.concat([replica_concat(probs),
                                replica_concat(tf.one_hot(batch.labels, probs.shape[-1]))], 0)
        queue, pointer = enqueue(old['queue_embeddings'], old['queue_pointer'], embeddings)
        queue_probs, _ = enqueue(old['queue_probs'], old['queue_pointer'], rows_probs)
        written = old['queue_pointer'] + tf.shape(embeddings)[0]   # has the pointer wrapped?
        state = {'p_model': p_model, 'queue_embeddings': queue, 'queue_probs': queue_probs,
                 'queue_pointer': pointer,
                 'queue_full': tf.cast(full | (written >= self.queue_size), tf.int32)}
        return Losses(xe, self.consistency_weight * pseudo + self.contrast_weight * contrast,
                      {'pseudo_label': pseudo, 'contrast': contrast,
                       'mask': tf.reduce_mean(mask), 'queue_full': tf.cast(full, tf.float32)},
                      state)
