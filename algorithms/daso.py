"""DASO (Oh et al., CVPR 2022, arXiv 2106.05682): distribution-aware semantics-oriented
pseudo-labels, plugged on a base algorithm (--base_algorithm, FixMatch: USB's classic_cv_imb
fixmatch_daso; the authors' ytaek-oh/daso, lib/models/daso_model.py).

A class-balanced queue keeps, for every class, the pooled features of the last L labeled images
of that class as the EMA model sees them (in inference mode; the authors' and USB's EMA model
runs in training mode there, with the labeled batch's own batch-norm statistics); the class prototypes c_k are their means. Each
unlabeled image's semantic pseudo-label is q^s = softmax_k(cos(z, c_k) / T_proto), z the pooled
features of its weak view (Sec. 3.2). It is blended with the linear (classifier's) pseudo-label q
by the distribution-aware weight of q's class k = argmax q: q^ = (1 - v_k) q + v_k q^s, with
v = m^(1/T_dist) normalised and divided by its largest entry, m the class distribution of the
last period's pseudo-labels (Sec. 3.3, the distribution-aware blending): the classes the
pseudo-labels over-predict (the head) lean on the semantic pseudo-label, the rare ones on the
linear one. The base's confidence mask and hard label come from q^. The semantic alignment
loss (Sec. 3.4) trains the strong view's similarities to the same prototypes towards q^s:
L_align = H(q^s, softmax(cos(z_strong, c) / T_proto)), weighted by lambda_align. For the first
`pretrain_fraction` of training DASO is its base alone (its pseudo-labels still counted into m).

Ours against USB: the prototypes are the current ones, with this batch's labeled features
already in the queue (the authors' order; USB's pseudo-labels use the previous batch's
similarities). The queue is a State [K, L, D] with a write pointer and a fill count per class
(algorithms/state.py, D the features' width), m is counted over every `dist_update_steps` steps
(the authors' PL_DIST_UPDATE_PERIOD) and both are checkpointed. --teacher picks the model whose
weak-view prediction and features make both pseudo-labels (student: the paper's). Defaults:
L = 256 (the authors' QUEUE.MAX_SIZE, USB daso_queue_len), T_proto = 0.05, T_dist = 1.5 (for
the same labeled and unlabeled imbalance; the authors' config gives 0.3 for CIFAR-10 when they
differ), lambda_align = 1, m over 100 steps, pretraining 5000 of 250000 steps (the authors'
configs/cifar10/fixmatch_daso.yaml and lib/config/defaults.py; USB: 5120 of 262144), the base's
lambda_u = 1 and tau = 0.95.
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.nn.backbones import logits_and_features
from ssl_ema.algorithms.base import (ConfigError, Losses, State, WeakStrong, check_base, hparam,
                                     register, replica_concat, scatter_last, teacher_field)
from ssl_ema.algorithms.state import FEATURES

BASES = ('fixmatch',)   # the base algorithms DASO blends the pseudo-labels of


def enqueue_per_class(queue, pointer, filled, features, labels):
    """The class-balanced queue [K, L, D] with each of `features` [B, D] written at its class's
    pointer (oldest first, wrapping), the pointers [K] moved on and the fill counts [K] grown
    (at most L): (queue, pointer, filled)."""
    k, length = queue.shape[0], queue.shape[1]
    labels = tf.cast(labels, tf.int32)
    one_hot = tf.one_hot(labels, k, dtype=tf.int32)
    rank = tf.reduce_sum(tf.cumsum(one_hot, 0, exclusive=True) * one_hot, -1)   # within class
    slot = labels * length + (tf.gather(pointer, labels) + rank) % length
    rows = scatter_last(tf.reshape(queue, [k * length, -1]), slot,
                        tf.cast(features, queue.dtype), tf.ones_like(labels, tf.bool))
    counts = tf.reduce_sum(one_hot, 0)
    return (tf.reshape(rows, tf.shape(queue)), (pointer + counts) % length,
            tf.minimum(filled + counts, length))


def prototypes(queue, filled):
    """The mean [K, D] of each class's filled queue rows (zero for a class not yet seen)."""
    return tf.reduce_sum(queue, 1) / tf.cast(tf.maximum(filled, 1), queue.dtype)[:, None]


def semantic_logits(features, centres, temperature):
    """cos(features, prototype) / T_proto [B, K]."""
    return tf.matmul(tf.math.l2_normalize(features, -1),
                     tf.math.l2_normalize(centres, -1), transpose_b=True) / temperature


def blend_weights(distribution, temperature):
    """v [K]: m^(1/T_dist) normalised, divided by its largest entry."""
    powered = losses.sharpen(distribution, temperature)
    return powered / tf.reduce_max(powered)


def daso_pseudo_labels(linear, semantic, distribution, temperature):
    """q^ = (1 - v_k) q + v_k q^s, k = argmax q, for linear q and semantic q^s [B, K]."""
    v = tf.gather(blend_weights(distribution, temperature), tf.argmax(linear, -1))[:, None]
    return (1. - v) * linear + v * semantic


@register('daso')
class DASO(WeakStrong):
    base_algorithm: str = hparam('fixmatch', 'Algorithm whose pseudo-labels DASO blends with '
                                 'semantic ones (USB\'s classic_cv_imb: fixmatch).')
    consistency_weight: float = hparam(1., 'Weight lambda_u of the base\'s unlabeled loss.')
    confidence_threshold: float = hparam(0.95, 'The base\'s confidence threshold tau.')
    teacher: str = teacher_field()
    queue_size: int = hparam(256, 'Labeled features L kept per class for the prototypes (the '
                             'authors\' QUEUE.MAX_SIZE 256).')
    prototype_temperature: float = hparam(0.05, 'Temperature T_proto of the similarities to '
                                          'the prototypes (the authors\' PROTO_TEMP 0.05).')
    distribution_temperature: float = hparam(1.5, 'Temperature T_dist of the blending weights '
                                             '(the authors\' CIFAR-10 DIST_TEMP: 1.5, 0.3 when '
                                             'the pool\'s imbalance differs).')
    align_weight: float = hparam(1., 'Weight lambda_align of the semantic alignment loss (the '
                                 'authors\' PSA_LOSS_WEIGHT 1).')
    dist_update_steps: int = hparam(100, 'Steps over which the pseudo-labels\' class '
                                    'distribution m is counted (the authors\' '
                                    'PL_DIST_UPDATE_PERIOD 100).')
    pretrain_fraction: float = hparam(5000 / 250000, 'Fraction of training DASO is its base '
                                      'alone (the authors\' PRETRAIN_STEPS 5000 of 250000).')

    def __post_init__(self):
        super().__post_init__()
        check_base(self, BASES, 'blends the pseudo-labels of')
        if self.prototype_temperature <= 0 or self.distribution_temperature <= 0 \
                or self.align_weight < 0 or self.dist_update_steps < 1 \
                or not 0 <= self.pretrain_fraction <= 1:
            raise ConfigError('--prototype_temperature and --distribution_temperature must be '
                              '> 0, --align_weight >= 0, --dist_update_steps >= 1, '
                              '--pretrain_fraction in [0, 1]')

    def state(self, num_classes, pool_size):
        return {'daso_queue': State((num_classes, self.queue_size, FEATURES), 0.),
                'daso_pointer': State((num_classes,), 0, tf.int32),
                'daso_filled': State((num_classes,), 0, tf.int32),
                'daso_counts': State((num_classes,), 0.),   # this period's pseudo-labels
                'daso_distribution': State((num_classes,), 1. / num_classes),   # m
                'daso_step': State((), 0, tf.int32)}

    def __call__(self, student, teacher, batch):
        weak, strong = batch.unlabeled
        both, _ = logits_and_features(student)
        logits, feats = both(tf.concat([batch.labeled_x, weak, strong], 0), training=True)
        sizes = [tf.shape(batch.labeled_x)[0], tf.shape(weak)[0], tf.shape(strong)[0]]
        logits, feats = (tf.split(tf.cast(t, tf.float32), sizes) for t in (logits, feats))
        xe = losses.cross_entropy(batch.labels, logits[0])
        # The queue takes this batch's labeled features (the EMA model's) before it is used.
        ema_both, _ = logits_and_features(teacher.model)
        ema_logits, ema_feats = (tf.stop_gradient(tf.cast(t, tf.float32)) for t in ema_both(
            tf.concat([batch.labeled_x, weak], 0) if self.teacher == 'ema' else batch.labeled_x,
            training=False))
        s = batch.state
        queue, pointer, filled = enqueue_per_class(
            s['daso_queue'], s['daso_pointer'], s['daso_filled'],
            replica_concat(ema_feats[:sizes[0]]), replica_concat(batch.labels))
        centres = prototypes(queue, filled)
        if self.teacher == 'ema':
            weak_logits, weak_feats = ema_logits[sizes[0]:], ema_feats[sizes[0]:]
        else:
            weak_logits, weak_feats = logits[1], feats[1]
        linear = tf.nn.softmax(tf.stop_gradient(weak_logits))
        semantic = tf.nn.softmax(semantic_logits(tf.stop_gradient(weak_feats), centres,
                                                 self.prototype_temperature))
        active = batch.progress >= self.pretrain_fraction
        probs = tf.where(active, daso_pseudo_labels(linear, semantic, s['daso_distribution'],
                                                    self.distribution_temperature), linear)
        mask = losses.confidence_mask(probs, self.confidence_threshold)
        k = tf.shape(probs)[-1]
        hard = tf.one_hot(tf.argmax(probs, -1), k)
        pseudo = losses.soft_cross_entropy(hard, logits[2], mask)
        align = losses.soft_cross_entropy(
            semantic, semantic_logits(feats[2], centres, self.prototype_temperature))
        align *= tf.cast(active, tf.float32)
        # m: the pseudo-labels' class distribution over the last completed period.
        counts = s['daso_counts'] + tf.reduce_sum(replica_concat(hard), 0)
        step = s['daso_step'] + 1
        period_over = step % self.dist_update_steps == 0
        distribution = tf.where(period_over, counts / tf.reduce_sum(counts),
                                s['daso_distribution'])
        return Losses(xe, self.consistency_weight * pseudo + self.align_weight * align,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask), 'align': align},
                      {'daso_queue': queue, 'daso_pointer': pointer, 'daso_filled': filled,
                       'daso_counts': tf.where(period_over, tf.zeros_like(counts), counts),
                       'daso_distribution': distribution, 'daso_step': step})
