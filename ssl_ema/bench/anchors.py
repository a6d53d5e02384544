"""The anchors' construction of a training step, as a speed baseline.

google-research/fixmatch (2019; libml/models.py `ResNet`, libml/train.py, mean_teacher.py,
vat.py, fixmatch.py) builds its training step as a TF1 graph run in a `tf.compat.v1.Session`:
the WRN-28-2 from `tf.layers` (convolutions with bias, fused batch norm with momentum 0.999,
leaky ReLU 0.1), a `tf.train.ExponentialMovingAverage` over the trainable variables grouped
after the optimizer's op through control dependencies together with the first pass's batch-norm
updates, `MomentumOptimizer(use_nesterov=True)` with an L2 penalty on the kernels in the loss
(Mean Teacher, FixMatch) or `AdamOptimizer` with decoupled decay assigns (VAT), and every batch
fed from NumPy through `feed_dict`. `AnchorStep` rebuilds that graph (our code, written from
reading theirs) so that `bench.step` can time it beside our step in the same process.

`tf.compat.v1.layers` needs Keras 2 (`tf_keras`), which a Keras 3 install disables, so the
layers are written here from the ops those layers emit in graph mode: Conv2D + BiasAdd, MatMul +
BiasAdd, LeakyRelu, and `FusedBatchNormV3` whose (Bessel-corrected) batch variance is rescaled to
the biased one before the moving averages move by `assign_sub` (Keras 2's fused path in a graph).
The variables come from `tf.compat.v1.get_variable` under a variable scope with a custom getter
(their mechanism for running the EMA weights as the teacher), so the graph has the same ops.
Only tensorflow and numpy are imported: the graph lives in its own `tf.Graph`, the process stays
eager for the toolkit.
"""
import math

import numpy as np
import tensorflow as tf

v1 = tf.compat.v1
ALGORITHMS = ('mean_teacher', 'vat', 'fixmatch')
# The anchors' hyperparameters (their flag defaults); they do not change the step's cost.
HPARAMS = {
    'mean_teacher': dict(lr=0.03, wd=5e-4, ema=0.999, warmup_pos=0.4, consistency_weight=50.),
    'vat': dict(lr=0.002, wd=0.02, ema=0.999, warmup_pos=0.4, vat=0.3, vat_eps=6.,
                entmin_weight=0.06),
    'fixmatch': dict(lr=0.03, wd=5e-4, ema=0.999, wu=1., confidence=0.95),
}
TRAIN_IMAGES = 1 << 26   # their train_kimg default 1 << 16, in images: the lr and ramp schedules


class _Net:
    """WRN-D-K with the anchors' `ResNet.classifier` structure (pre-activation blocks, shortcut
    1x1 convolution where the width changes, bias on every convolution, global mean, dense)."""

    def __init__(self, depth, width, num_classes, mean, std):
        self.repeat, self.filters = (depth - 4) // 6, 16 * width
        self.num_classes, self.mean, self.std = num_classes, mean, std
        self.update_ops = []   # batch-norm updates of the last call (their UPDATE_OPS)

    def conv(self, x, filters, kernel, stride=1):
        std = 1. / math.sqrt(0.5 * kernel * kernel * filters)   # their rsqrt(0.5 k k f)
        with v1.variable_scope(None, default_name='conv2d'):
            w = v1.get_variable('kernel', [kernel, kernel, x.shape[-1], filters], tf.float32,
                                v1.random_normal_initializer(stddev=std))
            b = v1.get_variable('bias', [filters], tf.float32, v1.zeros_initializer())
        y = tf.nn.conv2d(x, w, [1, stride, stride, 1], 'SAME')
        return tf.nn.bias_add(y, b)

    def bn(self, x, training, momentum=0.999, epsilon=1e-3):
        c = x.shape[-1]
        with v1.variable_scope(None, default_name='batch_normalization'):
            gamma = v1.get_variable('gamma', [c], tf.float32, v1.ones_initializer())
            beta = v1.get_variable('beta', [c], tf.float32, v1.zeros_initializer())
            mean = v1.get_variable('moving_mean', [c], tf.float32, v1.zeros_initializer(),
                                   trainable=False)
            var = v1.get_variable('moving_variance', [c], tf.float32, v1.ones_initializer(),
                                  trainable=False)
        if not training:
            y, _, _ = v1.nn.fused_batch_norm(x, gamma, beta, mean, var, epsilon,
                                             is_training=False)
            return y
        y, batch_mean, batch_var = v1.nn.fused_batch_norm(x, gamma, beta, epsilon=epsilon)
        n = tf.cast(tf.size(x) // c, tf.float32)
        batch_var *= (n - 1.) / n   # the kernel's variance is Bessel-corrected; Keras 2 undoes it
        self.update_ops += [v1.assign_sub(mean, (mean - batch_mean) * (1. - momentum)),
                            v1.assign_sub(var, (var - batch_var) * (1. - momentum))]
        return y

    def __call__(self, x, training, getter=None):
        self.update_ops = []
        act = lambda v: tf.nn.leaky_relu(v, alpha=0.1)   # noqa: E731

        def residual(x0, filters, stride=1, activate_before_residual=False):
            x = act(self.bn(x0, training))
            if activate_before_residual:
                x0 = x
            x = self.conv(x, filters, 3, stride)
            x = act(self.bn(x, training))
            x = self.conv(x, filters, 3)
            if x0.shape[-1] != filters:
                x0 = self.conv(x0, filters, 1, stride)
            return x0 + x

        with v1.variable_scope('classify', reuse=v1.AUTO_REUSE, custom_getter=getter):
            y = self.conv((x - self.mean) / self.std, 16, 3)
            for scale in range(3):
                y = residual(y, self.filters << scale, 2 if scale else 1,
                             activate_before_residual=scale == 0)
                for _ in range(self.repeat - 1):
                    y = residual(y, self.filters << scale)
            y = tf.reduce_mean(act(self.bn(y, training)), [1, 2])
            with v1.variable_scope('dense'):
                w = v1.get_variable('kernel', [y.shape[-1], self.num_classes], tf.float32,
                                    v1.glorot_normal_initializer())
                b = v1.get_variable('bias', [self.num_classes], tf.float32,
                                    v1.zeros_initializer())
            return tf.nn.bias_add(tf.matmul(y, w), b)


def _ema_getter(ema, getter, name, *args, **kwargs):
    var = getter(name, *args, **kwargs)
    average = ema.average(var)
    return var if average is None else average


def _kernels():
    return [v for v in v1.trainable_variables('classify') if 'kernel' in v.name]


def _normalized(d):
    # VAT's normalisation: by the max-abs, then by the L2 norm, per image.
    axes = list(range(1, len(d.shape)))
    d /= 1e-12 + tf.reduce_max(tf.abs(d), axes, keepdims=True)
    return d / tf.sqrt(1e-6 + tf.reduce_sum(tf.square(d), axes, keepdims=True))


def _kl_from_logits(q_logits, p_logits):
    q = tf.nn.softmax(q_logits)
    return tf.reduce_sum(q * (tf.nn.log_softmax(q_logits) - tf.nn.log_softmax(p_logits)), 1)


class AnchorStep:
    """`step()` runs one training step of `algorithm` built as the anchors build it, on a fixed
    batch fed through feed_dict, and returns the step's loss."""

    def __init__(self, algorithm, batch=64, uratio=1, image_shape=(32, 32, 3), num_classes=10,
                 depth=28, width=2, seed=0, images=None, hparams=None):
        if algorithm not in ALGORITHMS:
            raise ValueError(f'{algorithm}: the anchors\' step exists for {", ".join(ALGORITHMS)}')
        self.algorithm = algorithm
        hp = dict(HPARAMS[algorithm], **(hparams or {}))
        hwc = list(image_shape)
        views = 1 if algorithm == 'vat' else 2
        rng = np.random.RandomState(seed)
        if images is None:   # (labeled x, labels, unlabeled [views of batch * uratio])
            images = (rng.normal(0, 1, [batch] + hwc).astype(np.float32),
                      np.arange(batch) % num_classes,
                      [rng.normal(0, 1, [batch * uratio] + hwc).astype(np.float32)
                       for _ in range(views)])
        self.graph = tf.Graph()
        with self.graph.as_default():
            v1.set_random_seed(seed)
            self.global_step = v1.train.get_or_create_global_step()
            net = _Net(depth, width, num_classes, 0., 1.)
            xt = v1.placeholder(tf.float32, [batch] + hwc, 'xt')
            labels = v1.placeholder(tf.int32, [batch], 'labels')
            u = v1.placeholder(tf.float32, [batch * uratio, views] + hwc, 'y')
            build = getattr(self, '_' + algorithm)
            self.loss, train_op = build(net, hp, xt, labels, u, batch, uratio, num_classes)
            update_step = v1.assign_add(self.global_step, batch)
            self.fetches = [train_op, update_step, self.loss]
            self.session = v1.Session(graph=self.graph)
            self.session.run(v1.global_variables_initializer())
        x, y, unlabeled = images
        self.feed = {xt: x, labels: np.asarray(y, np.int32), u: np.stack(unlabeled, 1)}

    def __call__(self):
        return self.session.run(self.fetches, self.feed)[-1]

    def close(self):
        self.session.close()

    # ---- the three algorithms, after their model() methods ----------------------------------
    def _progress(self, position):
        return tf.clip_by_value(tf.cast(self.global_step, tf.float32)
                                / (position * TRAIN_IMAGES), 0., 1.)

    def _momentum_step(self, hp, loss, post_ops, ema_op):
        """(loss, train op): Nesterov momentum 0.9 on the cosine rate, then the first pass's
        batch-norm updates and the EMA, grouped after it (their mean_teacher.py, fixmatch.py)."""
        train_op = v1.train.MomentumOptimizer(self._cosine_lr(hp['lr']), 0.9,
                                              use_nesterov=True).minimize(
            loss, colocate_gradients_with_ops=True)
        with tf.control_dependencies([train_op]):
            return loss, tf.group(*post_ops, ema_op)

    def _cosine_lr(self, lr):
        return lr * tf.cos(self._progress(1.) * (7 * np.pi) / (2 * 8))

    def _mean_teacher(self, net, hp, xt, labels, u, batch, uratio, num_classes):
        logits_x = net(xt, training=True)
        post_ops = list(net.update_ops)   # only the first pass updates batch norm
        y_1, y_2 = u[:, 0], u[:, 1]
        ema = v1.train.ExponentialMovingAverage(decay=hp['ema'])
        ema_op = ema.apply(v1.trainable_variables())
        teacher = tf.stop_gradient(net(y_1, training=True,
                                       getter=lambda *a, **k: _ema_getter(ema, *a, **k)))
        student = net(y_2, training=True)
        loss_mt = tf.reduce_mean(tf.square(tf.nn.softmax(teacher) - tf.nn.softmax(student)))
        xe = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(
            labels=tf.one_hot(labels, num_classes), logits=logits_x))
        loss_wd = tf.add_n([tf.nn.l2_loss(v) for v in _kernels()])
        loss = (xe + loss_mt * self._progress(hp['warmup_pos']) * hp['consistency_weight']
                + hp['wd'] * loss_wd)
        return self._momentum_step(hp, loss, post_ops, ema_op)

    def _fixmatch(self, net, hp, xt, labels, u, batch, uratio, num_classes):
        parts = 2 * uratio + 1
        x = tf.concat([xt, u[:, 0], u[:, 1]], 0)
        # Their interleave/de_interleave: each batch-norm shard of a multi-GPU run sees a mix.
        shape = x.shape.as_list()
        x = tf.reshape(tf.transpose(tf.reshape(x, [-1, parts] + shape[1:]), [1, 0, 2, 3, 4]),
                       [-1] + shape[1:])
        logits = net(x, training=True)
        post_ops = list(net.update_ops)
        logits = tf.reshape(tf.transpose(tf.reshape(logits, [parts, -1, num_classes]), [1, 0, 2]),
                            [-1, num_classes])
        logits_x = logits[:batch]
        logits_weak, logits_strong = tf.split(logits[batch:], 2)
        xe = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels, logits=logits_x))
        pseudo = tf.stop_gradient(tf.nn.softmax(logits_weak))
        xeu = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.argmax(pseudo, 1),
                                                             logits=logits_strong)
        mask = tf.cast(tf.reduce_max(pseudo, 1) >= hp['confidence'], tf.float32)
        xeu = tf.reduce_mean(xeu * mask)
        loss_wd = tf.add_n([tf.nn.l2_loss(v) for v in _kernels()])
        ema_op = v1.train.ExponentialMovingAverage(decay=hp['ema']).apply(
            v1.trainable_variables())
        loss = xe + hp['wu'] * xeu + hp['wd'] * loss_wd
        return self._momentum_step(hp, loss, post_ops, ema_op)

    def _vat(self, net, hp, xt, labels, u, batch, uratio, num_classes):
        y = u[:, 0]
        wd = hp['wd'] * hp['lr']
        logits_x = net(xt, training=True)
        post_ops = list(net.update_ops)
        logits_y = net(y, training=True)
        # One power iteration (their third_party/vat_utils.generate_perturbation, xi 1e-6).
        d = 1e-6 * _normalized(tf.random.normal(tf.shape(y)))
        dist = _kl_from_logits(logits_y, net(y + d, training=True))
        grad = v1.gradients(tf.reduce_mean(dist), [d], aggregation_method=2)[0]
        delta = hp['vat_eps'] * _normalized(tf.stop_gradient(grad))
        logits_student = net(y + delta, training=True)
        loss_vat = tf.reduce_mean(_kl_from_logits(logits_student, tf.stop_gradient(logits_y)))
        p = tf.nn.softmax(logits_y)
        loss_entmin = tf.reduce_mean(-tf.reduce_sum(p * tf.nn.log_softmax(logits_y), 1))
        xe = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(
            labels=tf.one_hot(labels, num_classes), logits=logits_x))
        ema_op = v1.train.ExponentialMovingAverage(decay=hp['ema']).apply(
            v1.trainable_variables())
        post_ops.append(ema_op)
        post_ops += [v1.assign(v, v * (1 - wd)) for v in _kernels()]
        loss = (xe + loss_vat * self._progress(hp['warmup_pos']) * hp['vat']
                + hp['entmin_weight'] * loss_entmin)
        train_op = v1.train.AdamOptimizer(hp['lr']).minimize(loss,
                                                             colocate_gradients_with_ops=True)
        with tf.control_dependencies([train_op]):
            return loss, tf.group(*post_ops)

