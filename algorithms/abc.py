"""ABC (Lee et al., NeurIPS 2021, arXiv 2110.10368): an auxiliary balanced classifier trained
beside a base algorithm (--base_algorithm: FixMatch or ReMixMatch, USB's classic_cv_imb
fixmatch_abc and remixmatch_abc).

Both classifiers share the backbone's features and one training pass. The base algorithm trains
its own head, `head_imbalanced` (a Dense head on the pooled features), with its usual loss; the
balanced classifier is the model's own output, the one the EMA averages, evaluated and exported
(ABC evaluates the auxiliary classifier). Its loss (Eq. 1-3) masks each labeled image of class
y with a Bernoulli draw of probability min_c N_c / N_y, so that every class counts as the
rarest; each unlabeled image whose balanced-classifier confidence on the weak view reaches tau
trains its strong view on that hard pseudo-label under a Bernoulli mask of probability
1 - t (1 - min_c N_c / N_yhat), t the fraction of training done (USB's abc.py: epoch / epochs,
the masks' schedule). The masks are drawn from the run's checkpointed generator. The loss
added: abc_weight * (labeled term + unlabeled term). On FixMatch the unlabeled term reads one
strong view an image (USB's abc.py; the authors' ABCfix.py adds the term on two strong views).
Defaults: tau = 0.95, abc_weight 1 (USB's
abc_p_cutoff, abc_loss_ratio), the base's lambda_u = 1 and tau = 0.95 (FixMatch's).

On ReMixMatch the base is ReMixMatch's whole loss (mixup, distribution alignment, pre-mixup,
rotation; remixmatch.py) with head_imbalanced as its classifier, w_match = 1.5 (remixmatch.py
BASE_DEFAULTS). The balanced classifier's weak and strong views are ReMixMatch's weak view and
its first strong view (USB's abc.py takes the first of ReMixMatch's strong features; the
authors' ABCremix.py adds the same term on the second one too); its labeled term reads the
un-mixed labeled images, a pass keeping the batch-norm statistics (as USB's remixmatch.py
passes x_lb).
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.nn.backbones import call_keeping_statistics
from ssl_ema.algorithms.base import LABELED_PRIOR, ConfigError, Losses, State, hparam, register
from ssl_ema.algorithms.remixmatch import Plugged


@register('abc')
class ABC(Plugged):
    plugged_as = 'trains beside'
    own_heads = {'imbalanced': 0}   # the base algorithm's classifier, one unit per class
    base_algorithm: str = hparam('fixmatch', 'Algorithm that trains beside ABC\'s balanced '
                                 'classifier, on its own head (USB\'s classic_cv_imb: fixmatch, '
                                 'remixmatch).')
    consistency_weight: float = hparam(None, 'Weight lambda_u of the base\'s unlabeled loss '
                                       '(None: the base\'s).')
    confidence_threshold: float = hparam(0.95, 'The base\'s confidence threshold tau (fixmatch).')

    abc_threshold: float = hparam(0.95, 'Confidence an unlabeled prediction of the balanced '
                                  'classifier needs to be its pseudo-label (USB abc_p_cutoff).')
    abc_weight: float = hparam(1., 'Weight of the balanced classifier\'s loss (USB '
                               'abc_loss_ratio).')

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.abc_threshold <= 1 or self.abc_weight < 0:
            raise ConfigError('--abc_threshold must be in [0, 1] and --abc_weight >= 0')

    def state(self, num_classes, pool_size):
        return {LABELED_PRIOR: State((num_classes,), 1. / num_classes),
                **self.base_state(num_classes)}

    def __call__(self, student, teacher, batch):
        del teacher   # the base's pseudo-labels are its own head's (FixMatch's student)
        if self.on_remixmatch:
            return self.on_remixmatch_loss(student, batch)
        weak, strong = batch.unlabeled
        sizes = [tf.shape(batch.labeled_x)[0], tf.shape(weak)[0], tf.shape(strong)[0]]
        balanced, imbalanced = (tf.split(tf.cast(o, tf.float32), sizes) for o in batch.heads(
            tf.concat([batch.labeled_x, weak, strong], 0), training=True))
        # The base algorithm (FixMatch) on its head.
        xe = losses.cross_entropy(batch.labels, imbalanced[0])
        pseudo, mask = losses.confident_pseudo_label_loss(
            tf.stop_gradient(imbalanced[1]), imbalanced[2], self.confidence_threshold)
        abc_labeled, abc_unlabeled, abc_mask = abc_loss(
            balanced, batch.labels, batch.state[LABELED_PRIOR], batch.progress, batch.rng,
            self.abc_threshold)
        return Losses(xe + self.abc_weight * abc_labeled,
                      self.consistency_weight * pseudo + self.abc_weight * abc_unlabeled,
                      {'pseudo_label': pseudo, 'mask': tf.reduce_mean(mask),
                       'abc_labeled': abc_labeled, 'abc_unlabeled': abc_unlabeled,
                       'abc_mask': tf.reduce_mean(abc_mask)})

    def on_remixmatch_loss(self, student, batch):
        def outputs(x):   # (balanced, imbalanced) logits, keeping the batch-norm statistics
            return [tf.cast(o, tf.float32) for o in call_keeping_statistics(batch.heads, x)[:2]]
        balanced_weak, imbalanced_weak = outputs(batch.unlabeled[0])
        balanced_strong, imbalanced_strong = outputs(batch.unlabeled[1])
        guess, state = self.guess(None, batch, imbalanced_weak)
        xe, unlabeled, metrics = self.anchored(batch.heads, batch, guess, 1, imbalanced_strong)
        abc_labeled, abc_unlabeled, abc_mask = abc_loss(
            (call_keeping_statistics(student, batch.labeled_x), balanced_weak, balanced_strong),
            batch.labels, batch.state[LABELED_PRIOR], batch.progress, batch.rng,
            self.abc_threshold)
        return Losses(xe + self.abc_weight * abc_labeled,
                      unlabeled + self.abc_weight * abc_unlabeled,
                      dict(metrics, abc_labeled=abc_labeled, abc_unlabeled=abc_unlabeled,
                           abc_mask=tf.reduce_mean(abc_mask)), state)


def abc_keep_probability(prior, classes, progress=None):
    """P(an image of `classes` counts): min_c N_c / N_y for labeled images (Eq. 1); for
    pseudo-labels 1 - progress * (1 - min_c N_c / N_y) (USB's abc.py schedule)."""
    ratio = tf.reduce_min(prior) / tf.gather(prior, classes)
    return ratio if progress is None else 1. - progress * (1. - ratio)


def abc_loss(logits, labels, prior, progress, rng, threshold):
    """(labeled term, unlabeled term, unlabeled mask) of the balanced classifier, `logits` its
    (labeled, weak, strong) logits and `prior` the labeled class distribution."""
    labeled_logits, weak_logits, strong_logits = logits
    keep = tf.cast(rng.uniform(tf.shape(labels)) < abc_keep_probability(prior, labels), tf.float32)
    per_image = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, labeled_logits)
    labeled = tf.reduce_mean(per_image * keep)
    probs = tf.stop_gradient(tf.nn.softmax(weak_logits))
    classes = tf.argmax(probs, -1, output_type=tf.int32)
    chance = abc_keep_probability(prior, classes, tf.cast(progress, tf.float32))
    mask = losses.confidence_mask(probs, threshold) * tf.cast(
        rng.uniform(tf.shape(classes)) < chance, tf.float32)
    unlabeled = losses.soft_cross_entropy(tf.one_hot(classes, tf.shape(probs)[-1]),
                                          strong_logits, mask)
    return labeled, unlabeled, mask
