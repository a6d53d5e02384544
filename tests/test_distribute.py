"""tf.distribute: two replicas (logical CPUs) must train exactly like one device on the same
global batch: per-replica losses scaled to the global mean, gradients summed, batch norm
synchronised, and every average (ema, ema_<d>, polyak, power_*) and the decoupled weight decay
updated by each replica on its own copy (cluster.update_every_copy), so every device's copy
is the one-device value. Run in a subprocess because logical devices can only be configured
before TensorFlow starts."""
import json
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = '''
import json, sys, tempfile
import numpy as np, tensorflow as tf
from ssl_ema import algorithms, data
from ssl_ema.base.config import TrainConfig
from ssl_ema.core.cluster import make_strategy
from ssl_ema.core.loop import Trainer

name, arch = sys.argv[1:3]
own = arch == 'keras_file'   # a backbone the user brings: its stock batch norm, synchronised
if own:
    arch = 'keras:' + tempfile.mkdtemp() + '/own.keras'
cfg = TrainConfig(algorithm=name, batch=16, uratio=2, train_steps=4, eval_every_kimg=0.0625,
                  log_every_steps=4, arch=arch, distribute='mirrored', cpu_devices=2,
                  ema_decays='0.9', polyak_start_fraction=0.25, posthoc_snapshot_every_kimg=1,
                  weight_decay_type='decoupled')
mirrored = make_strategy(cfg)   # before TensorFlow starts
if own:
    import keras
    inputs = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(16, 3, padding='same')(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.9)(x))
    keras.Model(inputs, x).save(arch[len('keras:'):])
dataset = data.build('digits', labels=50, valid=200, seed=1)
out = {}
for label, strategy in (('one', tf.distribute.get_strategy()), ('two', mirrored)):
    trainer = Trainer(cfg, algorithms.ALGORITHMS[name](), dataset, tempfile.mkdtemp(), strategy)
    trainer.train(log=lambda line: None)
    models = {'student': trainer.student, **{a.name: a.model for a in trainer._all_averages()}}
    out[label] = {'replicas': strategy.num_replicas_in_sync,
                  **{name: [np.asarray(w).tolist() for w in m.weights]
                     for name, m in models.items()}}
    # Every device's copy of every weight (one copy on one device): the largest difference.
    out[label]['copies_differ'] = max(
        float(np.abs(np.asarray(c) - np.asarray(w)).max()) for m in models.values()
        for w in m.weights for c in getattr(w.value, 'values', [w.value]))
print(json.dumps(out))
'''


@pytest.mark.parametrize('algorithm,arch', [('supervised', 'small_cnn'),
                                             ('fixmatch', 'small_cnn'),
                                             ('fixmatch', 'keras_file')])
def test_two_replicas_train_like_one_device(algorithm, arch):
    result = subprocess.run([sys.executable, '-c', SCRIPT, algorithm, arch], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert (out['one']['replicas'], out['two']['replicas']) == (1, 2)
    models = ('student', 'ema', 'ema_0.9', 'polyak', 'power_0.05', 'power_0.1')
    assert set(models) <= set(out['two'])
    assert out['two']['copies_differ'] == 0.   # each replica's copies are the same numbers
    for model in models:   # weights and batch-norm moving statistics alike
        for one, two in zip(out['one'][model], out['two'][model]):
            np.testing.assert_allclose(two, one, rtol=2e-4, atol=2e-5)
    # and the run moved the weights at all (the comparison is not between two initial states)
    assert not np.allclose(out['one']['student'][0], out['two']['ema'][0])


COPIES = '''
import json
import keras, numpy as np, tensorflow as tf
from ssl_ema.base.config import TrainConfig
from ssl_ema.core.cluster import make_strategy
from ssl_ema.core.ema import EMA
strategy = make_strategy(TrainConfig(distribute='mirrored', cpu_devices=2))
with strategy.scope():
    student = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    ema = EMA(student, decay=0.5)
kernel = student.weights[0].value
kernel.values[1].assign(kernel.values[0] + 1.)   # replica 1's copy of the weights differs
before = [np.asarray(c) for c in ema.model.weights[0].value.values]
tf.function(lambda: ema.update(strategy))()
print(json.dumps({'before': [b.tolist() for b in before],
                  'weights': [np.asarray(c).tolist() for c in kernel.values],
                  'after': [np.asarray(c).tolist() for c in ema.model.weights[0].value.values]}))
'''


def test_each_replica_updates_its_own_copy_of_an_average():
    """The update runs on every device from that device's weights, not once and broadcast:
    with the student's copies made to differ, each shadow copy follows its own."""
    result = subprocess.run([sys.executable, '-c', COPIES], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for before, weight, after in zip(out['before'], out['weights'], out['after']):
        np.testing.assert_allclose(after, 0.5 * np.array(before) + 0.5 * np.array(weight),
                                   rtol=1e-6)
    assert not np.allclose(out['after'][0], out['after'][1])


PRETRAINING = '''
import json, tempfile
import numpy as np, tensorflow as tf
from ssl_ema import data
from ssl_ema.algorithms import pretraining as methods
from ssl_ema.base.pretraining_config import PretrainConfig
from ssl_ema.core.cluster import make_strategy
from ssl_ema.core.pretraining import Pretrainer
# SGD: AdamW would turn the rounding noise in the ~0 gradients of the biases before batch norm
# (which cancel exactly in theory) into steps of +-lr, differently for another split of the batch.
cfg = PretrainConfig(method='byol', batch=16, train_steps=3, eval_every_kimg=1, log_every_steps=3,
                     arch='small_cnn', distribute='mirrored', cpu_devices=2, optimizer='sgd')
mirrored = make_strategy(cfg)
dataset = data.build('digits', labels=50, valid=200, seed=1, augment='none')
out = {}
for label, strategy in (('one', tf.distribute.get_strategy()), ('two', mirrored)):
    method = methods.create('byol', hidden_dim=32, projection_dim=16)
    trainer = Pretrainer(cfg, method, dataset, tempfile.mkdtemp(), strategy)
    trainer.train(log=lambda line: None)
    out[label] = {name: [np.asarray(w).tolist() for w in m.weights]
                  for name, m in (('student', trainer.student), ('teacher', trainer.teacher.model))}
print(json.dumps(out))
'''


def test_two_replicas_pretrain_like_one_device():
    """Pretraining on the engine's input path: each replica gets its share of the global batch's
    views (built per share, data/views.py rows), and two replicas end where one device does."""
    result = subprocess.run([sys.executable, '-c', PRETRAINING], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for model in ('student', 'teacher'):
        for k, (one, two) in enumerate(zip(out['one'][model], out['two'][model])):
            np.testing.assert_allclose(two, one, rtol=2e-4, atol=2e-5, err_msg=f'{model} {k}')
    assert not np.allclose(out['one']['student'][0], out['one']['teacher'][0])
