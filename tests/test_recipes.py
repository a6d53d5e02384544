"""--recipe: named defaults that flags override, recorded and named like any setting; a recipe's
self-training round makes the run directory's top level its last classifier."""
import dataclasses
import json
import os

import numpy as np
import pytest

from conftest import quiet, tiny_config
from ssl_ema import algorithms
from ssl_ema.base import recipes
from ssl_ema.base.config import TrainConfig
from ssl_ema.base.errors import ConfigError
from ssl_ema.core import fitting, run_dir


def test_auto_picks_the_measured_recipe_only_where_it_was_measured():
    assert recipes.resolve('auto', 'fashion_mnist').name == 'hour'
    assert recipes.resolve('auto', 'fashion_mnist', bfloat16=True).name == 'hour_bf16'
    assert recipes.resolve('auto', 'fashion_mnist', avx2=True).name == 'hour_avx2_lite'
    assert recipes.resolve('auto', 'fashion_mnist', bfloat16=True, avx2=True).name == 'hour_bf16'
    assert recipes.resolve('auto', 'digits', avx2=True).name == 'none'
    assert recipes.resolve('auto', 'digits', bfloat16=True).name == 'none'
    for dataset in ('digits', 'cifar10', 'svhn', 'imagenet'):
        assert recipes.resolve('auto', dataset).name == 'none'
    assert recipes.resolve('none', 'fashion_mnist').name == 'none'
    with pytest.raises(ConfigError, match='--recipe=fast is unknown; valid: auto, none, budget, hour'):
        recipes.resolve('fast', 'digits')
    with pytest.raises(ConfigError, match='--recipe=fast is unknown'):
        TrainConfig(recipe='fast')


def test_flags_given_win_over_the_recipe():
    recipe, name, settings, hyperparameters = fitting.recipe_defaults(
        'budget', 'fashion_mnist', 'mean_teacher', explicit=set())
    assert name == recipe.settings['algorithm'] == 'fixmatch'
    assert settings['lr_decay'] == 'cosine_to_zero' and 'teacher' not in settings
    assert hyperparameters == {k: recipe.settings[k] for k in ('teacher', 'confidence_threshold')}
    # Given flags are kept; hyperparameters go only to an algorithm that has them.
    _, name, settings, hyperparameters = fitting.recipe_defaults(
        'budget', 'fashion_mnist', 'mean_teacher', explicit={'algorithm', 'lr_decay'})
    assert name == 'mean_teacher' and 'lr_decay' not in settings and hyperparameters == {}
    # hour's student skips the weak view only with the recipe's own EMA teacher
    _, _, _, hyperparameters = fitting.recipe_defaults('hour', 'fashion_mnist', 'fixmatch', set())
    assert hyperparameters['student_weak_pass'] is False and hyperparameters['teacher'] == 'ema'
    _, _, _, hyperparameters = fitting.recipe_defaults('hour', 'fashion_mnist', 'fixmatch',
                                                       explicit={'teacher'})
    assert 'teacher' not in hyperparameters and 'student_weak_pass' not in hyperparameters
    # hour_avx2_edge's labeled batch is strongly augmented only with its edge fills
    _, _, settings, _ = fitting.recipe_defaults('hour_avx2_edge', 'fashion_mnist', 'fixmatch',
                                                set())
    assert (settings['augment_fill'], settings['labeled_augment']) == ('edge', 'strong')
    for given in ('augment_fill', 'labeled_augment'):
        _, _, settings, _ = fitting.recipe_defaults('hour_avx2_edge', 'fashion_mnist', 'fixmatch',
                                                    explicit={given})
        assert 'augment_fill' not in settings and 'labeled_augment' not in settings
        assert settings['uratio'] == 1
    _, name, settings, _ = fitting.recipe_defaults('budget', 'fashion_mnist', 'supervised',
                                                   explicit={'algorithm'})
    assert name == 'supervised' and settings['train_kimg'] == recipe.settings['train_kimg']
    assert fitting.recipe_defaults('none', 'fashion_mnist', 'vat', set())[1:] == ('vat', {}, {})


def test_directory_names_before_and_under_a_recipe():
    fixmatch = algorithms.ALGORITHMS['fixmatch']
    # `none` (and every run made before recipes) keeps its name.
    cfg = TrainConfig(dataset='fashion_mnist', labels=250, algorithm='fixmatch', recipe='none')
    assert run_dir.default_train_dir(cfg, fixmatch(), 'small_cnn') == os.path.join(
        'experiments', 'fashion_mnist.250@1', 'fixmatch_small_cnn')
    # Under a recipe its name is in the directory's, its own values are not; a flag that
    # differs from the recipe's value is.
    budget = recipes.RECIPES['budget'].settings
    config_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = dataclasses.replace(cfg, recipe='budget',
                              **{k: v for k, v in budget.items() if k in config_fields})
    algorithm = fixmatch(teacher=budget['teacher'],
                         confidence_threshold=budget['confidence_threshold'])
    assert os.path.basename(run_dir.default_train_dir(cfg, algorithm, 'small_cnn')) == (
        'fixmatch_small_cnn_recipebudget')
    assert os.path.basename(run_dir.default_train_dir(
        cfg, dataclasses.replace(algorithm, confidence_threshold=0.95), 'small_cnn')) == (
        'fixmatch_small_cnn_confidence_threshold0.95_recipebudget')


def test_a_run_recorded_before_recipes_existed_still_resumes(tmp_path):
    from ssl_ema.base.files import write_json
    old = run_dir.run_record(tiny_config(recipe='none'), algorithms.create('mean_teacher'))
    for newer in ('recipe', 'self_training_kimg'):
        del old['config'][newer]
    write_json(str(tmp_path / 'flags.json'), old)
    assert run_dir.check_compatible(str(tmp_path), run_dir.run_record(
        tiny_config(recipe='none'), algorithms.create('mean_teacher')), quiet)
    assert run_dir.open_run_dir(str(tmp_path)).config.recipe == 'none'
    with pytest.raises(ConfigError, match='made with --recipe=none, not --recipe=budget'):
        run_dir.check_compatible(str(tmp_path), run_dir.run_record(
            tiny_config(recipe='budget'), algorithms.create('mean_teacher')), quiet)


@pytest.mark.parametrize('native, avx2', [('', ''), ('CPU with AVX512_BF16', ''),
                                          ('', 'CPU without AVX-512')])
def test_auto_takes_the_recipe_of_the_machines_kind(monkeypatch, native, avx2):
    """bfloat16 where it is native, else the AVX2 recipe where float32 is no wider than AVX2,
    else hour."""
    from ssl_ema.base import machine
    monkeypatch.setattr(machine, 'native_bfloat16', lambda **_: native)
    monkeypatch.setattr(machine, 'avx2_only', lambda **_: avx2)
    float32 = 'hour_avx2_lite' if avx2 else 'hour'
    recipe, _, settings, _ = fitting.recipe_defaults('auto', 'fashion_mnist', 'fixmatch', set())
    assert recipe.name == ('hour_bf16' if native else float32)
    assert settings.get('precision', 'float32') == ('mixed_bfloat16' if native else 'float32')
    assert settings['train_kimg'] == recipes.RECIPES[recipe.name].settings['train_kimg']
    assert settings['uratio'] == (1 if avx2 else 2)
    assert settings.get('augment_fill', 'anchors') == ('edge' if avx2 else 'anchors')
    assert settings['arch'] == ('small_cnn_lite' if avx2 else 'small_cnn')
    # --precision given decides, whatever the machine
    for precision, name in (('float32', float32), ('mixed_bfloat16', 'hour_bf16'),
                            ('auto', 'hour_bf16' if native else float32)):
        recipe, _, settings, _ = fitting.recipe_defaults(
            'auto', 'fashion_mnist', 'fixmatch', {'precision'}, precision)
        assert recipe.name == name and 'precision' not in settings
    assert fitting.recipe_defaults('auto', 'digits', 'mean_teacher', set())[0].name == 'none'


def test_auto_resumes_a_run_with_the_recipe_it_was_made_with(tmp_path, monkeypatch):
    from ssl_ema.base import machine
    from ssl_ema.base.files import write_json
    monkeypatch.setattr(machine, 'native_bfloat16', lambda **_: '')
    monkeypatch.setattr(machine, 'avx2_only', lambda **_: '')
    for made, before_recipes in (('hour_bf16', False), ('hour_avx2', False),
                                 ('hour_avx2_edge', False), ('hour_avx2_lite', False),
                                 ('budget', False), ('none', True)):
        record = run_dir.run_record(tiny_config(recipe=made), algorithms.create('fixmatch'))
        if before_recipes:
            del record['config']['recipe']
        write_json(str(tmp_path / 'flags.json'), record)
        recipe = fitting.recipe_defaults('auto', 'fashion_mnist', 'fixmatch', set(),
                                         train_dir=str(tmp_path))[0]
        assert recipe.name == made
    # a recipe named by the user is the user's: the mismatch is refused as before
    assert fitting.recipe_defaults('hour', 'fashion_mnist', 'fixmatch', {'recipe'},
                                   train_dir=str(tmp_path))[0].name == 'hour'


def test_a_self_training_round_becomes_the_runs_classifier(digits_data, tmp_path):
    cfg = tiny_config(algorithm='fixmatch', train_steps=40, self_training_kimg=0.625,
                      train_dir=str(tmp_path / 'run'))   # rounds of 40 steps of 16 images
    train_dir = fitting.fit(cfg, algorithms.create('fixmatch'), log=quiet)
    summary = run_dir.read_summary(train_dir)
    last = os.path.join(train_dir, 'rounds', '1')
    assert summary['rounds'][0]['train_dir'] == '.' and summary['rounds'][1]['train_dir'] == (
        os.path.join('rounds', '1'))
    assert {k: v for k, v in summary.items() if k not in ('rounds', 'cpu_time_s')} == {
        k: v for k, v in run_dir.read_summary(last).items() if k != 'cpu_time_s'}
    assert summary['cpu_time_s'] == pytest.approx(sum(r['cpu_time_s'] for r in summary['rounds']))
    own = run_dir.read_history(train_dir)[-1]['ema']['test']
    assert summary['rounds'][0]['ema']['test'] == own
    # export/ is the last round's classifier: what accuracy.json reports.
    from ssl_ema.core.classifier import load_classifier
    top = load_classifier(os.path.join(train_dir, 'export'))
    x, y = digits_data.arrays.x_test, digits_data.arrays.y_test
    np.testing.assert_allclose(top.predict(x), load_classifier(os.path.join(last, 'export'))
                               .predict(x), atol=1e-6)
    assert 100 * np.mean(top.predict(x).argmax(1) == y) == pytest.approx(
        summary['ema']['test']['last'], abs=0.01)
    # Accuracy against CPU time (the benchmark's cpu_time.png) runs on through the round.
    from ssl_ema.core import cpu_plot
    curve = cpu_plot.cpu_curve(train_dir, summary)
    assert len(curve) == len(run_dir.read_history(train_dir)) + len(run_dir.read_history(last))
    assert all(a[0] < b[0] for a, b in zip(curve, curve[1:]))
    assert curve[-1] == (pytest.approx(summary['cpu_time_s']), summary['ema']['test']['last'])
    # A finished run and its rounds are not retrained, and the top level stays the last round's.
    logged = []
    fitting.fit(cfg, algorithms.create('fixmatch'), log=logged.append)
    assert not any(line.startswith('step ') for line in logged)
    assert run_dir.read_summary(train_dir) == summary
    assert json.loads(open(os.path.join(train_dir, 'export', 'export.json')).read())[
        'algorithm'] == 'distill'


def test_supervised_never_gets_a_round(digits_data, tmp_path):
    cfg = tiny_config(algorithm='supervised', train_steps=20, self_training_kimg=0.3125,
                      train_dir=str(tmp_path / 'run'))
    train_dir = fitting.fit(cfg, algorithms.create('supervised'), log=quiet)
    assert not os.path.exists(os.path.join(train_dir, 'rounds'))
    assert 'rounds' not in run_dir.read_summary(train_dir)
