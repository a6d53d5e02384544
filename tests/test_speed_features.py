"""Fused batch norm equals Keras' own; mixed-precision policies train, keep the EMA and the
batch-norm statistics in float32, and resume exactly."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import straight_and_resumed, tiny_config, weights_of
from ssl_ema import algorithms
from ssl_ema.nn import backbones
from ssl_ema.nn.batch_norm import BatchNorm
from ssl_ema.core.loop import Trainer



def pair(momentum=0.9):
    """A stock and a fused batch norm with the same random gamma, beta and statistics."""
    stock, fused = (cls(momentum=momentum, epsilon=1e-3)
                    for cls in (keras.layers.BatchNormalization, BatchNorm))
    shape = (4, 5, 5, 3)
    for layer in (stock, fused):
        layer.build(shape)
    rng = np.random.RandomState(0)
    weights = [rng.uniform(0.5, 2, 3), rng.normal(0, 1, 3), rng.normal(0, 1, 3),
               rng.uniform(0.5, 2, 3)]
    stock.set_weights([w.astype(np.float32) for w in weights])
    fused.set_weights(stock.get_weights())
    x = tf.constant(rng.normal(2., 3., shape).astype(np.float32))
    return stock, fused, x


@pytest.mark.parametrize('training', [True, False])
def test_fused_batch_norm_equals_the_stock_layer(training):
    stock, fused, x = pair()
    upstream = tf.constant(np.random.RandomState(1).normal(0, 1, x.shape).astype(np.float32))
    results = []
    for layer in (stock, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=training) * upstream)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append((loss, grads, [np.array(w) for w in layer.weights]))
    (loss_s, grads_s, weights_s), (loss_f, grads_f, weights_f) = results
    np.testing.assert_allclose(loss_f, loss_s, rtol=1e-5, atol=1e-4)
    for g_f, g_s in zip(grads_f, grads_s):                 # d/dx, d/dgamma, d/dbeta
        np.testing.assert_allclose(g_f, g_s, rtol=1e-4, atol=1e-4)
    for w_f, w_s in zip(weights_f, weights_s):             # the moving statistics moved alike
        np.testing.assert_allclose(w_f, w_s, rtol=1e-5, atol=1e-6)
    # (by hand) the moving mean moved 10% of the way to the batch mean, or not at all
    batch_mean = np.mean(np.array(x), axis=(0, 1, 2))
    stock_initial = pair()[0].get_weights()[2]
    expected = 0.9 * stock_initial + 0.1 * batch_mean if training else stock_initial
    np.testing.assert_allclose(weights_f[2], expected, rtol=1e-5)


def test_weights_transfer_between_fused_and_portable_backbones():
    fast = backbones.build('wrn10_1', (8, 8, 1), 10)
    portable = backbones.build('wrn10_1', (8, 8, 1), 10, portable=True)
    assert any(isinstance(l, BatchNorm) for l in fast.layers)
    assert not any(isinstance(l, BatchNorm) for l in portable.layers)
    assert all(l.__module__.startswith('keras') for l in portable.layers)
    portable.set_weights(fast.get_weights())
    x = np.random.RandomState(0).normal(0, 1, (4, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(portable(x, training=False), fast(x, training=False),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(portable(x, training=True), fast(x, training=True),
                               rtol=1e-4, atol=1e-4)


def test_keeping_statistics_applies_to_fused_and_stock_layers_together():
    inputs = keras.Input((4, 4, 2))
    x = BatchNorm()(inputs)
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(2, 1)(x))
    model = keras.Model(inputs, x)
    before = [np.array(v) for v in model.non_trainable_weights]
    data = tf.random.stateless_normal((8, 4, 4, 2), [3, 4]) * 2. + 3.
    tf.function(backbones.call_keeping_statistics)(model, data)
    for b, v in zip(before, model.non_trainable_weights):
        np.testing.assert_array_equal(b, np.array(v))
    model(data, training=True)   # an ordinary pass moves both layers' statistics
    moved = [not np.allclose(b, np.array(v)) for b, v in zip(before, model.non_trainable_weights)]
    assert (moved[0] or moved[1]) and (moved[2] or moved[3]), moved   # each layer's statistics


@pytest.mark.parametrize('precision', ['mixed_bfloat16', 'mixed_float16'])
def test_precision_policy_trains_and_keeps_float32_state(precision, digits_data, tmp_path):
    cfg = tiny_config(algorithm='mean_teacher', train_steps=200, eval_every_kimg=1.5625,
                      log_every_steps=10, precision=precision)
    logged = []
    trainer = Trainer(cfg, algorithms.ALGORITHMS['mean_teacher'](), digits_data, str(tmp_path))
    summary = trainer.train(log=logged.append)
    losses = [float(line.split('labeled=')[1].split()[0]) for line in logged if 'labeled=' in line]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:2]), losses   # the labeled loss falls
    assert summary['ema']['test']['last'] > 60, summary                # chance is 10%
    conv = next(l for l in trainer.student.layers if isinstance(l, keras.layers.Conv2D))
    assert conv.compute_dtype == precision.split('_')[1]               # the policy is in use
    assert trainer.student(digits_data.eval_arrays()['test'][0][:2]).dtype == tf.float32
    for model in (trainer.student, trainer.ema.model):   # weights, EMA, batch-norm statistics
        assert {v.dtype for v in model.weights} == {'float32'}
    assert (precision == 'mixed_float16') == isinstance(
        trainer.optimizer, keras.optimizers.LossScaleOptimizer)


def test_resumed_mixed_precision_run_equals_an_uninterrupted_one(digits_data, tmp_path):
    algorithm = algorithms.ALGORITHMS['mean_teacher']()
    cfg = tiny_config(algorithm='mean_teacher', train_steps=40, eval_every_kimg=0.25,
                      precision='mixed_float16')   # with the loss scale in the checkpoint
    straight, second, _ = straight_and_resumed(cfg, algorithm, digits_data, tmp_path, 20)
    for a, b in zip(weights_of(straight.student) + weights_of(straight.ema.model),
                    weights_of(second.student) + weights_of(second.ema.model)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('flags, environ, gpus, expected', [
    ({'avx2', 'avx512f', 'avx512_bf16'}, {}, [], 'mixed_bfloat16'),
    ({'avx2', 'amx_bf16', 'amx_tile'}, {}, [], 'mixed_bfloat16'),
    ({'avx2', 'avx512f'}, {}, [], 'float32'),                      # AVX-512 without BF16
    ({'avx2', 'avx512_bf16'}, {'ONEDNN_MAX_CPU_ISA': 'AVX2'}, [], 'float32'),   # emulated
    ({'avx2', 'avx512_bf16'}, {'ONEDNN_MAX_CPU_ISA': 'avx512_core_bf16'}, [], 'mixed_bfloat16'),
    ({'avx2'}, {}, [(8, 0), (9, 0)], 'mixed_bfloat16'),            # A100, H100
    ({'avx2', 'avx512_bf16'}, {}, [(8, 6), (7, 0)], 'float32'),    # one V100: not every GPU
])
def test_auto_precision_is_bfloat16_only_where_the_machine_computes_it_natively(
        flags, environ, gpus, expected):
    from ssl_ema.base import machine
    assert machine.resolve_precision('auto', cpu_flags=flags, environ=environ,
                                     gpu_capabilities=gpus) == expected
    assert machine.resolve_precision('mixed_float16', cpu_flags=flags) == 'mixed_float16'


@pytest.mark.parametrize('flags, environ, gpus, expected', [
    ({'avx2', 'fma'}, {}, [], 'CPU without AVX-512'),
    ({'avx2', 'avx512f'}, {}, [], ''),
    ({'avx2', 'avx512f'}, {'ONEDNN_MAX_CPU_ISA': 'AVX2'}, [], 'oneDNN held to AVX2'),
    ({'avx2', 'avx512f'}, {'ONEDNN_MAX_CPU_ISA': 'avx512_core'}, [], ''),
    ({'avx2'}, {}, [(7, 0)], ''),                                  # a GPU trains
])
def test_avx2_only_names_why_float32_is_no_wider_than_avx2(flags, environ, gpus, expected):
    from ssl_ema.base import machine
    why = machine.avx2_only(cpu_flags=flags, environ=environ, gpu_capabilities=gpus)
    assert why.startswith(expected) and bool(why) == bool(expected)


def test_auto_precision_builds_the_layers_in_the_machines_choice(monkeypatch):
    from ssl_ema.base import machine
    for native, dtype in (('CPU with AVX512_BF16', 'bfloat16'), ('', 'float32')):
        monkeypatch.setattr(machine, 'native_bfloat16', lambda **_: native)
        model = backbones.build('small_cnn', (8, 8, 1), 10, precision='auto')
        conv = next(l for l in model.layers if isinstance(l, keras.layers.Conv2D))
        assert conv.compute_dtype == dtype and model.outputs[0].dtype == 'float32'
