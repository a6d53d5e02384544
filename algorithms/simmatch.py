"""SimMatch (Zheng et al., CVPR 2022, arXiv:2203.06915): FixMatch with similarity matching against
a memory of the labeled images' embeddings.

A projection head (base.Projection: an MLP on the pooled features, unit-length output) embeds
every image; the labeled memory holds one embedding per labeled image and its label (the state
`bank`, `bank_labels`: a per-index bank, hence `needs_labeled_indices`). For an unlabeled image
(Sec. 3.2-3.3):
- the semantic prediction p^w on the weak view, aligned to a uniform class distribution over the
  last 32 batches (USB's DistAlignQueueHook, da_len 32; base.align_to_uniform);
- the instance similarity q^w = softmax_k(z^w . m_k / t) to the labeled embeddings m_k;
- unfolding: the instance pseudo-label q^_k proportional to q^w_k p^w[class(k)]
  (nn/memory.unfold); aggregation: the semantic pseudo-label
  p^ = alpha p^w + (1 - alpha) sum_{k: class(k) = c} q^w_k (nn/memory.aggregate, smooth);
- L_u: cross-entropy of the strong view's prediction to p^, where max p^ >= tau (FixMatch's
  Eq. 4 with p^ as a soft target); L_in: cross-entropy of the strong view's similarity
  q^s = softmax_k(z^s . m_k / t) to q^.
Loss = L_s + lambda_u L_u + lambda_in L_in. After the loss each labeled image's memory row
becomes normalize(0.7 m + 0.3 z), z its embedding (gradient stopped) in this pass (USB's bank
update for CIFAR, SVHN and STL-10, where it uses no EMA teacher).

Defaults: USB's config/classic_cv/simmatch/simmatch_cifar10_40_0.yaml: tau = 0.95, t = 0.1
(its code default 0.5), alpha = 0.9, lambda_u = lambda_in = 1, 128-dimensional embeddings, DA
over 32 batches, uratio 7 (runs/algorithms/simmatch.flags). Those configs now carry
use_epass: True (three averaged projection heads), added after USB's published results (USB
commit 639cfbf); we follow the published setting, one head.

Deliberate differences: USB switches L_in and the aggregation off during its first epoch (1/1024
of training) while the memory fills from random rows; here the memory starts empty (zeros, labels
-1) and both start once every labeled image has a row (`metrics['memory_ready']`), the condition
the warm-up stands for. USB's DA window starts at zeros; here at 1/C (as AdaMatch's).

--teacher=ema: the teacher's side of every target is the EMA model's, its averaged projection head
included (base.target_outputs; core/ema.Average.carry_heads): p^w, the weak view's embedding z^w
and the labeled embeddings z written into the memory, as SimMatch's EMA teacher (the one USB
uses outside CIFAR, SVHN and STL-10: ema_feats_x_lb from the EMA model) is the whole model with
its head. The strong view's q^s stays the student's. The memory's momentum stays
--bank_momentum (USB's EMA-teacher setting overwrites rows: --bank_momentum=0).
"""
import tensorflow as tf

from ssl_ema.nn import losses, memory
from ssl_ema.algorithms.base import (EmbeddingMemory, Losses, State, align_to_uniform,
                                     concat_forward_heads, hparam, register, replica_concat,
                                     scatter_last, target_outputs, teacher_field)


@register('simmatch')
class SimMatch(EmbeddingMemory):
    views = ('weak', 'strong')
    ramp_up = 'none'
    needs_labeled_indices = True
    consistency_weight: float = hparam(1., 'lambda_u: weight of the pseudo-label loss L_u (USB\'s '
                                       'ulb_loss_ratio, not ramped).')
    instance_weight: float = hparam(1., 'lambda_in: weight of the instance similarity loss L_in '
                                    '(USB\'s in_loss_ratio).')
    confidence_threshold: float = hparam(0.95, 'tau: the smoothed pseudo-label counts when its '
                                         'largest probability reaches it (USB\'s p_cutoff).')
    similarity_temperature: float = hparam(0.1, 't of the similarities to the labeled memory '
                                           '(USB\'s CIFAR-10 T).')
    smoothing_alpha: float = hparam(0.9, 'alpha: weight of p^w against the similarity mass per '
                                    'class in the pseudo-label (USB\'s smoothing_alpha).')
    bank_momentum: float = hparam(0.7, 'Momentum of each labeled image\'s memory row (USB\'s '
                                  'ema_bank for CIFAR, SVHN, STL-10).')
    projection_units: int = hparam(128, 'Width of the embeddings (USB\'s proj_size).')
    prediction_window: int = hparam(32, 'Distribution alignment over the mean predictions of the '
                                    'last this many batches (USB\'s da_len), >= 1.')
    teacher: str = teacher_field()

    def state(self, num_classes, pool_size, labeled_size):
        return {**self.alignment_state(num_classes),
                'bank': State((labeled_size, self.projection_units), 0.),
                'bank_labels': State((labeled_size,), -1, tf.int32)}

    def __call__(self, student, teacher, batch):
        weak, strong = batch.unlabeled
        (labeled_logits, weak_logits, strong_logits), (labeled_z, weak_z, strong_z) = \
            concat_forward_heads(batch.heads, batch.labeled_x, weak, strong)
        xe = losses.cross_entropy(batch.labels, labeled_logits)
        # The teacher's side (--teacher's, gradient stopped): p^w, z^w and the memory's new z.
        (_, weak_logits), (labeled_z, weak_z) = target_outputs(
            self, teacher, (batch.labeled_x, weak), ((labeled_logits, weak_logits),
                                                     (labeled_z, weak_z)))
        probs = tf.nn.softmax(weak_logits)
        probs, p_model = align_to_uniform(probs, batch.state['p_model'])
        bank, bank_labels = batch.state['bank'], batch.state['bank_labels']
        ready = tf.reduce_all(bank_labels >= 0)   # every labeled image has its row
        owners, t = tf.maximum(bank_labels, 0), self.similarity_temperature
        similarity = memory.similarities(weak_z, bank, t)
        instance_target = memory.unfold(similarity, probs, owners)
        target = tf.where(ready, memory.smooth(probs, memory.aggregate(
            similarity, owners, probs.shape[-1]), self.smoothing_alpha), probs)
        mask = losses.confidence_mask(target, self.confidence_threshold)
        pseudo = losses.soft_cross_entropy(target, strong_logits, mask)
        instance = tf.cast(ready, tf.float32) * losses.soft_cross_entropy(
            instance_target, memory.similarity_logits(strong_z, bank, t))
        # The memory update, from the global batch (every replica's labeled images).
        index = replica_concat(tf.cast(batch.labeled_index, tf.int32))
        rows = tf.math.l2_normalize(
            self.bank_momentum * tf.gather(bank, index)
            + (1. - self.bank_momentum) * replica_concat(labeled_z), -1)
        everyone = tf.ones_like(index, tf.bool)
        state = {'p_model': p_model, 'bank': scatter_last(bank, index, rows, everyone),
                 'bank_labels': scatter_last(bank_labels, index,
                                             replica_concat(tf.cast(batch.labels, tf.int32)),
                                             everyone)}
        return Losses(xe, self.consistency_weight * pseudo + self.instance_weight * instance,
                      {'pseudo_label': pseudo, 'instance': instance,
                       'mask': tf.reduce_mean(mask),
                       'memory_ready': tf.cast(ready, tf.float32)}, state)
