"""CRMatch (Fan, Kukleva and Schiele, "Revisiting Consistency Regularization for Semi-Supervised
Learning", GCPR 2021, arXiv:2112.05825; extended in IJCV 2022). The abstract says the code "will
be published"; no release by the authors was found, so USB's algorithms/crmatch/crmatch.py is
the reference implementation here.

FixMatch's pseudo-labels (the weak view's confident argmax trains the strong view) with two more
terms on the same joint pass:
- FeatDistLoss (the paper's name): the classifier is made invariant to the augmentation, the
  features equivariant to it. A linear head maps each image's feature map to a vector z, and for the
  confidently pseudo-labelled images the cosine similarity of z(weak) and z(strong) is pushed
  down to at most 0 (`feature_distance`: mean over the unlabeled batch of mask * max(0, cos);
  USB's cosine_embedding_loss with target -1 and margin 0). Both views get the gradient.
- the rotation loss (RotNet's self-supervision): a head predicts by how many quarter turns an
  image was rotated; as many unlabeled images as the labeled batch holds, in their weak
  view, each in all four rotations (USB's RotNet loader over the unlabeled set with the labeled
  transform).
Loss = H(y, p(x_l)) + lambda_u L_u + lambda_d L_dist + lambda_rot L_rot, every weight 1 (USB's
train_step: total_loss = Lx + Lu + Ld, then += Lrot; rot_loss_ratio only switches the rotation
term on). The terms are named as the paper's abstract and USB name them; its equation numbers
are not cited: its text past the abstract could not be read when this was checked (the math
follows USB's implementation).

The heads, and why they sit where they do. USB's rotation head is an MLP (Dense(width) - ReLU -
Dense(4)) on the pooled features, and ours is that one (nn/heads.MLP on the layer 'features').
Its feature-distance head is a linear map of the flattened feature map before the pooling, to the
features' width (8 x 8 x 128 -> 128 on WRN-28-2; USB's ds_classifier on backbone.extract(x)
flattened): the map keeps where things are, which the pooling averages away, so ours reads the
same map, found by name (the input of the layer named 'features': nn/backbones.feature_map),
never by position. A custom backbone that returns pooled features has no map; its head then
reads the features, as USB's ViT one does.

Defaults: USB's config/classic_cv/crmatch/crmatch_cifar10_40_0.yaml: tau = 0.95 (p_cutoff), hard
pseudo-labels (hard_label), lambda_u = 1 (ulb_loss_ratio, which USB's train_step does not
apply), the rotation term on (get_argument's rot_loss_ratio 1.0; the config sets none),
lambda_d = 1 as USB adds Ld (runs/algorithms/crmatch.flags for the rest). With --teacher=ema the
pseudo-labels and their mask come from the EMA model; the feature-distance vectors are always
the student's.
"""
import tensorflow as tf

from ssl_ema.nn import losses
from ssl_ema.algorithms.base import (MLP, Algorithm, Losses, concat_forward_heads, hparam,
                                     register, target_logits, teacher_field)


def feature_distance(weak, strong, mask):
    """FeatDistLoss as USB computes it: mean over the batch of mask * max(0, cos(weak, strong)),
    a pair counting only while its two vectors still point the same way."""
    cosine = tf.reduce_sum(tf.math.l2_normalize(weak, -1) * tf.math.l2_normalize(strong, -1), -1)
    return tf.reduce_mean(mask * tf.nn.relu(cosine))


def all_rotations(images):
    """Every image rotated by 0, 1, 2 and 3 quarter turns (counter-clockwise), grouped by angle,
    and the number of turns of each: ([4n, h, w, c], [4n])."""
    rotated = tf.concat([tf.image.rot90(images, k) for k in range(4)], 0)
    return rotated, tf.repeat(tf.range(4), tf.shape(images)[0])


@register('crmatch')
class CRMatch(Algorithm):
    views = ('weak', 'strong')
    ramp_up = 'none'
    heads = {'rotation': MLP(4, hidden_layers=1),
             'distance': MLP('features', feature_map=True)}
    consistency_weight: float = hparam(1., 'lambda_u: weight of the pseudo-label loss (USB '
                                       'adds it unweighted; not ramped).')
    distance_weight: float = hparam(1., 'lambda_d: weight of FeatDistLoss, the masked cosine '
                                    'similarity of the weak and strong views\' feature-map '
                                    'vectors (USB: 1).')
    rotation_weight: float = hparam(1., 'Weight of the rotation loss (w_rot, not ramped).')
    confidence_threshold: float = hparam(0.95, 'tau: a weak view\'s prediction becomes a '
                                         'pseudo-label when its confidence reaches it.')
    teacher: str = teacher_field()

    def __call__(self, student, teacher, batch):
        weak, strong = batch.unlabeled
        # RotNet's images: as many unlabeled weak views as the labeled batch, in 4 rotations
        rotated, turns = all_rotations(weak[:tf.shape(batch.labeled_x)[0]])
        logits, rotation_logits, vectors = concat_forward_heads(
            batch.heads, batch.labeled_x, weak, strong, rotated)
        labeled, weak_logits, strong_logits, _ = logits
        xe = losses.cross_entropy(batch.labels, labeled)   # USB's Lx
        # Lu: the weak view's confident argmax (>= tau) trains the strong view
        pseudo, mask = losses.confident_pseudo_label_loss(
            target_logits(self, teacher, weak, weak_logits), strong_logits,
            self.confidence_threshold)
        # Ld, FeatDistLoss: mean of mask * max(0, cos(z_weak, z_strong)) (USB's
        # cosine_embedding_loss(logits_ds_s, logits_ds_w, -1) * mask)
        distance = feature_distance(vectors[1], vectors[2], mask)
        rotation = losses.cross_entropy(turns, rotation_logits[3])   # Lrot, over 4 angles
        unlabeled = (self.consistency_weight * pseudo + self.distance_weight * distance
                     + self.rotation_weight * rotation)
        return Losses(xe, unlabeled, {'pseudo_label': pseudo, 'feature_distance': distance,
                                      'rotation': rotation, 'mask': tf.reduce_mean(mask)})
