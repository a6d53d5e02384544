"""Backbones the user brings (nn/custom_backbones.py): a functional .keras file, a keras.Model
object and a keras-hub preset (random weights, saved here with save_to_preset) train with
fixmatch and mean_teacher, resume exactly, and export a classifier that loads without ssl_ema."""
import os

import numpy as np
import pytest

from conftest import quiet, straight_and_resumed, tiny_config, weights_of
from ssl_ema import algorithms
from ssl_ema.base.config import TrainConfig
from ssl_ema.base.errors import ConfigError
from ssl_ema.nn import backbones, custom_backbones
from test_export import ISOLATED, REPO, run_command


def tiny_cnn(channels=1, norm='batch'):
    """A small functional feature extractor (a feature map out, no head): batch norm with a
    short horizon (momentum 0.9, so 100 steps settle its statistics), or layer norm."""
    import keras
    inputs = keras.Input((None, None, channels))
    x = inputs
    for filters, stride in ((32, 1), (64, 2)):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding='same')(x)
        x = (keras.layers.BatchNormalization(momentum=0.9) if norm == 'batch'
             else keras.layers.LayerNormalization())(x)
        x = keras.layers.ReLU()(x)
    return keras.Model(inputs, x, name=f'tiny_{norm}')


@pytest.fixture(scope='module')
def keras_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('backbone') / 'tiny.keras')
    tiny_cnn().save(path)
    return path


@pytest.fixture(scope='module')
def hub_preset(tmp_path_factory):
    """A keras-hub ResNet with random weights and its image converter, as a local preset."""
    keras_hub = pytest.importorskip('keras_hub')
    path = str(tmp_path_factory.mktemp('preset') / 'tiny_resnet')
    keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64],
        stackwise_num_blocks=[1], stackwise_num_strides=[2], block_type='basic_block',
        use_pre_activation=True, name='res_net_backbone').save_to_preset(path)
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(8, 8), scale=[1 / 255.] * 3, offset=[-0.5] * 3)
    keras_hub.models.ResNetImageClassifierPreprocessor(converter).save_to_preset(path)
    return path


def losses_along(trainer, steps):
    iterator = trainer.batches(0)
    return [{k: float(v) for k, v in trainer.train_step(iterator).items()} for _ in range(steps)]


@pytest.mark.parametrize('name', ['fixmatch', 'mean_teacher'])
def test_a_keras_file_learns(name, keras_file, digits_data, tmp_path):
    from ssl_ema.core.loop import Trainer
    # A lower threshold than FixMatch's 0.95, so 120 steps of a random backbone have pseudo-labels.
    algorithm = algorithms.ALGORITHMS[name](**({'confidence_threshold': 0.5}
                                                if name == 'fixmatch' else {}))
    cfg = tiny_config(algorithm=name, arch=f'keras:{keras_file}', train_steps=120,
                      backbone_scale='0.0039', optimizer='adam', lr=3e-3)
    trainer = Trainer(cfg, algorithm, digits_data, str(tmp_path))
    assert [l.name for l in trainer.student.layers] == [
        'images', 'pixels', 'backbone_preprocessing', 'tiny_batch', 'features', 'head']
    metrics = losses_along(trainer, cfg.total_steps)
    labeled = [m['loss/labeled'] for m in metrics]
    assert np.mean(labeled[-10:]) < 0.6 * np.mean(labeled[:10]), labeled
    # The unlabeled term takes part: FixMatch's pseudo-labels appear (none at the start), Mean
    # Teacher's consistency moves. (Over 120 steps from random weights neither falls: the mask
    # grows and the EMA lags the student; measured, see the branch report.)
    if name == 'fixmatch':
        masks = [m['algorithm/mask'] for m in metrics]
        assert masks[0] == 0 and np.mean(masks[-10:]) > 0.1, masks
    else:
        consistency = [m['algorithm/consistency'] for m in metrics]
        assert 0 < min(consistency[1:]) and np.isfinite(consistency).all(), consistency
    accuracy = trainer.evaluate()
    assert accuracy['ema']['test'] > 40 and accuracy['raw']['test'] > 40, accuracy   # chance: 10


@pytest.fixture(scope='module')
def pretrained_classifier(digits_data):
    """A classifier pretrained on a labeled source, as a downloaded one would be: tiny_cnn with a
    head, trained (plain Keras) on every digits training image in 0..1 pixels. It already
    predicts the 10 classes, so the toolkit keeps its head."""
    import keras
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 1))
    logits = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(tiny_cnn()(inputs)))
    model = keras.Model(inputs, logits, name='pretrained')
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    a = digits_data.arrays
    model.fit(a.x_train / 255., a.y_train, epochs=10, batch_size=32, verbose=0)
    return model


@pytest.mark.parametrize('kind', ['keras_file', 'keras_model'])
@pytest.mark.parametrize('name', ['fixmatch', 'mean_teacher'])
def test_fine_tuning_a_pretrained_model_lowers_the_unlabeled_loss(
        kind, name, pretrained_classifier, digits_data, tmp_path):
    """From a pretrained classifier the unlabeled term starts where it can fall: FixMatch's
    pseudo-label loss on the strong views and Mean Teacher's consistency fall, and further than
    in the same run with the unlabeled term's weight at 0 (the labeled loss alone also makes the
    model more consistent). (From random weights both start at ~0 and grow as the predictions
    become confident, test_a_keras_file_learns.)"""
    from ssl_ema.core.loop import Trainer
    backbone = None
    if kind == 'keras_file':
        path = str(tmp_path / 'pretrained.keras')
        pretrained_classifier.save(path)
        arch = f'keras:{path}'
    else:
        arch, backbone = 'small_cnn', pretrained_classifier
    metric = 'algorithm/consistency' if name == 'mean_teacher' else 'algorithm/pseudo_label'

    def fine_tune(weight):
        # Threshold 0.5: most unlabeled images count from the start (few reach 0.95 on digits).
        algorithm = algorithms.ALGORITHMS[name](consistency_weight=weight, **(
            {'confidence_threshold': 0.5} if name == 'fixmatch' else {}))
        cfg = tiny_config(algorithm=name, arch=arch, train_steps=240, backbone_scale='0.0039',
                          optimizer='adam', lr=1e-3)
        trainer = Trainer(cfg, algorithm, digits_data, str(tmp_path / f'run{weight}'),
                          backbone=backbone)
        assert trainer.student.layers[-1].name == 'pretrained'   # its own head, no new one
        metrics = losses_along(trainer, cfg.total_steps)
        unlabeled = [m[metric] for m in metrics]
        return np.mean(unlabeled[-40:]) / np.mean(unlabeled[:40]), trainer

    (fall, trainer), (fall_without, _) = fine_tune(
        algorithms.ALGORITHMS[name].consistency_weight), fine_tune(0.)
    # Measured (last 40 / first 40 steps, with / without): FixMatch 0.84 / 0.97, Mean Teacher
    # 0.34 / 0.65.
    assert fall < 0.9 and fall < fall_without - 0.08, (fall, fall_without)
    accuracy = trainer.evaluate()
    assert accuracy['ema']['test'] > 80 and accuracy['raw']['test'] > 80, accuracy


@pytest.fixture(scope='module')
def pretrained_hub_preset(digits_data, tmp_path_factory):
    """A keras-hub ResNet pretrained (plain Keras, with a throwaway head) on every digits training
    image, saved with its image converter as a local preset: what a downloaded preset is."""
    keras_hub = pytest.importorskip('keras_hub')
    import keras
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64],
        stackwise_num_blocks=[1], stackwise_num_strides=[2], block_type='basic_block',
        use_pre_activation=True, name='pretrained_res_net')
    model = keras.Sequential([keras.Input((8, 8, 3)), backbone,
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    a = digits_data.arrays
    model.fit(np.repeat(a.x_train / 255. - 0.5, 3, -1), a.y_train, epochs=10, batch_size=32,
              verbose=0)
    path = str(tmp_path_factory.mktemp('pretrained_preset') / 'resnet')
    backbone.save_to_preset(path)
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(8, 8), scale=[1 / 255.] * 3, offset=[-0.5] * 3)
    keras_hub.models.ResNetImageClassifierPreprocessor(converter).save_to_preset(path)
    return path


@pytest.mark.parametrize('name', ['fixmatch', 'mean_teacher'])
def test_fine_tuning_a_pretrained_keras_hub_preset_lowers_the_unlabeled_loss(
        name, pretrained_hub_preset, digits_data, tmp_path):
    """A preset gets a new head (random), so the unlabeled term starts at ~0 and rises while the
    head learns the labels (--head_lr 10x, as the pretrained-SSL recipes); from then on it falls:
    Mean Teacher's consistency, and FixMatch's pseudo-label loss per image that counts (its
    share of counted images still grows)."""
    from ssl_ema.core.loop import Trainer
    algorithm = algorithms.ALGORITHMS[name](**({'confidence_threshold': 0.5}
                                                if name == 'fixmatch' else {}))
    cfg = tiny_config(algorithm=name, arch=f'keras_hub:{pretrained_hub_preset}',
                      train_steps=240, optimizer='adam', lr=1e-3, head_lr=1e-2)
    trainer = Trainer(cfg, algorithm, digits_data, str(tmp_path))
    metrics = losses_along(trainer, cfg.total_steps)
    if name == 'fixmatch':
        unlabeled = [m['algorithm/pseudo_label'] / max(m['algorithm/mask'], 1e-6)
                     for m in metrics]
    else:
        unlabeled = [m['algorithm/consistency'] for m in metrics]
    after_warm_up, last = np.mean(unlabeled[40:80]), np.mean(unlabeled[-40:])
    # Measured (last 40 / steps 40-80): FixMatch 0.86, Mean Teacher 0.54.
    assert last < (0.92 if name == 'fixmatch' else 0.8) * after_warm_up, (after_warm_up, last)
    accuracy = trainer.evaluate()
    assert accuracy['ema']['test'] > 80 and accuracy['raw']['test'] > 80, accuracy


@pytest.mark.parametrize('kind', ['keras_file', 'keras_hub'])
def test_a_custom_backbone_resumes_exactly(kind, keras_file, digits_data, tmp_path, request):
    arch = f'keras:{keras_file}' if kind == 'keras_file' else \
        f'keras_hub:{request.getfixturevalue("hub_preset")}'
    cfg = tiny_config(algorithm='fixmatch', arch=arch, train_steps=20,
                      eval_every_kimg=0.15625, layer_decay=0.5, head_lr=0.1, lr_warmup_kimg=0.1)
    straight, resumed, _ = straight_and_resumed(
        cfg, algorithms.ALGORITHMS['fixmatch'](), digits_data, tmp_path, 10)
    for a, b in zip(weights_of(straight.student) + weights_of(straight.ema.model),
                    weights_of(resumed.student) + weights_of(resumed.ema.model)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def exported_predictions(export_dir, x, tmp_path):
    """Class probabilities of an export, computed by a Python that cannot import ssl_ema."""
    np.save(tmp_path / 'x.npy', x)
    done = run_command('-I', '-c', ISOLATED, REPO, export_dir, str(tmp_path / 'x.npy'),
                       str(tmp_path / 'out.npz'), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    with np.load(tmp_path / 'out.npz') as got:
        return got['keras'], got['saved_model']


def check_export(train_dir, trainer_models, digits_data, tmp_path):
    """The run's export, loaded without ssl_ema, predicts what the Trainer's EMA model does."""
    import tensorflow as tf
    x = digits_data.arrays.x_test
    expected = tf.nn.softmax(trainer_models.ema.model(digits_data.normalize(x))).numpy()
    for got in exported_predictions(os.path.join(train_dir, 'export'), x, tmp_path):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_a_keras_model_object_trains_exports_and_stays_untouched(digits_data, tmp_path):
    """From Python: a layer-norm model (no batch norm) given as an object; the caller's model
    keeps its weights (the run trains a copy)."""
    from conftest import run
    from ssl_ema.core.loop import Trainer
    model = tiny_cnn(norm='layer')
    before = weights_of(model)
    train_dir = str(tmp_path / 'run')
    cfg = tiny_config(algorithm='mean_teacher', train_steps=10, eval_every_kimg=0.15625,
                      train_dir=train_dir, backbone_scale='0.0039', ema_bn='recompute')
    run(cfg, algorithms.ALGORITHMS['mean_teacher'](), backbone=model)
    for a, b in zip(before, weights_of(model)):
        np.testing.assert_array_equal(a, b)
    trainer = Trainer(cfg, algorithms.ALGORITHMS['mean_teacher'](), digits_data, train_dir,
                      backbone=model)
    assert trainer.restore() == 10
    check_export(train_dir, trainer, digits_data, tmp_path)   # (no batch norm to re-estimate)


def test_a_keras_file_run_exports_what_its_ema_predicts(keras_file, digits_data, tmp_path):
    """The file's stock batch norm trains on the fused kernel; the export rebuilds the stock
    layers from the checkpoint, and a Python without ssl_ema gets the EMA model's predictions."""
    from conftest import run
    from ssl_ema.core.loop import Trainer
    from ssl_ema.nn import batch_norm
    train_dir = str(tmp_path / 'run')
    cfg = tiny_config(algorithm='mean_teacher', arch=f'keras:{keras_file}', train_steps=10,
                      eval_every_kimg=0.15625, train_dir=train_dir, backbone_scale='0.0039')
    run(cfg, algorithms.ALGORITHMS['mean_teacher']())
    trainer = Trainer(cfg, algorithms.ALGORITHMS['mean_teacher'](), digits_data, train_dir)
    assert any(isinstance(l, batch_norm.BatchNorm)
               for l in trainer.student.get_layer('tiny_batch').layers)
    assert trainer.restore() == 10
    check_export(train_dir, trainer, digits_data, tmp_path)


def test_a_keras_hub_preset_trains_resumes_and_exports(hub_preset, digits_data, tmp_path):
    """Grey digits widened to RGB, the converter's scale and offset, frozen batch norm; the
    export needs keras_hub (installed here) but not ssl_ema."""
    from conftest import run
    from ssl_ema.core.loop import Trainer
    train_dir = str(tmp_path / 'run')
    cfg = tiny_config(algorithm='fixmatch', arch=f'keras_hub:{hub_preset}', train_steps=20,
                      train_dir=train_dir, freeze_bn=True)
    run(cfg, algorithms.ALGORITHMS['fixmatch']())
    trainer = Trainer(cfg, algorithms.ALGORITHMS['fixmatch'](), digits_data, train_dir)
    assert [l.name for l in trainer.student.layers] == [
        'images', 'pixels', 'to_rgb', 'backbone_preprocessing', 'res_net_backbone', 'features',
        'head']
    scale = trainer.student.get_layer('backbone_preprocessing')
    np.testing.assert_allclose(np.ravel(scale.scale), [1 / 255.] * 3, rtol=1e-6)
    fresh = [w for l in trainer.student.layers for w in l.non_trainable_weights]
    assert trainer.restore() == 20
    # --freeze_bn: the batch-norm statistics after training are the preset's.
    for a, b in zip(fresh, [w for l in trainer.student.layers for w in l.non_trainable_weights]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    check_export(train_dir, trainer, digits_data, tmp_path)


@pytest.mark.parametrize('name', ['vat', 'remixmatch'])
def test_every_algorithm_runs_on_a_custom_backbone(name, keras_file, digits_data, tmp_path):
    """VAT's perturbation through the added layers, ReMixMatch's rotation head on the pooled
    features, under mixed precision."""
    from ssl_ema.core.loop import Trainer
    cfg = tiny_config(algorithm=name, arch=f'keras:{keras_file}', train_steps=3,
                      precision='mixed_bfloat16', backbone_scale='0.0039')
    trainer = Trainer(cfg, algorithms.ALGORITHMS[name](), digits_data, str(tmp_path))
    assert all(np.isfinite(list(m.values())).all() for m in losses_along(trainer, 3))
    assert trainer.student.get_layer('tiny_batch').layers[1].compute_dtype == 'bfloat16'
    assert trainer.student.output.dtype == 'float32'


def test_a_keras_hub_vit_trains_with_layer_norm(hub_preset, digits_data, tmp_path):
    """A ViT (layer norm, token sequence out, a fixed 16x16 input: the 8x8 digits are resized
    inside), with Mean Teacher's noisy teacher, the student's statistics for the EMA, USB's
    fine-tuning flags."""
    import keras_hub
    from ssl_ema.core.loop import Trainer
    path = str(tmp_path / 'vit')
    keras_hub.models.ViTBackbone(image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2,
                                 hidden_dim=8, mlp_dim=16).save_to_preset(path)
    cfg = tiny_config(algorithm='mean_teacher', arch=f'keras_hub:{path}', train_steps=3,
                      ema_bn='student', optimizer='adamw', layer_decay=0.65, lr=5e-4,
                      lr_warmup_kimg=0.03125, backbone_scale='0.0039')
    trainer = Trainer(cfg, algorithms.ALGORITHMS['mean_teacher'](), digits_data, str(tmp_path))
    assert [l.name for l in trainer.student.layers] == [
        'images', 'pixels', 'to_rgb', 'resize', 'backbone_preprocessing', 'vi_t_backbone',
        'features', 'head']
    before = weights_of(trainer.ema.model)
    assert all(np.isfinite(list(m.values())).all() for m in losses_along(trainer, 3))
    assert any(not np.array_equal(a, b) for a, b in zip(before, weights_of(trainer.ema.model)))


def test_layer_decay_follows_usb(hub_preset):
    """A ViT of 2 blocks: the embeddings get decay^2, block 0 decay^1, block 1, the final norm
    and the head 1 (USB's param_groups_layer_decay); the head gets --head_lr on top."""
    import keras_hub
    vit = keras_hub.models.ViTBackbone(image_shape=(8, 8, 3), patch_size=4, num_layers=2,
                                       num_heads=2, hidden_dim=8, mlp_dim=16)
    model = custom_backbones.classifier(vit, (8, 8, 1), 10)
    m = dict(zip((v.path for v in model.trainable_variables), custom_backbones.lr_multipliers(
        model, model.trainable_variables, 0.5, 10.)))
    assert m['vit_patching_and_embedding/class_token'] == 0.25
    assert m['vit_encoder/transformer_block_1/mlp/dense_1/kernel'] == 0.5
    assert m['vit_encoder/transformer_block_2/ln_1/gamma'] == 1.
    assert m['vit_encoder/ln/gamma'] == 1. and m['head/kernel'] == 10.


def test_refusals_are_one_line(tmp_path, monkeypatch):
    import keras

    def build(arch='auto', **kwargs):
        return backbones.build(arch, (8, 8, 1), 10, **kwargs)
    with pytest.raises(ConfigError, match='no such file'):
        build(f'keras:{tmp_path}/missing.keras')
    (tmp_path / 'bad.keras').write_text('not a zip')
    with pytest.raises(ConfigError, match='cannot load'):
        build(f'keras:{tmp_path}/bad.keras')
    with pytest.raises(ConfigError, match='not a keras.Model'):
        build(model=keras.layers.Dense(3))

    class NoConfig(keras.Model):   # subclassed, with an __init__ argument get_config cannot see
        def __init__(self, width):
            super().__init__()
            self.dense = keras.layers.Dense(width)

        def call(self, x):
            return self.dense(keras.ops.mean(x, axis=(1, 2)))
    unbuilt = NoConfig(4)
    with pytest.raises(ConfigError, match='not built'):
        build(model=unbuilt)
    unbuilt(np.zeros((1, 8, 8, 1), 'float32'))
    with pytest.raises(ConfigError, match='get_config'):
        build(model=unbuilt)
    three = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)])
    with pytest.raises(ConfigError, match='takes 3 channels; the dataset has 2'):
        backbones.build('auto', (8, 8, 2), 10, model=three)
    monkeypatch.setitem(__import__('sys').modules, 'keras_hub', None)
    with pytest.raises(ConfigError, match='needs keras-hub.*pip install'):
        build('keras_hub:resnet_18_imagenet')
    with pytest.raises(ConfigError, match='adamw.*weight_decay_type=decoupled'):
        TrainConfig(optimizer='adamw', weight_decay_type='l2')
    with pytest.raises(ConfigError, match='--layer_decay=0.0'):
        TrainConfig(layer_decay=0.)


def test_an_unreachable_preset_is_one_line():
    pytest.importorskip('keras_hub')
    with pytest.raises(ConfigError, match='cannot download the preset|not a keras-hub preset'):
        backbones.build('keras_hub:kaggle://keras/no_such_model/keras/none', (8, 8, 1),
                        10)


def test_a_model_with_its_own_head_keeps_it_and_features_are_pooled():
    import keras
    own = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                            keras.layers.Dense(10)], name='own')
    model = backbones.build('auto', (8, 8, 1), 10, model=own)
    assert [l.name for l in model.layers] == ['images', 'own']   # no pixels: no normalisation
    tokens = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Reshape((16, 4))],
                              name='tokens')
    model = backbones.build('auto', (8, 8, 1), 10, model=tokens, normalization=([0.], [1.]))
    assert [l.name for l in model.layers][-2:] == ['features', 'head']
    assert model.get_layer('features').output.shape == (None, 4)


def test_per_variable_learning_rates_and_warm_up():
    import keras
    import tensorflow as tf
    from ssl_ema.core.optimization import LearningRate
    variables = [tf.Variable(1.), tf.Variable(1.), tf.Variable(1.)]
    optimizer = custom_backbones.with_multipliers(keras.optimizers.SGD)(0.1)
    optimizer.set_multipliers([0., 1., 2.])
    optimizer.build(variables)
    optimizer.apply([tf.constant(1.)] * 3, variables)
    np.testing.assert_allclose([v.numpy() for v in variables], [1., 0.9, 0.8], rtol=1e-6)
    # USB's get_cosine_schedule_with_warmup: linear to the peak, then cos(7 pi t / 16 T) over
    # the remaining steps; without warm-up, the anchors' schedule as before.
    lr = LearningRate(1., 110, 'cosine', warmup_steps=10)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10, 60, 110)],
                               [0., 0.5, 1., np.cos(7 * np.pi / 32), np.cos(7 * np.pi / 16)],
                               rtol=1e-6)
    np.testing.assert_allclose(float(LearningRate(1., 100)(50)), np.cos(7 * np.pi / 32), rtol=1e-6)
    assert float(LearningRate(2., 100, 'constant', 10)(5)) == 1.


def test_run_directory_names_of_custom_backbones():
    from ssl_ema.core import run_dir
    cfg, algorithm = TrainConfig(algorithm='fixmatch'), algorithms.ALGORITHMS['fixmatch']()
    byol, dino = (run_dir.default_train_dir(cfg, algorithm, f'keras:/runs/{m}/backbone.keras')
                  for m in ('byol', 'dino'))
    assert os.path.basename(byol).startswith('fixmatch_keras-backbone-') and byol != dino
    assert '/' not in os.path.basename(byol)
    assert backbones.resolve('keras:x.keras', (8, 8, 1)) == f'keras:{os.path.abspath("x.keras")}'
