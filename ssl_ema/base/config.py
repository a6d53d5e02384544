"""TrainConfig: every setting of the shared training loop, one dataclass field each, which is
also the flag of the same name (base/hparams.py). Algorithms declare their own hyperparameters the
same way (algorithms/base.py)."""
import dataclasses
import re
from typing import Optional

from ssl_ema.base import recipes
from ssl_ema.base.errors import ConfigError
from ssl_ema.base.hparams import Length, check_values, hparam, parse_floats


@dataclasses.dataclass
class TrainConfig(Length):
    """Everything the shared training loop needs; each field is the flag of the same name."""
    algorithm: str = hparam('mean_teacher', 'SSL algorithm (its own flags are listed under its '
                            'module in --helpfull).')
    recipe: str = hparam('auto', 'Named defaults measured for a budget (ssl_ema/base/recipes.py, '
                         'runs/RECIPE.md): hour (FixMatch with an EMA teacher, threshold 0.8, '
                         'uratio 2, 448 kimg: Fashion-MNIST-sized data at 250 labels in an hour '
                         'of CPU), hour_bf16 (hour in mixed bfloat16 for 896 kimg, where '
                         'bfloat16 is native), budget (hour at 128 kimg, the student\'s weak pass '
                         'kept), none (the toolkit\'s defaults, every run before recipes), or '
                         'auto: for fashion_mnist hour_bf16 where this machine (or --precision) '
                         'computes bfloat16 natively, else hour; none for every other dataset; '
                         'on a --train_dir that holds a run, its recipe. Flags you give win.')
    dataset: str = hparam('digits', 'Dataset; digits is embedded in scikit-learn (no download).')
    data_dir: Optional[str] = hparam(None, 'Where dataset files live (default: tensorflow-datasets\''
                                     ' own directory).', run_defining=False)
    labels: int = hparam(50, 'Labeled training images, class-balanced, chosen by --seed.')
    valid: int = hparam(200, 'Training images held out for validation (the same for every seed).')
    seed: int = hparam(1, 'Seed of the label split, the initialisation and the data order.')
    # The split's protocol (data/splits.py, docs/datasets.md): at these defaults a split is the
    # class-balanced one above and its split.json is unchanged.
    labeled_head: int = hparam(0, 'Long-tailed split: labeled images of the head class, N_1; class '
                               'c of --class_order gets N_1 * gamma^(-(c-1)/(K-1)) (rounded '
                               'down), --labels must be their sum and the pool leaves them out '
                               '(USB\'s classic_cv_imb: 1500 on CIFAR-10). 0: off.')
    unlabeled_head: int = hparam(0, 'Long-tailed split: pool images of the head class, M_1 (USB: '
                                 '3000 on CIFAR-10), profiled as --pool_order says.')
    imbalance_ratio: float = hparam(100., 'Long-tailed split: gamma = N_1 / N_K, head over tail '
                                    '(USB\'s classic_cv_imb: 100 or 150).')
    class_order: str = hparam('', 'Long-tailed split: the classes from head to tail, e.g. '
                              '9,8,7,6,5,4,3,2,1,0 or 0-9; empty: 0..K-1.')
    pool_order: str = hparam('consistent', 'Long-tailed pool: consistent (the labeled profile '
                             'from M_1), uniform (M_1 images per class) or reversed (the '
                             'profile tail to head: class K gets M_1; USB\'s ulb_imb_ratio -100).')
    known_classes: str = hparam('', 'Open-set split: the classes the labels name (e.g. 0-5), '
                                'renumbered 0..K\'-1 in that order; the others only reach the '
                                'pool (--mismatch) and the test\'s unknown images. Empty: all.')
    mismatch: float = hparam(0., 'Open-set split: fraction of the pool drawn from the classes '
                             'not in --known_classes, in [0, 1] (Oliver et al. 2018: 0-100%).')
    pool_size: int = hparam(0, 'Open-set split: pool images, the same at every --mismatch; 0: '
                            'the largest every mismatch level can supply.')
    augment: str = hparam('weak', 'Augmentation of labeled images and of unlabeled views that '
                          'the algorithm does not ask to be strong: weak, strong or none.')
    labeled_augment: str = hparam('', 'Augmentation of the labeled batch alone: weak, strong '
                                  '(RandAugment and Cutout, as the unlabeled strong view) or '
                                  'none; empty: --augment. Unlabeled views keep --augment.')
    augment_fill: str = hparam('anchors', 'What the augmentations give the pixels they uncover: '
                               'anchors (reflect padding for translations, grey for RandAugment\'s '
                               'geometric ops and Cutout: google-research/fixmatch) or edge (each '
                               'image\'s mean border colour, for all three: objects on a plain '
                               'background, e.g. Fashion-MNIST\'s black).')
    image_size: str = hparam('', 'H or H,W pixels: every image is scaled to cover that size '
                             '(bilinear, antialiased) and centre-cropped, before --augment; '
                             'evaluation, the exported classifier and predict --resize use the '
                             'same size. Default: the data\'s own size (a folder of mixed sizes: '
                             'the median height and width of its training images).')
    arch: str = hparam('auto', 'Backbone: small_cnn (small_cnn_wW: W channels, not 32, in its '
                       'first block; small_cnn_lite: one convolution at full resolution), '
                       'cnn13, wrnD_K (e.g. wrn28_2), or auto '
                       '(small_cnn below 32 pixels, wrn28_2 from 32 up); or one you bring, '
                       'pretrained or not: keras:PATH.keras (a Keras 3 model file) or '
                       'keras_hub:HANDLE_OR_DIR (a keras-hub preset, needs keras-hub), with '
                       'pooling and a new head added (ssl_ema/nn/custom_backbones.py).')
    backbone_scale: str = hparam('', 'keras: backbones (and keras.Model ones): their input is '
                                 '0..255 pixels * this (one number or one per channel; e.g. '
                                 '0.00392 for [0, 1]); empty: 1, or a keras_hub preset\'s own '
                                 'image converter\'s.')
    backbone_offset: str = hparam('', 'Added after --backbone_scale (one number or one per '
                                  'channel); empty: 0, or a keras_hub preset\'s own.')
    freeze_bn: bool = hparam(False, 'Every batch-norm layer keeps its (pretrained) statistics, '
                             'scale and offset and runs in inference mode (Keras 3\'s '
                             'BatchNormalization.trainable=False, as the Keras transfer-learning '
                             'guide fine-tunes).')
    batch: int = hparam(32, 'Labeled images per step (global, over all replicas).')
    uratio: int = hparam(4, 'Unlabeled images per step = uratio * batch.')
    train_kimg: float = hparam(64., 'Training length in thousands (1024) of labeled images, as the '
                               'anchors count; steps = train_kimg * 1024 / batch.',
                               run_defining=False)
    train_steps: int = hparam(0, 'Training length in steps; overrides --train_kimg when > 0.',
                              run_defining=False)
    self_training_kimg: float = hparam(
        0., 'Length in kimg of each self-training round that --recipe adds after the run '
        '(core/distilling.py: the run\'s classifier labels the pool, a new student learns it); '
        '0: no round (runs/RECIPE.md measures what one adds).', run_defining=False)
    eval_every_kimg: float = hparam(2., 'Evaluate raw and EMA models (and checkpoint) every this '
                                    'many thousand labeled images.', run_defining=False)
    log_every_steps: int = hparam(100, 'Print a progress line every this many steps.',
                                  run_defining=False)
    optimizer: str = hparam('sgd', 'sgd (Nesterov momentum), adam, or adamw (Adam with '
                            'decoupled weight decay, Loshchilov & Hutter 2019: needs '
                            '--weight_decay_type=decoupled; USB\'s usb_cv optimizer).')
    layer_decay: float = hparam(1., 'Layer-wise learning-rate decay in (0, 1] (BEiT, Bao et al. '
                                '2022, fine-tuning; USB\'s layer_decay, its usb_cv configs use '
                                '0.5-1.0): block i of B gets lr * layer_decay^(B-1-i), the stem '
                                'lr * layer_decay^B, the head lr. 1: off.')
    head_lr: float = hparam(0., 'Learning rate of the new classification head of a backbone you '
                            'bring (and of no other layer); 0: --lr, one rate for all, as USB. '
                            'A new, randomly initialised head on a pretrained body may want a '
                            'larger one than the body.')
    lr_warmup_kimg: float = hparam(0., 'Learning-rate warm-up: linear from 0 to --lr over this '
                                   'many kimg, then --lr_decay over the rest (USB\'s '
                                   'get_cosine_schedule_with_warmup; its usb_cv configs warm up '
                                   '5120 of 204800 steps). 0: none.')
    lr: float = hparam(0.03, 'Peak learning rate.')
    lr_decay: str = hparam('cosine', 'cosine (the anchors\' cos(7 pi t / 16 T), ending at 0.2 '
                           'lr), cosine_to_zero ((1 + cos(pi t / T)) / 2, SGDR\'s) or constant.')
    momentum: float = hparam(0.9, 'SGD momentum (Nesterov) or Adam beta_1 (Adam\'s epsilon is '
                             '1e-8, tf.compat.v1.train.AdamOptimizer\'s as in the anchors).')
    weight_decay: float = hparam(5e-4, 'Weight decay on kernels (conv and dense; not biases or '
                                 'batch norm, as the anchors\' "kernel" filter), applied as '
                                 '--weight_decay_type says.')
    weight_decay_type: str = hparam(
        'decoupled', 'decoupled: after each step kernel *= 1 - weight_decay * lr (the anchors\' '
        'Adam algorithms, vat.py and ict.py; our CPU results, runs/RESULTS.md, were measured '
        'with it); l2: weight_decay * sum(kernel^2) / 2 is added to the loss, so its gradient '
        'goes through the momentum (the anchors\' SGD algorithms, e.g. fixmatch.py; about 10x '
        'stronger at momentum 0.9: 1 / (1 - momentum)).')
    input_norm: str = hparam(
        'standardize', 'Model input: standardize (per channel, with the training images\' mean '
        'and std) or plus_minus_one (x / 127.5 - 1, the anchors\' default, libml/data.py '
        '--whiten=False). Input noise and VAT\'s epsilon are in plus_minus_one units either way.')
    wrn_conv_bias: bool = hparam(False, 'Give wrnD_K\'s convolutions biases, as the anchors\' '
                                 'tf.layers.conv2d (libml/models.py); off by default as in the WRN '
                                 'papers (most are followed by batch norm).')
    warmup_fraction: float = hparam(0.4, 'Fraction of training over which the consistency weight '
                                    'ramps up (its shape: --ramp_up; fixmatch and uda do not '
                                    'ramp).')
    ema_decay: float = hparam(0.999, 'EMA decay per step, in [0, 1).')
    ema_warmup: bool = hparam(True, 'Use decay min(ema_decay, (1+t)/(10+t)) at update t, as '
                              'tf.train.ExponentialMovingAverage(num_updates=t): the teacher '
                              'tracks the student early instead of averaging in the random '
                              'initialisation for ~1/(1-decay) steps. --noema_warmup for a '
                              'constant decay.')
    ema_bn: str = hparam('average', 'Batch-norm statistics of every averaged model: average (the '
                         'moving statistics averaged like the weights: the average is a '
                         'self-contained classifier), student (only trainable weights averaged, '
                         'the student\'s statistics used, as the anchors\' fixmatch.py does) or '
                         'recompute (as student while training; at evaluation re-estimated for '
                         'the averaged weights over --ema_bn_batches training batches). Default: '
                         'ours, measured against the others in runs/RESULTS.md.')
    ema_bn_batches: int = hparam(16, 'Training batches (of batch * uratio unlabeled images, or '
                                 'the labeled batch for supervised) over which --ema_bn=recompute '
                                 're-estimates the statistics; the first ones of the run\'s data '
                                 'stream, the same at every evaluation (our choice).')
    ema_decays: str = hparam('', 'Extra EMA horizons tracked beside the teacher\'s --ema_decay, '
                             'comma-separated decays (e.g. 0.99,0.9999), each with --ema_warmup, '
                             'evaluated and recorded under ema_<decay> (the teacher stays "ema").')
    polyak_start_fraction: float = hparam(-1., 'Also track Polyak\'s uniform average of the '
                                          'weights from this fraction of training on (0 = from '
                                          'the start), recorded as "polyak"; -1 = off.')
    ema_reference_batch: int = hparam(0, 'EMA scaling rule (Busbridge et al. 2023): every EMA '
                                      'decay d becomes d^(batch / ema_reference_batch), keeping '
                                      'the horizon in images when --batch differs from the batch '
                                      'the decays were tuned for; 0 = off.')
    posthoc_sigma_rels: str = hparam('0.05,0.1', 'Relative widths sigma_rel of the power-function'
                                     ' EMA profiles tracked for post-hoc EMA (Karras et al. 2024,'
                                     ' Sec. 3.2, tracked these two), comma-separated.')
    posthoc_snapshot_every_kimg: float = hparam(0., 'Save snapshots of the --posthoc_sigma_rels '
                                                'profiles every this many kimg into '
                                                '<train_dir>/posthoc/ for `python -m '
                                                'ssl_ema.posthoc`; 0 = no post-hoc tracking.')
    train_dir: Optional[str] = hparam(None, 'Run directory; an existing run there resumes. '
                                      'Default: experiments/<dataset>.<labels>@<seed>/<algorithm>_'
                                      '<arch>[_<non-default flags>].', run_defining=False)
    keep_checkpoints: int = hparam(3, 'Checkpoints kept in --train_dir.', run_defining=False)
    distribute: str = hparam('default', 'default (one device), mirrored (tf.distribute.'
                             'MirroredStrategy over all GPUs, else --cpu_devices logical CPUs) or '
                             'multi_worker (MultiWorkerMirroredStrategy over the processes named '
                             'by $TF_CONFIG or by SLURM; python -m ssl_ema.launch starts them on '
                             'one machine).', run_defining=False)
    cpu_devices: int = hparam(2, 'Logical CPU devices for --distribute=mirrored without GPUs.',
                              run_defining=False)
    precision: str = hparam('float32', 'float32, mixed_bfloat16 (CPUs with AVX-512 BF16 or AMX, '
                            'TPUs, GPUs from A100 on), mixed_float16 (older GPUs; with loss '
                            'scaling) or auto (mixed_bfloat16 where this machine computes '
                            'bfloat16 natively, else float32; chosen each time the run starts or '
                            'resumes): the layers compute in that type, the weights, EMA, '
                            'batch-norm statistics, logits and losses stay float32. Speed and '
                            'accuracy: runs/SPEED.md.')
    jit_compile: bool = hparam(False, 'Compile the training step with XLA. Off by default: '
                               'several times slower on CPU where measured (runs/SPEED.md).',
                               run_defining=False)
    collective_timeout_s: float = hparam(
        600., 'With --distribute=multi_worker: a collective (all-reduce) that has not completed '
        'after this many seconds fails the run instead of hanging. Must exceed the longest pause '
        'of one worker the others wait for: the chief\'s evaluation and checkpoint. (A dead '
        'worker is detected sooner, by TensorFlow\'s coordination-service heartbeats.) 0: no '
        'timeout.', run_defining=False)
    deterministic: bool = hparam(False, 'Enable TensorFlow op determinism (bitwise-reproducible '
                                 'runs; slower on GPU).', run_defining=False)

    def __post_init__(self):
        choices = {'optimizer': ('sgd', 'adam', 'adamw'), 'lr_decay': ('cosine', 'cosine_to_zero', 'constant'),
                   'distribute': ('default', 'mirrored', 'multi_worker'),
                   'augment': ('weak', 'strong', 'none'), 'augment_fill': ('anchors', 'edge'),
                   'weight_decay_type': ('decoupled', 'l2'),
                   'input_norm': ('standardize', 'plus_minus_one'),
                   'precision': ('float32', 'mixed_bfloat16', 'mixed_float16', 'auto')}
        check_values(self, choices,
                     positive_ints=('batch', 'uratio', 'labels', 'log_every_steps',
                                    'keep_checkpoints', 'cpu_devices'),
                     positive=('train_kimg', 'eval_every_kimg', 'lr'))
        if self.labeled_augment not in ('', 'weak', 'strong', 'none'):
            raise ConfigError(f'--labeled_augment={self.labeled_augment} is unknown; valid: weak, '
                              'strong, none (empty: as --augment)')
        if self.recipe not in recipes.NAMES:
            raise ConfigError(f'--recipe={self.recipe} is unknown; valid: '
                              f'{", ".join(recipes.NAMES)}')
        self._check_fine_tuning()
        if not 0. <= self.ema_decay < 1.:
            raise ConfigError(f'--ema_decay={self.ema_decay} must be in [0, 1), e.g. 0.999')
        self._check_averages()
        if not 0. <= self.warmup_fraction <= 1.:
            raise ConfigError(f'--warmup_fraction={self.warmup_fraction} must be in [0, 1]')
        if self.image_size and not re.fullmatch(r'[1-9]\d*(,[1-9]\d*)?', str(self.image_size)):
            raise ConfigError(f'--image_size={self.image_size} must be H or H,W in pixels, e.g. '
                              '32 or 224,224')
        if (self.valid < 0 or self.train_steps < 0 or self.self_training_kimg < 0 or self.weight_decay < 0
                or self.collective_timeout_s < 0):
            raise ConfigError('--valid, --train_steps, --self_training_kimg, --weight_decay and '
                              '--collective_timeout_s must be >= 0')

    def _check_fine_tuning(self):
        if self.optimizer == 'adamw' and self.weight_decay_type != 'decoupled':
            raise ConfigError('--optimizer=adamw decays the weights decoupled: it needs '
                              '--weight_decay_type=decoupled (or use --optimizer=adam)')
        if not 0. < self.layer_decay <= 1.:
            raise ConfigError(f'--layer_decay={self.layer_decay} must be in (0, 1]')
        if self.head_lr < 0 or self.lr_warmup_kimg < 0:
            raise ConfigError('--head_lr and --lr_warmup_kimg must be >= 0')
        for name in ('backbone_scale', 'backbone_offset'):
            try:
                parse_floats(getattr(self, name))
            except ValueError:
                raise ConfigError(f'--{name}={getattr(self, name)} must be a number or '
                                  'comma-separated numbers (one per channel)') from None

    def _check_averages(self):
        if self.ema_bn not in ('average', 'student', 'recompute'):
            raise ConfigError(f'--ema_bn={self.ema_bn} is unknown; valid: average, student, '
                              'recompute')
        if self.ema_bn_batches <= 0 or self.ema_reference_batch < 0:
            raise ConfigError('--ema_bn_batches must be > 0 and --ema_reference_batch >= 0')
        if not (self.polyak_start_fraction == -1 or 0. <= self.polyak_start_fraction < 1.):
            raise ConfigError(f'--polyak_start_fraction={self.polyak_start_fraction} must be in '
                              '[0, 1), or -1 (off)')
        if self.posthoc_snapshot_every_kimg < 0:
            raise ConfigError('--posthoc_snapshot_every_kimg must be >= 0 (0 = off)')
        for flag, low, high in (('ema_decays', 0., 1.), ('posthoc_sigma_rels', 0., 12 ** -.5)):
            try:
                values = parse_floats(getattr(self, flag))
            except ValueError:
                values = [-1.]
            if not all(low < v < high for v in values) or (flag == 'posthoc_sigma_rels'
                                                           and len(values) < 2):
                raise ConfigError(f'--{flag}={getattr(self, flag)} must be comma-separated '
                                  f'numbers in ({low:g}, {high:.4g})' + (
                                      ', at least two' if flag == 'posthoc_sigma_rels' else ''))

    @property
    def extra_ema_decays(self) -> tuple:
        """--ema_decays without duplicates and without the teacher's --ema_decay."""
        return tuple(d for d in dict.fromkeys(parse_floats(self.ema_decays)) if d != self.ema_decay)
