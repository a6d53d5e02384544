"""MixMatch (Berthelot et al., NeurIPS 2019, arXiv:1905.02249).

Algorithm 1: the label of each unlabeled image is guessed as the student's class probabilities
averaged over K = `label_guess_views` weak augmentations (Eq. 6), sharpened with temperature T
(Eq. 7); labeled images (one-hot labels) and the K unlabeled views (the guess) are then each
mixed up with a random partner from all of them, lambda' = max(lambda, 1 - lambda),
lambda ~ Beta(alpha, alpha) (Eqs. 8-11). The loss is cross-entropy on the mixed labeled images
(Eq. 3) plus lambda_U times the squared error between guess and prediction on the mixed unlabeled
ones, averaged over classes (Eq. 4). Defaults are the paper's CIFAR-10 ones: T = 0.5, K = 2,
alpha = 0.75, lambda_U = `consistency_weight` = 75, ramped up. Because the labeled images are
mixed too, MixMatch computes its own labeled loss; all mixed images go through one forward pass,
so batch norm sees labeled and unlabeled together (what the paper's interleaving achieves).
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (Algorithm, Losses, concat_forward, hparam, register,
                                     target_logits, teacher_field)
from ssl_ema.nn.backbones import call_keeping_statistics


@register('mixmatch')
class MixMatch(Algorithm):
    consistency_weight: float = hparam(
        75., 'Weight lambda_U of the unlabeled squared error at the end of the ramp-up.')
    temperature: float = hparam(0.5, 'Temperature T sharpening the unlabeled targets, p^(1/T) normalised.')
    mixup_alpha: float = hparam(0.75, 'alpha of the Beta(alpha, alpha) mixup coefficients.')
    label_guess_views: int = hparam(
        2, 'K: weak augmentations of each unlabeled image averaged to guess its label.')
    teacher: str = teacher_field()   # the paper guesses with the student
    ramp_up: str = hparam('linear', 'Ramp-up shape of lambda_U (linear: the anchors\').')

    @property
    def views(self):
        return ('weak',) * self.label_guess_views

    def __call__(self, student, teacher, batch):
        # The guess comes from the student in training mode, as in the paper's code (Eq. 6); as
        # there, the guessing pass does not update the batch-norm statistics.
        # --teacher=ema guesses with the EMA model instead.
        unlabeled = tf.concat(batch.unlabeled, 0)
        views = target_logits(self, teacher, unlabeled, None if self.teacher == 'ema' else
                              call_keeping_statistics(student, unlabeled))
        guesses = [tf.nn.softmax(logits) for logits in tf.split(views, len(batch.unlabeled))]
        guess = tf.stop_gradient(losses.sharpen(tf.add_n(guesses) / len(guesses),
                                                self.temperature))
        labels = tf.one_hot(batch.labels, tf.shape(guess)[-1])
        images = tf.concat((batch.labeled_x,) + batch.unlabeled, 0)
        targets = tf.concat([labels] + [guess] * len(guesses), 0)
        images, targets = losses.mixup(batch.rng, self.mixup_alpha, images, targets)
        n = tf.shape(batch.labeled_x)[0]
        labeled_logits, unlabeled_logits = concat_forward(student, images[:n], images[n:])
        xe = losses.soft_cross_entropy(targets[:n], labeled_logits)
        consistency = losses.softmax_mse(unlabeled_logits, targets[n:])
        return Losses(xe, batch.ramp * self.consistency_weight * consistency,
                      {'consistency': consistency})
