"""ACR (Wei & Gan, CVPR 2023, "Towards Realistic Long-Tailed Semi-Supervised Learning:
Consistency Is All You Need"; the authors' Gank0078/ACR train.py): dual branches and an adaptive
consistency regularizer, on FixMatch (--base_algorithm).

Two classifiers share the backbone's features and one training pass over the labeled images,
each unlabeled image's weak view and two strong views. The standard branch (`head_standard`, a
Dense head on the pooled features) learns by plain cross-entropy; the balanced branch is the
model's own output, the one the EMA averages, evaluated and exported (ACR reports the balanced
branch), and learns by the logit-adjusted cross-entropy of softmax(z + log pi^tau2) (Menon et al.,
arXiv 2007.07314, Eq. 10), pi the labeled class distribution. With the logit adjustment
a(t) = log(pi^t + 1e-12) and the standard branch's weak-view logits z:
- the standard branch's pseudo-label is arg max softmax(z - a(tau)), kept where that or the
  unadjusted softmax(z) reaches the threshold, and trains both strong views of the standard
  branch;
- the balanced branch's is arg max softmax(z - a(tau12)), kept where that or the balanced
  branch's own weak-view prediction reaches the threshold, and trains both strong views of the
  balanced branch.
tau adapts to the unlabeled class distribution: a moving average u (momentum ema_u) of the class
histogram of the balanced branch's confident weak-view predictions estimates it, and its
symmetric KL divergences d = (d_con, d_uni, d_rev) to three anchors (the labeled distribution,
the uniform one and the labeled one reversed) are averaged over each estimation window (the
authors' epoch); at the next window tau = tau_max * softmax(d)_con, about 0 for a consistent
pool, tau_max / 2 for a uniform one and tau_max for a reversed one. (No copy of the paper's text
was at hand: the formulas are cited by the authors' code, not by the paper's equation numbers.)

Where ours differs from the authors' code: the histogram counts every confident prediction
(theirs adds through an indexed +=, which keeps one write per class); the reversed anchor
reverses the labeled distribution by rank (theirs flips the class order, the same when classes
are numbered head to tail); u's logarithms are guarded by 1e-12; and the first window of the
estimate updates tau from its own divergences (theirs from the all-zero sums of the window
before the estimate starts, tau = 2/3 for one epoch). Defaults, the authors' CIFAR-10-LT
commands (README.md) and train.py: threshold 0.95, tau_max = tau12 = tau2 = 2 (tau1, tau12,
tau2), tau starting at tau_max, ema_u 0.99, the estimate from epoch 6 of 500 (est_epoch 5;
250000 steps of 500-step epochs), lambda_u 1 (Lx + Lu + Lx_b + Lu_b). The unlabeled batch's
ratio is the run's --uratio (the authors' --mu defaults to 1; the long-tailed protocol gives
every method USB's 2).
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (LABELED_PRIOR, ConfigError, Losses, State, WeakStrong,
                                     check_base, concat_forward_heads, hparam, register,
                                     replica_mean)

BASES = ('fixmatch',)   # the base algorithms ACR's branches are trained by


def logit_adjustment(prior, tau):
    """log(pi^tau + 1e-12): the authors' compute_adjustment_by_py."""
    return tf.math.log(tf.pow(prior, tau) + 1e-12)


def reversed_prior(prior):
    """The class distribution whose largest value goes to the class `prior` gives the least
    (ranks reversed, ties in class order): the anchor of a reversed pool."""
    order = tf.argsort(-prior, stable=True)
    return tf.scatter_nd(order[:, None], tf.reverse(tf.gather(prior, order), [0]),
                         tf.shape(prior))


def anchor_divergences(estimate, prior):
    """Symmetric KL (KL(u || a) + KL(a || u)) / 2 of the estimated unlabeled distribution u to
    the anchors: the labeled distribution, uniform, reversed. Shape [3]."""
    uniform = tf.fill(tf.shape(prior), 1. / tf.cast(tf.size(prior), tf.float32))

    def symmetric(a):
        log_u, log_a = tf.math.log(estimate + 1e-12)[None], tf.math.log(a + 1e-12)[None]
        return 0.5 * (losses.kl_divergence(log_u, log_a) + losses.kl_divergence(log_a, log_u))
    return tf.stack([symmetric(prior), symmetric(uniform), symmetric(reversed_prior(prior))])


def adaptive_tau(mean_divergences, tau_max):
    """tau = tau_max * softmax(d)[consistent]: about 0 when u is the labeled distribution."""
    return tau_max * tf.nn.softmax(mean_divergences)[0]


def acr_targets(standard_weak, balanced_weak, prior, tau, tau12, threshold):
    """((labels, mask) of the standard branch, (labels, mask) of the balanced branch) from the
    weak view's logits of each branch."""
    adjusted = tf.nn.softmax(standard_weak - logit_adjustment(prior, tau))
    adjusted12 = tf.nn.softmax(standard_weak - logit_adjustment(prior, tau12))

    def confident(p):
        return losses.confidence_mask(p, threshold)
    standard_mask = tf.maximum(confident(adjusted), confident(tf.nn.softmax(standard_weak)))
    balanced_mask = tf.maximum(confident(adjusted12), confident(tf.nn.softmax(balanced_weak)))
    return ((tf.argmax(adjusted, -1, output_type=tf.int32), standard_mask),
            (tf.argmax(adjusted12, -1, output_type=tf.int32), balanced_mask))


def two_view_loss(labels, mask, strong_logits):
    """The masked hard-label cross-entropy averaged over the strong views' logits."""
    k = tf.shape(strong_logits[0])[-1]
    return tf.add_n([losses.soft_cross_entropy(tf.one_hot(labels, k), s, mask)
                     for s in strong_logits]) / len(strong_logits)


@register('acr')
class ACR(WeakStrong):
    views = ('weak', 'strong', 'strong')   # the authors' two strong views
    heads = {'standard': 0}   # the standard branch, one unit per class
    base_algorithm: str = hparam('fixmatch', 'Algorithm ACR\'s two branches are trained by '
                                 '(the authors\': FixMatch).')
    consistency_weight: float = hparam(1., 'Weight lambda_u of both branches\' unlabeled loss '
                                       '(the authors\': Lx + Lu + Lx_b + Lu_b).')
    confidence_threshold: float = hparam(0.95, 'Confidence a pseudo-label needs (ACR '
                                         '--threshold 0.95).')
    acr_tau_max: float = hparam(2., 'Largest adjustment tau of the standard branch\'s '
                                'pseudo-labels, and its start (ACR --tau1 2).')
    acr_tau_balanced: float = hparam(2., 'Adjustment of the balanced branch\'s pseudo-labels '
                                     '(ACR --tau12 2).')
    acr_tau_labeled: float = hparam(2., 'Adjustment of the balanced branch\'s logit-adjusted '
                                    'labeled loss (ACR --tau2 2).')
    acr_momentum: float = hparam(0.99, 'Momentum of the estimate of the unlabeled class '
                                 'distribution (ACR --ema-u 0.99, the README\'s commands).')
    estimate_start_fraction: float = hparam(6 / 500, 'Fraction of training before the estimate '
                                            'starts (ACR: after epoch est_epoch 5 of 500).')
    estimate_every_fraction: float = hparam(1 / 500, 'Fraction of training over which the '
                                            'divergences are averaged before tau is updated '
                                            '(ACR: an epoch, 500 of 250000 steps).')

    def __post_init__(self):
        super().__post_init__()
        check_base(self, BASES, 'trains its branches by')
        if min(self.acr_tau_max, self.acr_tau_balanced, self.acr_tau_labeled) < 0 \
                or not 0 <= self.acr_momentum < 1 or not 0 <= self.estimate_start_fraction <= 1 \
                or not 0 < self.estimate_every_fraction <= 1:
            raise ConfigError('--acr_tau_max, --acr_tau_balanced and --acr_tau_labeled must be '
                              '>= 0, --acr_momentum in [0, 1), --estimate_start_fraction in '
                              '[0, 1], --estimate_every_fraction in (0, 1]')

    def state(self, num_classes, pool_size):
        # window: index of the estimation window of the last step (-1 before the first);
        # divergence_sum and divergence_steps: the current window's sums.
        return {LABELED_PRIOR: State((num_classes,), 1. / num_classes),
                'unlabeled_prior': State((num_classes,), 1. / num_classes),
                'divergence_sum': State((3,), 0.), 'divergence_steps': State((), 0.),
                'window': State((), -1.), 'tau': State((), self.acr_tau_max)}

    def estimate(self, old, balanced_weak, progress):
        """The new state: the window's divergences (and tau, when a new window begins), the
        estimate u updated from the balanced branch's confident predictions."""
        prior = old[LABELED_PRIOR]
        window = tf.floor(progress / self.estimate_every_fraction + 1e-6)
        new_window = window > old['window']
        steps = old['divergence_steps']
        tau = tf.where(new_window & (steps > 0), adaptive_tau(
            old['divergence_sum'] / tf.maximum(steps, 1.), self.acr_tau_max), old['tau'])
        sums = tf.where(new_window, tf.zeros_like(old['divergence_sum']), old['divergence_sum'])
        steps = tf.where(new_window, 0., steps)
        probs = tf.nn.softmax(balanced_weak)
        counts = replica_mean(tf.reduce_sum(tf.one_hot(
            tf.argmax(probs, -1), tf.shape(probs)[-1]) * losses.confidence_mask(
                probs, self.confidence_threshold)[:, None], 0))
        active = progress >= self.estimate_start_fraction - 1e-6
        seen = active & (tf.reduce_sum(counts) > 0)
        estimate = tf.where(seen, losses.moving_average(
            old['unlabeled_prior'], counts / tf.maximum(tf.reduce_sum(counts), 1e-12),
            self.acr_momentum), old['unlabeled_prior'])
        sums += tf.where(seen, anchor_divergences(estimate, prior), 0.)
        return {'unlabeled_prior': estimate, 'divergence_sum': sums,
                'divergence_steps': steps + tf.cast(active, tf.float32), 'window': window,
                'tau': tau}

    def __call__(self, student, teacher, batch):
        del teacher   # the pseudo-labels are the student's branches' (as the authors')
        balanced, standard = ([tf.cast(p, tf.float32) for p in parts] for parts in
                              concat_forward_heads(batch.heads, batch.labeled_x, *batch.unlabeled))
        prior = batch.state[LABELED_PRIOR]
        state = self.estimate(batch.state, tf.stop_gradient(balanced[1]),
                              tf.cast(batch.progress, tf.float32))
        (labels, mask), (balanced_labels, balanced_mask) = acr_targets(
            tf.stop_gradient(standard[1]), tf.stop_gradient(balanced[1]), prior, state['tau'],
            self.acr_tau_balanced, self.confidence_threshold)
        labeled = losses.cross_entropy(batch.labels, standard[0]) + losses.cross_entropy(
            batch.labels, balanced[0] + logit_adjustment(prior, self.acr_tau_labeled))
        standard_u = two_view_loss(labels, mask, standard[2:])
        balanced_u = two_view_loss(balanced_labels, balanced_mask, balanced[2:])
        return Losses(labeled, self.consistency_weight * (standard_u + balanced_u),
                      {'standard_unlabeled': standard_u, 'balanced_unlabeled': balanced_u,
                       'mask': tf.reduce_mean(mask), 'balanced_mask': tf.reduce_mean(balanced_mask),
                       'tau': state['tau']}, state)
