"""PretrainConfig: every setting of self-supervised pretraining (`python -m ssl_ema.pretrain`,
ssl_ema/core/pretraining.py), one dataclass field each, which is also the flag of the same name
(base/hparams.py), as TrainConfig is for semi-supervised training. The methods (BYOL, DINO)
declare their own hyperparameters (algorithms/pretraining/)."""
import dataclasses
from typing import Optional

from ssl_ema.base.errors import ConfigError
from ssl_ema.base.hparams import Length, check_values, hparam


@dataclasses.dataclass
class PretrainConfig(Length):
    """Everything the pretraining loop needs; each field is the flag of the same name."""
    method: str = hparam('byol', 'Self-supervised method: byol or dino (its own flags are '
                         'listed under its module in --helpfull).')
    dataset: str = hparam('digits', 'Dataset; its training images outside --valid (and any extra '
                          'unlabeled pool) are pretrained on without labels.')
    data_dir: Optional[str] = hparam(None, 'Where dataset files live.', run_defining=False)
    labels: int = hparam(50, 'Labeled images of the split (chosen by --seed as ssl_ema.train '
                         'does): the k-NN memory of the evaluation, never trained on.')
    valid: int = hparam(200, 'Training images held out for validation (k-NN queries).')
    seed: int = hparam(1, 'Seed of the split, the initialisation and the views.')
    arch: str = hparam('auto', 'Backbone (as ssl_ema.train\'s --arch); its pooled features are '
                       'the representation.')
    input_norm: str = hparam('standardize', 'Model input: standardize or plus_minus_one (as '
                             'ssl_ema.train); the written backbone does it itself.')
    batch: int = hparam(128, 'Unlabeled images per step, each seen in every view of the method '
                        '(ours, for a CPU; BYOL 4096, DINO 1024).')
    train_kimg: float = hparam(64., 'Training length in thousands (1024) of images.',
                               run_defining=False)
    train_steps: int = hparam(0, 'Training length in steps; overrides --train_kimg when > 0.',
                              run_defining=False)
    eval_every_kimg: float = hparam(16., 'k-NN evaluation and checkpoint every this many kimg.',
                                    run_defining=False)
    log_every_steps: int = hparam(50, 'Print a progress line every this many steps.',
                                  run_defining=False)
    optimizer: str = hparam('adamw', 'adamw (DINO\'s, main_dino.py --optimizer) or sgd '
                            '(momentum 0.9; BYOL\'s LARS is not offered).')
    lr: float = hparam(1e-3, 'Peak learning rate, reached after --warmup_fraction and decayed '
                       'to 0 by a half cosine (BYOL Sec. 3.3, DINO main_dino.py). 1e-3 with '
                       'AdamW at batch 128: ours (runs/RESULTS.md, pretraining).')
    warmup_fraction: float = hparam(0.1, 'Fraction of training with a linear learning-rate '
                                    'warm-up (DINO: 10 of 100 epochs).')
    weight_decay: float = hparam(0.04, 'Decoupled weight decay of kernels (not biases or '
                                 'normalisation; main_dino.py --weight_decay, kept constant '
                                 'instead of rising to 0.4).')
    knn_k: int = hparam(20, 'Neighbours k of the k-NN evaluation (DINO eval_knn.py nb_knn 20).')
    knn_temperature: float = hparam(0.07, 'Temperature T of the k-NN votes exp(cos / T) '
                                    '(DINO eval_knn.py).')
    export_model: str = hparam('', 'The backbone written to backbone.keras: raw (the student) '
                               'or ema (the teacher); default: the method\'s (BYOL keeps the '
                               'student, Sec. 3.1; DINO evaluates the teacher). Our short runs '
                               'measured the student better for both (runs/RESULTS.md).',
                               run_defining=False)
    precision: str = hparam('float32', 'float32, mixed_bfloat16, mixed_float16 or auto (as '
                            'ssl_ema.train); heads, losses and the teacher stay float32.')
    train_dir: Optional[str] = hparam(None, 'Run directory; an existing run there resumes. '
                                      'Default: experiments/<dataset>.<labels>@<seed>/pretrain_'
                                      '<method>_<arch>[_<non-default flags>].',
                                      run_defining=False)
    keep_checkpoints: int = hparam(3, 'Checkpoints kept in --train_dir.', run_defining=False)
    distribute: str = hparam('default', 'default, mirrored or multi_worker (as ssl_ema.train).',
                             run_defining=False)
    cpu_devices: int = hparam(2, 'Logical CPU devices for --distribute=mirrored without GPUs.',
                              run_defining=False)
    collective_timeout_s: float = hparam(600., 'As ssl_ema.train\'s.', run_defining=False)

    def __post_init__(self):
        check_values(self, {'optimizer': ('adamw', 'sgd'), 'export_model': ('', 'raw', 'ema'),
                            'input_norm': ('standardize', 'plus_minus_one'),
                            'precision': ('float32', 'mixed_bfloat16', 'mixed_float16', 'auto'),
                            'distribute': ('default', 'mirrored', 'multi_worker')},
                     positive_ints=('batch', 'labels', 'knn_k', 'log_every_steps',
                                    'keep_checkpoints', 'cpu_devices'),
                     positive=('train_kimg', 'eval_every_kimg', 'lr', 'knn_temperature'))
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f'--warmup_fraction={self.warmup_fraction} must be in [0, 1)')
        if self.valid < 0 or self.train_steps < 0 or self.weight_decay < 0:
            raise ConfigError('--valid, --train_steps and --weight_decay must be >= 0')
