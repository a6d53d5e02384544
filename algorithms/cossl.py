"""CoSSL (Fan et al., CVPR 2022, arXiv 2112.04564): co-learning of a representation and a
classifier decoupled from it, the classifier trained on Tail-class Feature Enhancement, plugged
on a base algorithm (--base_algorithm, FixMatch: USB's classic_cv_imb fixmatch_cossl; the
authors' YUE-FAN/CoSSL, train_cifar_fix_cossl.py).

Two classifiers share the backbone. The base algorithm (FixMatch) trains the representation on
its own head, `head_representation` (a Dense head on the pooled features), with its usual loss.
The decoupled classifier is the model's own classification head, the one the EMA averages,
evaluated and exported (the authors evaluate their EMA teacher head on the EMA backbone). It
learns only from TFE features (Sec. 3.2): the EMA model's pooled features f_x of each labeled
image of class y (its strong view, as the authors') are, with probability
p_y = (N_max - N_y) / N_max, mixed with the pooled features f_u of a pool image's strong view,
f = lambda f_x + (1 - lambda) f_u with lambda ~ U(lambda_max, 1), keeping the label y; the
classifier's cross-entropy on the features (gradient stopped: the backbone is not trained by it).
Co-learning (Sec. 3.3): from `start_fraction` of training on, the base's pseudo-labels are the
decoupled classifier's prediction on the EMA model's features of the weak view (the authors'
teacher_head(ema_model features)); before, the base's head makes its own, as plain FixMatch.

Ours against theirs: one run instead of FixMatch's 400 epochs then CoSSL's 100 from a checkpoint
(start 400/500 = 0.8); the decoupled classifier trains on TFE from the start instead of being
initialised at the switch by weight imprinting and 10 epochs on a fixed feature set (their
classifier_warmup), so by the switch it has been trained on TFE throughout. TFE's labeled images
are the labeled batch, each weighted by 1 / (K pi_y), pi the labeled class distribution, which
in expectation is the authors' class-balanced sampling of them; each is mixed with the pool image
at its position in the unlabeled batch (theirs: a separate batch of labeled and pool images).
The Bernoulli draws and the lambdas come from the run's checkpointed generator. Defaults:
lambda_max = 0.6 (the authors' run_cifar10.sh --max_lam 0.6, USB cossl_max_lam), the start at
400/500 (theirs; USB cossl_warm_epoch 200 of 256), the base's lambda_u = 1 and tau = 0.95. The
base's FixMatch reads one strong view an image, as USB's (the authors' averages two,
train_cifar_fix_cossl.py).
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.nn.backbones import logits_and_features
from ssl_ema.algorithms.base import (LABELED_PRIOR, ConfigError, Losses, State, WeakStrong,
                                     check_base, concat_forward_heads, hparam, register)

BASES = ('fixmatch',)   # the base algorithms whose representation CoSSL's classifier co-learns


def tfe_mix(labeled_features, labels, pool_features, prior, rng, max_lambda):
    """Tail-class Feature Enhancement: each labeled feature row of class y mixed, with
    probability (N_max - N_y) / N_max, as lambda f_x + (1 - lambda) f_u with its row of
    `pool_features`, lambda ~ U(max_lambda, 1); the rest unchanged. Returns (features, whether
    each row was mixed)."""
    chance = 1. - tf.gather(prior, labels) / tf.reduce_max(prior)
    mixed = rng.uniform(tf.shape(labels)) < chance
    lam = rng.uniform(tf.shape(labels), max_lambda, 1.)
    lam = tf.where(mixed, lam, 1.)[:, None]
    return lam * labeled_features + (1. - lam) * pool_features, mixed


def balanced_cross_entropy(labels, logits, prior):
    """Cross-entropy weighted by 1 / (K pi_y): class-balanced sampling's loss in expectation."""
    weights = 1. / (tf.cast(tf.shape(prior)[0], tf.float32) * tf.gather(prior, labels))
    per_image = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    return tf.reduce_mean(weights * per_image)


@register('cossl')
class CoSSL(WeakStrong):
    heads = {'representation': 0}   # the base algorithm's classifier, one unit per class
    labeled_views = ('strong',)     # TFE's labeled images (the authors' strong view)
    base_algorithm: str = hparam('fixmatch', 'Algorithm that trains the representation beside '
                                 'CoSSL\'s decoupled classifier (USB\'s classic_cv_imb: '
                                 'fixmatch).')
    consistency_weight: float = hparam(1., 'Weight lambda_u of the base\'s unlabeled loss.')
    confidence_threshold: float = hparam(0.95, 'The base\'s confidence threshold tau.')
    max_lambda: float = hparam(0.6, 'Smallest weight lambda of a labeled feature in TFE\'s mix '
                               '(the authors\' --max_lam 0.6 for CIFAR-10).')
    start_fraction: float = hparam(0.8, 'Fraction of training before the decoupled classifier '
                                   'makes the base\'s pseudo-labels (the authors: epoch 400 of '
                                   '500).')

    def __post_init__(self):
        super().__post_init__()
        check_base(self, BASES, 'co-learns with')
        if not 0 <= self.max_lambda <= 1 or not 0 <= self.start_fraction <= 1:
            raise ConfigError('--max_lambda and --start_fraction must be in [0, 1]')

    def state(self, num_classes, pool_size):
        return {LABELED_PRIOR: State((num_classes,), 1. / num_classes)}

    def __call__(self, student, teacher, batch):
        weak, strong = batch.unlabeled
        labeled_strong, = batch.labeled_views
        n = tf.shape(batch.labels)[0]
        # The base (FixMatch) on its head trains the representation.
        _, head = concat_forward_heads(batch.heads, batch.labeled_x, weak, strong)
        head = [tf.cast(h, tf.float32) for h in head]
        xe = losses.cross_entropy(batch.labels, head[0])
        # The EMA model's features: weak views (co-learning), labeled and pool strong views (TFE).
        ema_both, _ = logits_and_features(teacher.model)
        _, ema_feats = ema_both(tf.concat([weak, labeled_strong, strong[:n]], 0), training=False)
        ema_feats = tf.split(tf.stop_gradient(tf.cast(ema_feats, tf.float32)),
                             [tf.shape(weak)[0], n, n])
        _, classifier = logits_and_features(student)
        prior = batch.state[LABELED_PRIOR]
        mixed, was_mixed = tfe_mix(ema_feats[1], batch.labels, ema_feats[2], prior, batch.rng,
                                   self.max_lambda)
        tfe = balanced_cross_entropy(batch.labels, tf.cast(classifier(mixed), tf.float32), prior)
        # Co-learning: the decoupled classifier's pseudo-labels once it has started.
        co = tf.cast(classifier(ema_feats[0]), tf.float32)
        target = tf.where(batch.progress >= self.start_fraction, co, head[1])
        pseudo, mask = losses.confident_pseudo_label_loss(tf.stop_gradient(target), head[2],
                                                          self.confidence_threshold)
        return Losses(xe + tfe, self.consistency_weight * pseudo,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask), 'tfe': tfe,
                       'tfe_mixed': tf.reduce_mean(tf.cast(was_mixed, tf.float32))})
