"""The math of SSL, as small pure functions of tensors (each tested on hand-worked values).

Conventions: `logits` are [batch, classes]; every loss is a mean over the batch.
"""
import math

import tensorflow as tf

from ssl_ema.nn import draws


def cross_entropy(labels, logits):
    """Mean cross-entropy of integer labels."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


def softmax_mse(logits, target_probs):
    """Mean Teacher's consistency cost (Tarvainen & Valpola 2017, Sec. 2): squared distance
    between the student's and the target's class probabilities, averaged over classes and batch."""
    return tf.reduce_mean(tf.square(tf.nn.softmax(logits) - target_probs))


def kl_divergence(p_logits, q_logits, mask=None):
    """KL(p || q) with p = softmax(p_logits), q = softmax(q_logits), summed over classes and
    averaged over the batch (each example's times `mask`, if given: SequenceMatch's masked
    terms). VAT's paper puts the target first (Miyato et al. 2018, Eq. 4: KL(target ||
    student)); the anchors' vat.py puts the student first."""
    per_example = _kl_per_example(p_logits, q_logits)
    return tf.reduce_mean(per_example if mask is None else per_example * mask)


def _kl_per_example(p_logits, q_logits):
    p = tf.nn.softmax(p_logits)
    return tf.reduce_sum(p * (tf.nn.log_softmax(p_logits) - tf.nn.log_softmax(q_logits)), -1)


def entropy(logits):
    """Mean entropy of softmax(logits) (entropy minimisation, Grandvalet & Bengio 2005)."""
    return -tf.reduce_mean(tf.reduce_sum(
        tf.nn.softmax(logits) * tf.nn.log_softmax(logits), axis=-1))


def linear_rampup(progress, length):
    """min(1, progress / length); 1 everywhere when length is 0."""
    if length <= 0:
        return tf.ones_like(progress)
    return tf.clip_by_value(progress / length, 0., 1.)


def sigmoid_rampup(progress, length):
    """exp(-5 (1 - t)^2) with t = min(1, progress / length): the ramp-up of the Pi-model
    (Laine & Aila 2017, Sec. 3.1) and Mean Teacher (Tarvainen & Valpola 2017, App. B);
    1 everywhere when length is 0."""
    t = linear_rampup(progress, length)
    return tf.exp(-5. * tf.square(1. - t))


def constant_rampup(progress, length):
    """No ramp-up: 1 throughout (FixMatch and UDA keep their unlabeled weight constant)."""
    del length
    return tf.ones_like(progress)


def cosine_rampup(progress, length):
    """1/2 - cos(pi t) / 2 with t = min(1, progress / length): AdaMatch's warm-up mu(t) = 1/2 -
    cos(min(pi, 2 pi t / T)) / 2 (Berthelot et al. 2022; the authors' ScheduleCosPhases(1,
    [(0.5, 1), (1, wu)], start_value=0)) when length is 1/2; 1 everywhere when length is 0."""
    return 0.5 - 0.5 * tf.cos(math.pi * linear_rampup(progress, length))


RAMPUPS = {'linear': linear_rampup, 'sigmoid': sigmoid_rampup, 'cosine': cosine_rampup,
           'none': constant_rampup}


def fixmatch_cosine(progress):
    """The anchors' learning-rate multiplier cos(7 pi t / 16 T): from 1 down to ~0.2 at the end."""
    return tf.cos(7. * math.pi * progress / 16.)


def l2_normalize(d):
    """Scale each example of d to unit L2 norm over all non-batch axes. Dividing by the largest
    |value| first (as the VAT authors' code does) keeps tiny vectors, such as the power
    iteration's gradient, from falling under the square root's epsilon and coming out short."""
    axes = list(range(1, len(d.shape)))
    d = d / (1e-12 + tf.reduce_max(tf.abs(d), axes, keepdims=True))
    return d / tf.sqrt(1e-6 + tf.reduce_sum(tf.square(d), axes, keepdims=True))


# Steps resolved by the compute precision: the finite difference is at least this many times
# the largest rounding error of the perturbed input (||x|| times the unit roundoff).
RESOLVED_STEPS = 8


def vat_perturbation(logits_fn, x, target_logits, noise, xi, eps, scale=1., resolution=0.):
    """The virtual adversarial perturbation r_adv (Miyato et al. 2018, Eqs. 11-13).

    One power iteration: from the random direction d = `noise`, r = xi * d / ||d||, and
    r_adv = eps * g / ||g|| with g the gradient of KL(target || logits_fn(x + scale r)) w.r.t. r.
    r, xi and eps are in pixel units, `scale` model-input units per pixel unit (per channel;
    the anchors' pixels are in [-1, 1]), so the norms are taken where the anchors take them and
    ||r_adv|| = eps in pixel units. Returned in model-input units, gradient stopped.

    Eq. 12 approximates H d by a finite difference, so x + r must differ from x in the precision
    the model computes with: `resolution` is its unit roundoff (compute_resolution), and each
    image's step is raised where xi is below it (vat_step). A step that large leaves the
    quadratic region of the KL, so below float32 the difference is central (one more pass):
    its error is third-order in the step (measured on digits under bfloat16-rounded inputs:
    cosine 0.96 with float32's direction, against 0.91 one-sided and 0.28 at xi's own step,
    tests/test_algorithms.py). There the KL is divided by the step: g's direction is unchanged,
    and its values stay far from float16's underflow (Keras' loss scale multiplies the training
    loss, not this inner objective). In float32 it is Eq. 12 exactly as the anchors compute it.
    """
    d, target = l2_normalize(noise), tf.stop_gradient(target_logits)
    if resolution <= FLOAT32_ROUNDOFF:   # Eq. 12 as the paper and the anchors (test_parity.py)
        r = xi * d
        with tf.GradientTape() as tape:
            tape.watch(r)
            divergence = kl_divergence(target, logits_fn(x + scale * r))
    else:
        step, unit = vat_step(x, d, xi, scale, resolution)
        r = step / unit * d
        with tf.GradientTape() as tape:
            tape.watch(r)
            # Central: grad KL(r) - grad KL(-r) = 2 H r + O(r^3), per image over its step.
            divergence = tf.reduce_sum(
                (_kl_per_example(target, logits_fn(x + scale * r))
                 + _kl_per_example(target, logits_fn(x - scale * r))) / tf.reshape(step, [-1]))
    g = tape.gradient(divergence, r)
    return tf.stop_gradient(scale * eps * l2_normalize(g))


# The finite difference's step is at least this many times the largest rounding error of the
# perturbed input, ||x|| times the unit roundoff. Measured on digits (the probe behind
# tests/test_algorithms.py's low-precision test): cosine with float32's direction under
# bfloat16-rounded inputs 0.96 at 2 and 4, 0.91 at 8, 0.83 at 16 (larger steps leave the
# quadratic region); under TF32-rounded inputs 0.99 at 2 to 8.
RESOLVED_STEPS = 4
FLOAT32_ROUNDOFF = 2. ** -24


def vat_step(x, d, xi, scale=1., resolution=0.):
    """(step, unit): each image's finite-difference step ||scale r|| in model-input units,
    max(xi ||scale d||, RESOLVED_STEPS * resolution * ||x||), and ||scale d|| (d of unit norm in
    pixel units). The step stays xi's in float32 at the default xi; bfloat16 raises it to
    ||x|| / 64, TF32 and float16 to ||x|| / 512, where xi's would round away (shape [n, 1, ...])."""
    axes = list(range(1, len(x.shape)))
    unit = tf.sqrt(tf.reduce_sum(tf.square(scale * d), axes, keepdims=True))
    floor = RESOLVED_STEPS * resolution * tf.sqrt(tf.reduce_sum(tf.square(x), axes, keepdims=True))
    return tf.stop_gradient(tf.maximum(xi * unit, floor)), unit


def compute_resolution(model):
    """The unit roundoff of the values `model` computes with, for VAT's finite difference: the
    coarsest of its layers' compute dtypes (bfloat16 2^-8, float16 2^-11, float32 2^-24), where
    float32 convolutions and matrix products round their inputs to TF32's 10-bit mantissa
    (2^-11) on an Ampere or newer GPU with TF32 enabled (TensorFlow's default)."""
    roundoff = {'bfloat16': 2. ** -8, 'float16': 2. ** -11}
    dtypes = {getattr(layer, 'compute_dtype', None) for layer in model.layers} - {None}
    resolution = max([roundoff.get(str(d), FLOAT32_ROUNDOFF) for d in dtypes]
                     or [FLOAT32_ROUNDOFF])
    if resolution < 2. ** -11 and tf.config.experimental.tensor_float_32_execution_enabled():
        for gpu in tf.config.list_physical_devices('GPU'):
            capability = tf.config.experimental.get_device_details(gpu).get('compute_capability')
            if capability and capability >= (8, 0):
                return 2. ** -11
    return resolution


def soft_cross_entropy(target_probs, logits, mask=None):
    """Cross-entropy H(target, softmax(logits)) summed over classes; the batch mean of each
    example's value times `mask` (1 if None). The denominator is the whole batch, masked-out
    examples included, as in FixMatch's Eq. 4 and UDA's Eq. 3."""
    per_example = -tf.reduce_sum(target_probs * tf.nn.log_softmax(logits), axis=-1)
    if mask is not None:
        per_example *= mask
    return tf.reduce_mean(per_example)


def confidence_mask(probs, threshold):
    """1. where the largest class probability reaches `threshold`, else 0. (FixMatch Eq. 4's
    1(max q >= tau), UDA's confidence-based masking, Lee 2013's confident pseudo-labels)."""
    return tf.cast(tf.reduce_max(probs, axis=-1) >= threshold, tf.float32)


def confident_pseudo_label_loss(target_logits, logits, threshold):
    """Hard pseudo-labels argmax(target) where the target is confident, trained by cross-entropy
    on `logits` (FixMatch Eq. 4; Lee 2013 with target = logits). Returns (loss, mask)."""
    probs = tf.stop_gradient(tf.nn.softmax(target_logits))
    mask = confidence_mask(probs, threshold)
    hard = tf.one_hot(tf.argmax(probs, axis=-1), tf.shape(probs)[-1])
    return soft_cross_entropy(hard, logits, mask), mask


def sharpen(probs, temperature):
    """p^(1/T) / sum p^(1/T) (MixMatch Eq. 7); equals softmax(logits / T) for p = softmax(logits),
    UDA's softmax temperature control."""
    powered = tf.pow(probs, 1. / temperature)
    return powered / tf.reduce_sum(powered, axis=-1, keepdims=True)


def mix(a, b, weight):
    """weight * a + (1 - weight) * b, with one weight per example broadcast over the other axes."""
    weight = tf.reshape(weight, [-1] + [1] * (len(a.shape) - 1))
    return weight * a + (1. - weight) * b


def mixup(rng, alpha, *tensors):
    """MixUp (Zhang et al. 2018) of each example with a random partner from the same batch:
    lambda ~ Beta(alpha, alpha), lambda' = max(lambda, 1 - lambda) (MixMatch Eqs. 8-9), so each
    mixed example stays closer to its own row. Every tensor (images, targets) gets the same
    partners and weights. `rng` is the run's tf.random.Generator. Returns the mixed tensors."""
    n = tf.shape(tensors[0])[0]
    # Beta(a, a) = X / (X + Y) = sigmoid(log X - log Y) for X, Y ~ Gamma(a) (tf.random.Generator
    # has no beta; draws.py: the same draws with and without XLA).
    log_x, log_y = draws.log_gamma(rng, [n], alpha), draws.log_gamma(rng, [n], alpha)
    weight = tf.sigmoid(log_x - log_y)
    weight = tf.maximum(weight, 1. - weight)
    partner = tf.argsort(draws.uniform(rng, [n]))
    return [mix(t, tf.gather(t, partner), weight) for t in tensors]


def tsa_threshold(schedule, progress, num_classes):
    """Training Signal Annealing (Xie et al. 2020, Sec. 3.3): labeled examples whose correct-class
    probability exceeds eta_t = alpha_t (1 - 1/K) + 1/K leave the loss; alpha_t is t/T (linear),
    1 - exp(-5 t/T) (log), exp(5 (t/T - 1)) (exp), or 1 (none: no annealing)."""
    alpha = {'linear': lambda t: t, 'log': lambda t: 1. - tf.exp(-5. * t),
             'exp': lambda t: tf.exp(5. * (t - 1.)), 'none': tf.ones_like}[schedule](
                 tf.cast(progress, tf.float32))
    return alpha * (1. - 1. / num_classes) + 1. / num_classes


def tsa_cross_entropy(labels, logits, threshold):
    """Labeled cross-entropy over the examples whose correct-class probability is at most
    `threshold` (TSA), averaged over those examples as in UDA's code."""
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    keep = tf.cast(tf.exp(-per_example) <= threshold, tf.float32)   # p_correct = exp(-CE)
    return tf.reduce_sum(per_example * keep) / tf.maximum(tf.reduce_sum(keep), 1.)


# ---- the newer algorithms' pieces (FlexMatch, FreeMatch, SoftMatch, ReMixMatch, AdaMatch, Dash)

def moving_average(average, value, momentum):
    """momentum * average + (1 - momentum) * value: the running averages FreeMatch (Sec. 3.2),
    SoftMatch (Sec. 3.2) and ReMixMatch's distribution alignment keep of their predictions."""
    return momentum * average + (1. - momentum) * value


def align_distribution(probs, p_target, p_model):
    """Distribution alignment (ReMixMatch Sec. 3.2; SoftMatch's uniform alignment, Sec. 3.3, with
    p_target = 1/C): probs * p_target / p_model, renormalised per example. The 1e-6 in both
    ratios is the anchors' and USB's guard against empty classes."""
    aligned = probs * (p_target + 1e-6) / (p_model + 1e-6)
    return aligned / tf.reduce_sum(aligned, axis=-1, keepdims=True)


def relative_threshold(labeled_probs, tau):
    """AdaMatch's relative confidence threshold (the paper's name; the authors'
    confidence_ratio = softmax(logit_sx_weak).max(1).mean(0) * confidence): tau times the mean
    over the labeled images of their largest class probability, so the bar follows how
    confident the model is on images whose labels it is taught."""
    return tau * tf.reduce_mean(tf.reduce_max(labeled_probs, axis=-1))


def dash_threshold(rho_hat, stage, scale, decay, floor):
    """Dash's dynamic loss threshold (Xu et al. 2021; USB's DashThresholdingHook.update):
    rho = C gamma^-k rho_hat at stage k (0 when training on unlabeled images starts; negative k
    counts as 0), never below rho_min (`floor`, USB's)."""
    stage = tf.maximum(tf.cast(stage, tf.float32), 0.)
    return tf.maximum(scale * tf.pow(decay, -stage) * rho_hat, floor)


def flexmatch_learning_effect(selected, num_classes, warmup=True):
    """FlexMatch's normalised learning effect beta_t(c) (Zhang et al. 2021, Sec. 3.2-3.3).

    `selected` holds, per unlabeled image, the class it was last confidently (>= tau) predicted
    as, or -1 if never. sigma(c) counts images of class c; beta(c) = sigma(c) / max_c sigma, with
    the threshold warm-up (Sec. 3.3) counting the unused images (-1) among the candidates of the
    max. While no image (or every image) has been selected, beta stays as the caller had it:
    returns (beta, whether it was updated), as USB's FlexMatchThresholdingHook.update."""
    # A segment sum, not tf.math.bincount: its output size is computed at run time, which XLA
    # (--jit_compile) cannot compile.
    selected = tf.cast(selected, tf.int32)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(selected, tf.float32), selected + 1,
                                          num_classes + 1)
    largest = tf.reduce_max(counts if warmup else counts[1:])
    update = tf.reduce_max(counts) < tf.cast(tf.size(selected), tf.float32)
    return counts[1:] / tf.maximum(largest, 1.), update


def flexmatch_threshold(beta, tau):
    """The flexible threshold T_t(c) = M(beta_t(c)) tau with the convex mapping
    M(x) = x / (2 - x) (FlexMatch Sec. 3.2-3.3, USB's default)."""
    return tau * beta / (2. - beta)


def freematch_mask(max_probs, classes, global_threshold, p_model):
    """FreeMatch's self-adaptive threshold (Wang et al. 2023, Sec. 3.2): an image counts when its
    confidence reaches tau_t(c) = MaxNorm(p~_t)(c) * tau_t, for its predicted class c."""
    local = p_model / tf.reduce_max(p_model)
    return tf.cast(max_probs >= global_threshold * tf.gather(local, classes), tf.float32)


def _sum_normalise(p):
    return p / tf.maximum(tf.reduce_sum(p, axis=-1, keepdims=True), 1e-12)   # 0 stays 0


def freematch_fairness(target_probs, target_hist, probs, hist):
    """FreeMatch's self-adaptive fairness term (Sec. 3.3) as USB computes it:
    sum_c SumNorm(p~_t / h~_t)(c) log SumNorm(p-bar / h-bar)(c), with p~, h~ the running
    averages of the unlabeled predictions and their histogram, p-bar, h-bar the mean strong-view
    prediction and its histogram over the confident images (-H(.,.), minimised as a loss).
    Classes absent from a histogram get weight 0 (USB's 1/0 -> 0)."""
    def inverse(h):
        return tf.where(h > 0, 1. / tf.where(h > 0, h, 1.), 0.)
    target = tf.stop_gradient(_sum_normalise(target_probs * inverse(target_hist)))
    mean = _sum_normalise(probs * tf.stop_gradient(inverse(hist)))
    return tf.reduce_sum(target * tf.math.log(mean + 1e-12))


def truncated_gaussian_weight(max_probs, mean, variance, n_sigma=2.):
    """SoftMatch's sample weight (Chen et al. 2023, Sec. 3.2): 1 above the running mean confidence
    mu_t, exp(-(max p - mu_t)^2 / (2 sigma_t^2 / n_sigma^2)) below it (USB's n_sigma = 2)."""
    below = tf.minimum(max_probs - mean, 0.)
    return tf.exp(-tf.square(below) / (2. * variance / n_sigma ** 2))


def rotate(images, quarter_turns):
    """Each image [h, w, c] rotated counter-clockwise by its own multiple of 90 degrees (0..3),
    for ReMixMatch's rotation loss (Sec. 3.3); the images must be square."""
    turns = tf.stack([tf.image.rot90(images, k) for k in range(4)])   # [4, n, h, w, c]
    n = tf.shape(images)[0]
    return tf.gather_nd(turns, tf.stack([tf.cast(quarter_turns, tf.int32), tf.range(n)], 1))
