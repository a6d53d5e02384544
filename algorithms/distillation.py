"""The self-training round's loss: a new student learns the labels and a finished run's
pseudo-labels of the unlabeled pool (ssl_ema/core/distilling.py makes them, one pass of the
teacher's classifier over the pool, core/pool.py).

L = H(y, p_S(x_l)) + w * mean_u a_u H(q_u, p_S(A(u)))   (labeled + weighted pool cross-entropy)
with q_u the stored teacher target of pool image u (soft probabilities or hard one-hot) and a_u
its selection weight (1, or 0 for an image left out by the class-balanced selection): SimCLRv2's
distillation (Chen et al. 2020, arXiv 2006.10029, Eq. 2, with the labeled term its Sec. 2.2
adds) and Noisy Student's student step (Xie et al. 2020, arXiv 1911.04252, Algorithm 1 step 3:
the student is noised, here by the `--student_view` augmentation, the teacher was not). Labeled
and pool images go through one forward pass, as FixMatch's. Not an --algorithm: its targets come
from a teacher run, so it runs only as `python -m ssl_ema.distill` (or a recipe's round).
"""
import numpy as np
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import Algorithm, Losses, forward, hparam, register
from ssl_ema.base.errors import ConfigError

ROUNDS = {}   # its own registry: never listed by --algorithm, never in a benchmark's grid


@register('distill', ROUNDS)
class Distill(Algorithm):
    needs_indices = True
    ramp_up = 'none'
    consistency_weight: float = hparam(
        1., 'Weight w of the pseudo-labeled pool loss beside the labeled cross-entropy.')
    pseudo_labels: str = hparam(
        'soft', 'What the student learns of the teacher\'s pool predictions: soft (its '
        'probabilities, SimCLRv2\'s distillation) or hard (arg-max one-hot, Noisy Student).')
    per_class: int = hparam(
        0, 'Keep only the this many most confident pool images of each predicted class '
        '(Noisy Student\'s class-balanced selection); 0: every image.')
    temperature: float = hparam(1., 'Temperature of soft pseudo-labels (p^(1/T), normalised).')
    propagation_neighbours: int = hparam(
        0, 'k > 0: the pool\'s labels come from label propagation over the k-nearest-neighbour '
        'graph of the teacher\'s features of the labeled and pool images (Iscen et al. 2019, '
        'core/pool.py; its per-image certainty weights the loss); 0: the teacher\'s '
        'classifier.')
    teacher_model: str = hparam('ema', 'The teacher\'s classifier that labels the pool: ema '
                                '(what it exports) or raw.')
    init: str = hparam('fresh', 'The student starts from random weights (fresh, Noisy Student) '
                       'or from the teacher\'s (teacher: same --arch; a continued run).')
    student_view: str = hparam(
        'strong', 'Augmentation of the pool images the student learns the pseudo-labels on: '
        'strong (RandAugment + Cutout: Noisy Student\'s input noise) or weak.')

    def __post_init__(self):
        super().__post_init__()
        for name, valid in (('student_view', ('strong', 'weak')), ('init', ('fresh', 'teacher')),
                            ('pseudo_labels', ('soft', 'hard')), ('teacher_model', ('ema', 'raw'))):
            if getattr(self, name) not in valid:
                raise ConfigError(f'--{name}={getattr(self, name)} is unknown; valid: '
                                  f'{", ".join(valid)}')
        if self.per_class < 0 or self.temperature <= 0 or self.propagation_neighbours < 0:
            raise ConfigError('--per_class and --propagation_neighbours must be >= 0 and '
                              '--temperature > 0')
        self.targets = self.weights = None   # set by with_targets before training

    @property
    def views(self):
        return (self.student_view,)

    def with_targets(self, targets: np.ndarray, weights: np.ndarray) -> 'Distill':
        """The pool's targets [N, K] and selection weights [N] (core/pool.pseudo_labels)."""
        with tf.device('/cpu:0'):   # read by gather in the step; one host copy
            self.targets = tf.constant(targets, tf.float32)
            self.weights = tf.constant(weights, tf.float32)
        return self

    def __call__(self, student, teacher, batch):
        xe, (logits,) = forward(student, batch, *batch.unlabeled)
        targets = tf.gather(self.targets, batch.unlabeled_index)
        weights = tf.gather(self.weights, batch.unlabeled_index)
        pool = losses.soft_cross_entropy(targets, logits, weights)
        agreement = tf.reduce_mean(tf.cast(
            tf.argmax(logits, -1) == tf.argmax(targets, -1), tf.float32))
        return Losses(xe, self.consistency_weight * pool,
                      {'pool_loss': pool, 'agreement': agreement,
                       'selected': tf.reduce_mean(weights)})
