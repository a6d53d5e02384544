"""ShrinkMatch (Yang, Zhao, Qi, Qiao, Shi and Zhao, "Shrinking Class Space for Enhanced Certainty
in Semi-Supervised Learning", ICCV 2023, arXiv:2308.06777; the authors' LiheYoung/ShrinkMatch).

FixMatch with distribution alignment (the authors' baseline, SimMatch's): the weak view's
probabilities q, aligned to uniform over the last 32 batches, are the soft target of the strong
view where max q >= tau (L_u). An uncertain image (max q < tau) is not wasted: its class space
is shrunk by removing the classes ranked 2, 3, ..., c - 1 by q, the most confusing ones, with the
smallest c >= 2 for which the top-1 class is confident among what is left,
q_(1) / (q_(1) + sum_{j >= c} q_(j)) >= tau; an auxiliary head then learns the top-1 class on the
strong view by cross-entropy over the kept classes only (`shrunk_loss`). Both reweighting
principles of the abstract (the authors' code comments number them: "for our loss reweighting
principle 1", "... principle 2"): each image's term is multiplied by its original confidence
max q (principle 1), and the batch's term by an EMA (momentum 0.999) of the share of certain
images (principle 2; state 'certain_ratio', which starts at the first batch's share, as the
authors'). An image whose space shrinks to the top-1 and the least likely class without becoming
confident contributes nothing (the authors' loss_u_shrink *= max_probs[b] * (sub_conf >=
conf_thresh)).
Loss = H(y, p(x_l)) + L_u + certain_ratio * L_shrink (the authors' loss_x + loss_u +
(loss_u_shrink / B) * certain_ratio_ema). The math follows the authors' CIFAR/shrinkmatch.py
(shrink_loss and train); the paper's equation numbers are not cited: its text past the abstract
could not be read when this was checked. A test (tests/test_shrinkmatch.py) checks shrunk_loss
against a transcription of the authors' loop on random batches.

The shrinking is vectorised: with q sorted in decreasing order, the mass left after removing the
classes before c is a reversed cumulative sum, sum_{j >= c} q_(j), so the shrunk confidence of
every c is one [B, C] tensor, non-decreasing in c; the cut is 2 plus the number of c in
[2, C - 1] where it is still below tau, at most C - 1 (the authors loop over images and classes
in Python).

The auxiliary head is the authors': Dense(d/4) - BN - LeakyReLU(0.1) - Dense(d/4) - BN -
LeakyReLU(0.1) - Dense(C) on the pooled features of width d (nn/heads.MLP). It trains only on the
strong views but runs in the joint pass, so its batch norm normalises over the whole batch (the
authors' over the strong views alone).

Defaults: the authors' CIFAR/shrinkmatch.py and script/dist_train.sh (CIFAR-10): tau = 0.95
(--threshold), distribution alignment on (--DA) over 32 batches (network/shrinkmatch.py DA_len),
certain-ratio momentum 0.999; the optimiser's in runs/algorithms/shrinkmatch.flags. The
alignment window starts uniform (the shared base.align_to_uniform) where the authors' starts at
zeros (the mean of the batches seen so far, once renormalised). The certain ratio's EMA runs
through the whole of training, as the authors' ImageNet/shrinkmatch.py (which checkpoints it)
and STL10-SVHN/models/shrinkmatch (one train() over every step) keep it; their
CIFAR/shrinkmatch.py sets certain_ratio_ema = None at the start of every train() call, one per
epoch of 1024 steps, so there it restarts from each epoch's first batch. With
--teacher=ema q is the EMA model's.
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (MLP, Algorithm, Losses, State, align_to_uniform,
                                     concat_forward_heads, hparam, register, replica_mean,
                                     target_logits, teacher_field)


def shrunk_loss(probs, logits, threshold):
    """The shrunk-class-space loss of a batch: `probs` [B, C] the (aligned) weak-view
    probabilities, `logits` the auxiliary head's on the strong view. Returns (the batch mean of
    each uncertain image's cross-entropy to its top-1 class over its shrunk class set, times
    max q where the shrunk set reached `threshold` and 0 elsewhere; the cut c of each image, the
    sorted position of the first class kept after the top-1, C for a certain image)."""
    num_classes = probs.shape[-1]
    order = tf.argsort(probs, axis=-1, direction='DESCENDING', stable=True)
    sorted_probs = tf.gather(probs, order, batch_dims=1)
    sorted_logits = tf.gather(logits, order, batch_dims=1)
    top = sorted_probs[:, :1]
    # shrunk[:, c] = q_(1) / (q_(1) + sum_{j >= c} q_(j)): classes 1 .. c-1 removed (the
    # authors' sub_conf, for every c at once)
    shrunk = top / (top + tf.cumsum(sorted_probs, axis=-1, reverse=True))
    position = tf.range(num_classes)
    below = tf.cast((position[None] >= 2) & (shrunk < threshold), tf.int32)
    cut = tf.minimum(2 + tf.reduce_sum(below, -1), num_classes - 1)
    reached = tf.gather(shrunk, cut, batch_dims=1) >= threshold
    keep = (position[None] == 0) | (position[None] >= cut[:, None])
    # cross-entropy to sorted position 0 over the kept classes
    kept_logits = tf.where(keep, sorted_logits, tf.float32.min)
    per_image = tf.reduce_logsumexp(kept_logits, -1) - sorted_logits[:, 0]
    confidence = top[:, 0]
    uncertain = confidence < threshold
    # principle 1: times max q, and 0 unless the shrunk set reached tau (the authors'
    # loss_u_shrink *= max_probs[b] * (sub_conf >= conf_thresh))
    weight = tf.where(uncertain & reached, confidence, 0.)
    if num_classes < 3:   # nothing to remove between the top-1 and the rest
        weight = tf.zeros_like(weight)
    return (tf.reduce_mean(weight * per_image),
            tf.where(uncertain, cut, num_classes))


@register('shrinkmatch')
class ShrinkMatch(Algorithm):
    views = ('weak', 'strong')
    ramp_up = 'none'
    heads = {'auxiliary': MLP('classes', hidden_layers=2, width_fraction=0.25, batch_norm=True,
                              negative_slope=0.1)}
    consistency_weight: float = hparam(1., 'Weight of the certain images\' soft pseudo-label '
                                       'loss (the authors\' 1; not ramped).')
    shrink_weight: float = hparam(1., 'Weight of the shrunk-class-space loss on top of the '
                                  'certain ratio that multiplies it (the authors\' 1).')
    confidence_threshold: float = hparam(0.95, 'tau: a weak view\'s aligned prediction is a '
                                         'pseudo-label when its confidence reaches it, and an '
                                         'uncertain image\'s class space shrinks until it does.')
    prediction_window: int = hparam(32, 'Distribution alignment to uniform over the mean '
                                    'predictions of the last this many batches (the authors\' '
                                    '--DA, 32); 0: no alignment.')
    state_momentum: float = hparam(0.999, 'Momentum of the EMA of the share of certain images '
                                   'that weighs the shrunk loss (the authors\' 0.999).')
    teacher: str = teacher_field()

    def state(self, num_classes, pool_size):
        window = max(self.prediction_window, 1)   # unused without alignment
        return {'p_model': State((window, num_classes), 1. / num_classes),
                'certain_ratio': State((), -1.)}   # < 0: no batch seen yet

    def __call__(self, student, teacher, batch):
        weak, strong = batch.unlabeled
        logits, auxiliary = concat_forward_heads(batch.heads, batch.labeled_x, weak, strong)
        labeled, weak_logits, strong_logits = logits
        xe = losses.cross_entropy(batch.labels, labeled)
        probs = tf.nn.softmax(target_logits(self, teacher, weak, weak_logits))
        window = batch.state['p_model']
        if self.prediction_window:   # the authors' distribution_alignment (--DA)
            probs, window = align_to_uniform(probs, window)
        mask = losses.confidence_mask(probs, self.confidence_threshold)   # certain: max q >= tau
        pseudo = losses.soft_cross_entropy(probs, strong_logits, mask)   # L_u: soft targets
        # L_shrink on the auxiliary head's strong-view logits, principle 1 inside
        shrink, cut = shrunk_loss(probs, auxiliary[2], self.confidence_threshold)
        # Principle 2: an EMA of the certain share, from the first batch's (the authors'
        # certain_ratio_ema = mask.mean() if None, else * 0.999 + mask.mean() * 0.001)
        certain = replica_mean(tf.reduce_mean(mask))
        old = batch.state['certain_ratio']
        ratio = tf.where(old < 0., certain, losses.moving_average(old, certain,
                                                                  self.state_momentum))
        unlabeled = self.consistency_weight * pseudo + self.shrink_weight * ratio * shrink
        shrunk = tf.cast(cut < probs.shape[-1], tf.float32)
        return Losses(xe, unlabeled,
                      {'pseudo_label': pseudo, 'shrunk': shrink, 'mask': tf.reduce_mean(mask),
                       'certain_ratio': ratio,
                       'removed_classes': tf.reduce_sum(shrunk * tf.cast(cut - 1, tf.float32))
                       / tf.maximum(tf.reduce_sum(shrunk), 1.)},
                      {'p_model': window, 'certain_ratio': ratio})
