"""The algorithms beyond Mean Teacher and VAT: each learns on tiny digits with an unlabeled loss
that actually moves, and each one's flags reach --helpfull. Their math is in test_losses.py."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_config
from ssl_ema import algorithms
from ssl_ema.config import ConfigError
from ssl_ema.trainer import Trainer

NEW = ['pi_model', 'pseudo_label', 'ict', 'mixmatch', 'fixmatch', 'uda']


def logged_values(lines, key):
    return [float(line.split(f' {key}=')[1].split()[0]) for line in lines if f' {key}=' in line]


@pytest.mark.parametrize('name', NEW)
def test_algorithm_learns_on_tiny_digits(name, digits_data, tmp_path):
    cfg = tiny_config(algorithm=name, train_steps=200, eval_every_kimg=1.5625, log_every_steps=10,
                      warmup_fraction=0.2)
    # pseudo_label's own confidence would mask nearly every unlabeled image in so short a run
    overrides = {'pseudo_label': dict(confidence_threshold=0.8)}.get(name, {})
    logged = []
    trainer = Trainer(cfg, algorithms.ALGORITHMS[name](**overrides), digits_data, str(tmp_path))
    summary = trainer.train(log=logged.append)
    labeled = logged_values(logged, 'labeled')
    unlabeled = logged_values(logged, 'unlabeled')
    # the labeled loss falls (MixMatch's is on mixed-up labels, whose entropy is its floor)
    assert np.mean(labeled[-5:]) < (0.75 if name == 'mixmatch' else 0.5) * np.mean(labeled[:2]), labeled
    # the unlabeled loss is alive: positive and changing (USB's Mean Teacher's was always zero)
    assert max(unlabeled) > 0 and len(set(unlabeled)) > 5, unlabeled
    assert summary['ema']['test']['last'] > 60, summary                   # chance is 10%
    assert summary['raw']['test']['last'] > 60, summary


def test_mixmatch_guesses_from_k_views():
    assert algorithms.ALGORITHMS['mixmatch'](label_guess_views=3).views == ('weak',) * 3
    assert algorithms.ALGORITHMS['mixmatch']().views == ('weak', 'weak')


def test_uda_rejects_an_unknown_tsa_schedule():
    with pytest.raises(ConfigError, match='--tsa=cosine is unknown; valid: none, linear, log, exp'):
        algorithms.ALGORITHMS['uda'](tsa='cosine')


def test_helpfull_lists_each_algorithms_flags_with_defaults():
    text = subprocess.run([sys.executable, '-m', 'ssl_ema.train', '--helpfull'], capture_output=True,
                          text=True).stdout
    for module, flag in [('pi_model', None), ('pseudo_label', None), ('ict', 'mixup_alpha'),
                         ('mixmatch', 'label_guess_views'), ('mixmatch', 'temperature'),
                         ('fixmatch', 'confidence_threshold'), ('uda', 'tsa')]:
        assert f'ssl_ema.algorithms.{module}:' in text or flag is None, module
        if flag:
            assert f'--{flag}:' in text, flag
    for default in ['fixmatch 1.0', 'ict 100.0', 'mixmatch 75.0', 'pi_model 10.0', 'pseudo_label 1.0',
                    'uda 1.0', 'fixmatch 0.95', 'pseudo_label 0.95', 'uda 0.8', 'mixmatch 0.5',
                    'uda 0.4', 'ict 1.0', 'mixmatch 0.75']:
        assert default in ' '.join(text.split()), default
