"""CoMatch (Li, Xiong and Hoi, "CoMatch: Semi-supervised Learning with Contrastive Graph
Regularization", ICCV 2021, arXiv:2011.11183; the authors' code salesforce/CoMatch,
Train_CoMatch.py): pseudo-labels smoothed by a memory of embeddings, and a contrastive loss
shaped by the pseudo-label graph.

Every image gets class probabilities and a unit-length embedding (base.Projection). For the
unlabeled images, with a weak and two strong views, each step named as the authors' code
comments name it (the paper's equation numbers are not cited: its text past the abstract could
not be read when this was checked; every formula was checked against the authors' code and
USB's algorithms/comatch/comatch.py):
- "DA": p^w, the weak view's prediction aligned to a uniform class distribution over the last
  32 batches (the authors' prob_list of batch means, at most 32; USB's DistAlignQueueHook,
  da_len 32; base.align_to_uniform);
- "memory-smoothing": q = alpha p^w + (1 - alpha) sum_k a_k q_k, a_k = softmax_k(z^w . z_k / t)
  over a FIFO queue of the last weak-view and labeled embeddings z_k with their probabilities
  q_k (p^w before smoothing, or the label's one-hot) (nn/memory.similarities, smooth; the state
  `queue_embeddings`, `queue_probs`, `queue_pointer`: base.enqueue);
- "unsupervised classification loss" L_u: cross-entropy of the first strong view's prediction
  to q (a soft target), where max q >= tau, averaged over every unlabeled image;
- "pseudo-label graph with self-loop": W^q_bj = q_b . q_j, 1 on the diagonal, zeroed below
  T = 0.8, rows normalised, is the target of the "embedding similarity" graph
  softmax_j(z^s1_b . z^s2_j / t) between the two strong views: the "contrastive loss" L_ctr,
  their cross-entropy averaged over the rows (nn/memory.pseudo_label_graph,
  graph_contrastive_loss).
Loss = L_s + lambda_u L_u + lambda_c L_ctr (the authors' loss_x + lam_u * loss_u + lam_c *
loss_contrast). The graph spans the global batch: under tf.distribute each replica's rows meet
every replica's columns (replica_concat), so two replicas train as one device does (USB's graph
is per GPU).

Defaults: the authors' Train_CoMatch.py arguments and USB's
config/classic_cv/comatch/comatch_cifar10_40_0.yaml agree: tau = 0.95 (--thr, p_cutoff),
T = 0.8 (--contrast-th, contrast_p_cutoff), t = 0.2 (--temperature, T), alpha = 0.9 (--alpha,
smoothing_alpha), lambda_u = lambda_c = 1 (--lam-u, --lam-c; ulb_loss_ratio,
contrast_loss_ratio), soft pseudo-labels (hard_label: False), 64-dimensional embeddings
(--low-dim, proj_size), a queue of 5 batches of (1 + uratio) x 64 = 2560 rows (--queue-batch,
queue_batch 5), DA over 32 batches (da_len), uratio 7 (--mu; runs/algorithms/comatch.flags).
USB's configs now carry use_epass: True, added after USB's published results; we follow the
published setting, one projection head.

Deliberate differences: USB smooths from its second epoch once queue_batch steps have passed
(epoch > 0 and it > queue_batch), the authors from step queue_batch + 1 (epoch > 0 or it >
queue_batch, by which the queue is full); here once the queue is full (`metrics['queue_full']`),
one step before the authors. The DA window starts at 1/C (USB's at zeros, the authors' list
empty: both align the first batches by the mean of those seen so far). The contrastive loss
uses the exact log-softmax (both add 1e-7 inside the log). The projection head is USB's
Dense - ReLU - Dense (the authors' WideResnet has a LeakyReLU of slope 0.1 between its fc1 and
fc2).

--teacher=ema: the teacher's side is the EMA model's, its averaged projection head included
(base.target_outputs; core/ema.Average.carry_heads): p^w, and the weak-view and labeled
embeddings that smooth q and enter the memory, as the momentum encoder (with its projection
head) of the authors' imagenet/Model.py makes them. The graph's two strong views stay the
student's (the authors' CIFAR code; their ImageNet code takes the second from the momentum
encoder, with a queue of its own).
"""
import tensorflow as tf

from ssl_ema.nn import losses, memory
from ssl_ema.algorithms.base import (EmbeddingMemory, Losses, State, align_to_uniform,
                                     concat_forward_heads, enqueue, hparam, register,
                                     replica_concat, replica_offset, target_outputs,
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
        xe = losses.cross_entropy(batch.labels, labeled_logits)   # L_s
        # The teacher's side (--teacher's, gradient stopped): p^w and the memory's embeddings.
        (_, weak_logits), (labeled_z, weak_z) = target_outputs(
            self, teacher, (batch.labeled_x, weak), ((labeled_logits, weak_logits),
                                                     (labeled_z, weak_z)))
        probs = tf.nn.softmax(weak_logits)
        # "DA": p^w aligned to uniform over the last 32 batch means
        probs, p_model = align_to_uniform(probs, batch.state['p_model'])
        old, t = batch.state, self.similarity_temperature
        full = old['queue_full'] > 0
        # "memory-smoothing": q = alpha p^w + (1 - alpha) sum_k softmax_k(z^w . z_k / t) q_k
        neighbours = tf.matmul(memory.similarities(weak_z, old['queue_embeddings'], t),
                               old['queue_probs'])
        target = tf.where(full, memory.smooth(probs, neighbours, self.smoothing_alpha), probs)
        # L_u: soft cross-entropy of the first strong view to q where max q >= tau
        mask = losses.confidence_mask(target, self.confidence_threshold)
        pseudo = losses.soft_cross_entropy(target, strong_logits, mask)
        # "pseudo-label graph with self-loop" W^q = q q^T, diagonal 1, zeroed below T, rows
        # normalised; L_ctr: its cross-entropy to softmax_j(z^s1_b . z^s2_j / t)
        graph = memory.pseudo_label_graph(target, replica_concat(target),
                                          self.contrast_threshold, replica_offset(target))
        contrast = memory.graph_contrastive_loss(graph, z1, replica_concat(z2), t)
        # "update memory bank": the global batch's weak views (with p^w before smoothing, the
        # authors' probs_orig) then its labeled images (with their one-hot labels)
        embeddings = tf.concat([replica_concat(weak_z), replica_concat(labeled_z)], 0)
        rows_probs = tf.concat([replica_concat(probs),
                                replica_concat(tf.one_hot(batch.labels, probs.shape[-1]))], 0)
        queue, pointer = enqueue(old['queue_embeddings'], old['queue_pointer'], embeddings)
        queue_probs, _ = enqueue(old['queue_probs'], old['queue_pointer'], rows_probs)
        written = old['queue_pointer'] + tf.shape(embeddings)[0]   # has the pointer wrapped?
        state = {'p_model': p_model, 'queue_embeddings': queue, 'queue_probs': queue_probs,
                 'queue_pointer': pointer,
                 'queue_full': tf.cast(full | (written >= self.queue_size), tf.int32)}
        # L_s + lambda_u L_u + lambda_c L_ctr
        return Losses(xe, self.consistency_weight * pseudo + self.contrast_weight * contrast,
                      {'pseudo_label': pseudo, 'contrast': contrast,
                       'mask': tf.reduce_mean(mask), 'queue_full': tf.cast(full, tf.float32)},
                      state)
