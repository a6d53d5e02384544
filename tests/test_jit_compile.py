"""--jit_compile: every algorithm's training step compiles with XLA and computes what the step
without it does; the stateful algorithms' scatters are static-shaped with a defined winner."""
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from conftest import script_over_names
from ssl_ema import algorithms
from ssl_ema.algorithms import base
from ssl_ema.nn import draws

NAMES = sorted(algorithms.ALGORITHMS)

# Hyperparameters that keep every confidence far from its threshold on a fresh model (the largest
# class probability of 10 classes is ~0.1-0.3 there): FlexMatch's tau = 0 selects every image, so
# its per-image state and class rates move (SequenceMatch's too; DeFixMatch's two pseudo-label
# terms are live); the others' 0.95 selects none. CoMatch's queue is full after the first step
# (48 rows), so the second step smooths with it. ShrinkMatch's .2 leaves some images certain and
# shrinks the others' class spaces. CRMatch's tau = 0 selects every image, so its FeatDistLoss is
# live and trains the feature-map head (at 0.95 it would be masked out).
OVERRIDES = {'flexmatch': {'confidence_threshold': 0.},
             'sequencematch': {'confidence_threshold': 0.},
             'defixmatch': {'confidence_threshold': 0.}, 'comatch': {'queue_size': 48},
             'shrinkmatch': {'confidence_threshold': .2}, 'crmatch': {'confidence_threshold': 0.}}

# Algorithms whose hard pseudo-labels, at these thresholds on a fresh model, take the argmax of
# near-uniform predictions (SequenceMatch's warm-up thresholds start at 0: every image is masked
# in) or whose passes meet such ties (OpenMatch): XLA's other summation order flips one from the
# first step (AVX2, 2026-12-07: the first step's updates 1e-3 (SequenceMatch) and 4.2e-4
# (OpenMatch) of the largest apart, the two steps' 3e-2 and 8e-3), so their updates are compared
# as vectors: cosine 1 - 2e-4 and 1 - 1.4e-5 measured, the first step's losses within 1e-7.
FLIPPING = ('sequencematch', 'openmatch')

STEPS = '''
import json, sys, tempfile
import numpy as np
from ssl_ema import algorithms, data
from ssl_ema.base.config import TrainConfig
from ssl_ema.core.loop import Trainer

dataset = data.build('digits', labels=50, valid=200, seed=1)
overrides = json.loads(sys.argv[1])
out = {}
for name in sys.argv[2:]:
    for jit in (False, True):
        cfg = TrainConfig(algorithm=name, batch=16, uratio=2, train_steps=2, arch='small_cnn',
                          jit_compile=jit)
        algorithm = algorithms.ALGORITHMS[name](**overrides.get(name, {}))
        trainer = Trainer(cfg, algorithm, dataset, tempfile.mkdtemp())
        before = [np.array(v) for v in trainer.trainable]
        iterator = trainer.batches(0)   # a pure function of (seed, step): the same two batches
        metrics = [{k: float(v) for k, v in trainer.train_step(iterator).items()}
                   for _ in range(2)]   # the second step uses the state the first one left
        out[f'{name}/{jit}'] = {
            'metrics': metrics,
            'updates': [(np.array(v) - b).tolist() for v, b in zip(trainer.trainable, before)],
            'weights': [np.array(v).tolist() for v in trainer.trainable],
            'state': {k: np.array(v).tolist() for k, v in trainer.state.items()}}
print(json.dumps(out))
'''


@pytest.fixture(scope='module')
def steps_with_and_without_xla():
    """Two training steps of every algorithm with and without --jit_compile, in two processes."""
    return script_over_names(STEPS, [json.dumps(OVERRIDES)], NAMES, timeout=1800)


@pytest.mark.parametrize('name', NAMES)
def test_jit_compiled_step_equals_the_plain_step(name, steps_with_and_without_xla):
    plain, xla = (steps_with_and_without_xla[f'{name}/{jit}'] for jit in (False, True))
    # VAT's adversarial direction is the normalised gradient of a finite difference at step xi
    # (Eq. 12), which magnifies the rounding of XLA's other summation order in the backward pass
    # (measured: its consistency 2e-4 apart, the updates 1e-3 of the largest, their cosine
    # 0.999999); its random start is the same draw (nn/draws.py). ACR's two logit-adjusted heads
    # on one backbone: its first conv's updates 4.4e-4 of the largest apart on an AVX-512 CPU
    # (CI, 2026-12-03; 1.2e-6 on AVX2), its losses within 1e-4. CRMatch with FeatDistLoss live:
    # its second step's conv updates 9e-4 of that step's largest apart (6.4e-4 of the two steps'),
    # its losses within 1e-6. Not its loss: from the same weights the two second steps' gradients
    # agree to 2e-6. The first steps leave weights up to 1.6e-7 apart, which moves one input of the
    # last LeakyReLU (a strong view's) from -1.4e-6 to +5.8e-7, across the kink (slope 0.1 -> 1);
    # moved 1e-4 off zero in both, the gap is 1e-6 (at tau = .2, 4.9e-4: a max-pool window whose
    # two largest inputs are 5e-7 apart, ordered one way by each summation). A chance flip of one
    # activation's derivative, of ~1e-3 of an update, that any algorithm can meet; CRMatch's
    # passes are the largest here (144 images, with the rotated ones). Every other one: 1e-4.
    loose = name in ('vat', 'acr', 'crmatch')   # and FLIPPING: see there
    rtol = 1e-3 if loose else 1e-4
    # The two steps' updates themselves (the weights alone barely move in two steps), to rtol of
    # the largest (some, e.g. a bias before batch norm, are rounding noise of ~1e-8).
    scale = max(np.abs(a).max() for a in map(np.array, plain['updates']))
    for step, (a, b) in enumerate(zip(plain['metrics'], xla['metrics'])):
        assert a.keys() == b.keys(), (name, step)
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=rtol if step == 0 or
                                       name not in FLIPPING else 1e-3, atol=1e-6,
                                       err_msg=f'{name} step {step} {key}')
    if name in FLIPPING:
        u, v = (np.concatenate([np.ravel(x) for x in run['updates']]) for run in (plain, xla))
        assert u @ v / (np.linalg.norm(u) * np.linalg.norm(v)) > 1 - 1e-3, name
        assert abs(np.linalg.norm(v) / np.linalg.norm(u) - 1) < 1e-2, name
    else:
        spread = (2 if loose else 1) * rtol * scale   # what an update may differ by
        for a, b in zip(plain['weights'], xla['weights']):
            np.testing.assert_allclose(b, a, rtol=rtol, atol=spread if loose else 1e-6,
                                       err_msg=name)
        for a, b in zip(plain['updates'], xla['updates']):
            np.testing.assert_allclose(b, a, rtol=rtol, atol=spread, err_msg=name)
    for key, value in plain['state'].items():
        np.testing.assert_allclose(xla['state'][key], value, rtol=1e-4, atol=1e-6,
                                   err_msg=f'{name} {key}')
    if name == 'flexmatch':   # the test exercised the per-image state
        assert np.sum(np.array(plain['state']['selected']) >= 0) == 2 * 16 * 2


def test_scatter_last_gives_repeated_indices_a_defined_winner():
    """A global batch straddling two epochs can hold one pool index twice: of its masked-in
    copies the last in batch order wins, masked-out copies write nothing (the same under XLA)."""
    state = tf.constant([-1, -1, -1, -1, 7])
    index = tf.constant([2, 0, 2, 3, 2, 3])
    values = tf.constant([10, 11, 12, 13, 14, 15])
    mask = tf.constant([True, True, True, True, False, False])
    expected = [11, -1, 12, 13, 7]   # index 2: 10 then 12 (14 masked out); index 3: 13 (15 out)
    np.testing.assert_array_equal(base.scatter_last(state, index, values, mask), expected)
    compiled = tf.function(base.scatter_last, jit_compile=True)
    np.testing.assert_array_equal(compiled(state, index, values, mask), expected)


@pytest.mark.parametrize('alpha', [0.3, 0.75, 2.])
def test_gamma_draws_have_the_gamma_mean_and_variance(alpha):
    """Mixup's Beta coefficients come from Gamma draws XLA can compile (tf.random's gamma has no
    XLA kernel): Gamma(alpha, 1) has mean and variance alpha."""
    n = 40000
    values = np.exp(draws.log_gamma(tf.random.Generator.from_seed(0), [n], alpha).numpy())
    assert np.all(values > 0)
    assert abs(values.mean() - alpha) < 4 * math.sqrt(alpha / n), values.mean()   # 4 std errors
    assert abs(values.var() / alpha - 1.) < 0.1, values.var()


def test_draws_are_the_same_under_xla():
    """Uniforms, integers, normals and Gamma draws from one generator state, with and without
    XLA (tf.random's own float draws differ)."""
    def every_draw(rng):
        return (draws.uniform(rng, [1000]), tf.cast(draws.integers(rng, [1000], 4), tf.float32),
                draws.normal(rng, [1000]), draws.log_gamma(rng, [1000], 0.75))
    plain = every_draw(tf.random.Generator.from_seed(5))
    rng = tf.random.Generator.from_seed(5)
    compiled = tf.function(lambda: every_draw(rng), jit_compile=True)()
    for a, b in zip(plain, compiled):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    normals = plain[2].numpy()
    assert abs(normals.mean()) < 0.15 and abs(normals.std() - 1.) < 0.1
    assert set(np.unique(plain[1])) == {0., 1., 2., 3.}
