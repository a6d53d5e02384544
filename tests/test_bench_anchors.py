"""The anchors'-construction baseline of `python -m ssl_ema.bench_step` (ssl_ema/bench/anchors.py):
its TF1-graph step trains, and its network is our wrnD_K (with --wrn_conv_bias)."""
import numpy as np
import pytest


@pytest.mark.parametrize('algorithm', ['mean_teacher', 'vat', 'fixmatch'])
def test_anchor_step_runs_and_its_loss_falls(algorithm):
    from ssl_ema.bench.anchors import AnchorStep
    step = AnchorStep(algorithm, batch=8, uratio=1, image_shape=(8, 8, 3), depth=10, width=1)
    losses = [step() for _ in range(6)]
    step.close()
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_anchor_network_is_our_wide_resnet():
    """Our wrn10_1 with conv biases and the anchors' graph network, given the same weights, give
    the same training-mode logits: the baseline times the same architecture."""
    import tensorflow as tf

    from ssl_ema.bench import anchors
    from ssl_ema.nn import backbones
    ours = backbones.build('wrn10_1', (8, 8, 3), 10, conv_bias=True)
    rng = np.random.RandomState(0)
    ours.set_weights([w + rng.normal(0, 0.1, w.shape).astype(np.float32)
                      for w in ours.get_weights()])   # biases and batch-norm shifts non-zero
    x = rng.normal(0, 1, (4, 8, 8, 3)).astype(np.float32)
    ours_layers = [([np.asarray(w) for w in layer.weights], [tuple(w.shape) for w in layer.weights])
                   for layer in ours.layers if layer.weights]
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, x.shape)
        logits = anchors._Net(10, 1, 10, 0., 1.)(images, training=True)
        # Layer by layer (variables grouped by scope): each of theirs takes our first unused layer
        # with the same weight shapes (Keras orders a block's shortcut before its second conv).
        theirs_layers = {}
        for v in tf.compat.v1.global_variables():
            theirs_layers.setdefault(v.name.rsplit('/', 1)[0], []).append(v)
        with tf.compat.v1.Session(graph=graph) as session:
            for variables in theirs_layers.values():
                shapes = [tuple(v.shape) for v in variables]
                match = next(i for i, (_, s) in enumerate(ours_layers) if s == shapes)
                for v, w in zip(variables, ours_layers.pop(match)[0]):
                    v.load(w, session)
            assert not ours_layers
            theirs = session.run(logits, {images: x})
    np.testing.assert_allclose(theirs, ours(x, training=True), rtol=1e-4, atol=1e-4)


def test_bench_step_times_every_variant_and_names_the_isa_limit():
    """The whole command on a tiny shape: the toolkit's Trainer step (which needs the synthetic
    batches' pixel statistics) and the plain Keras step at uratio 2, each timed with a ratio; the
    header names a oneDNN instruction-set limit when one is set."""
    import os
    import re
    import subprocess
    import sys
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA='AVX2')
    done = subprocess.run(
        [sys.executable, '-m', 'ssl_ema.bench_step', '--algorithms=mean_teacher,fixmatch',
         '--arch=small_cnn', '--image_shape=8,8,1', '--batch=8', '--uratio=2',
         '--precisions=float32', '--baselines=keras', '--steps=1', '--repeats=1', '--warmup=1'],
        capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'oneDNN limited to AVX2 (ONEDNN_MAX_CPU_ISA)' in done.stdout
    rows = re.findall(r'^ssl_ema float32 +([\d.]+) +[\d.]+ +([\d.]+)', done.stdout, re.M)
    assert len(rows) == 2 and all(float(v) > 0 for row in rows for v in row), done.stdout
