"""tf.distribute: two replicas (logical CPUs) must train exactly like one device on the same
global batch: per-replica losses scaled to the global mean, gradients summed, batch norm
synchronised, the EMA updated once in cross-replica context. Run in a subprocess because logical
devices can only be configured before TensorFlow starts."""
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
                  log_every_steps=4, arch=arch, distribute='mirrored', cpu_devices=2)
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
    out[label] = {'replicas': strategy.num_replicas_in_sync,
                  'student': [np.asarray(w).tolist() for w in trainer.student.weights],
                  'ema': [np.asarray(w).tolist() for w in trainer.ema.model.weights]}
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
    for model in ('student', 'ema'):   # weights and batch-norm moving statistics alike
        for one, two in zip(out['one'][model], out['two'][model]):
            np.testing.assert_allclose(two, one, rtol=2e-4, atol=2e-5)
    # and the run moved the weights at all (the comparison is not between two initial states)
    assert not np.allclose(out['one']['student'][0], out['two']['ema'][0])
