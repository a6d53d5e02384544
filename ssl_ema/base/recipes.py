"""Named recipes (`--recipe`): the defaults a training run starts from, measured for a budget.

A recipe is a set of flag values (training settings, the algorithm, the algorithm's
hyperparameters) and the self-training rounds that follow the run (core/distilling.py). Flags the
user gives always win: a recipe only changes what would otherwise be a default. `none` is the
toolkit's defaults as they have always been; `auto` (the default of --recipe) picks by dataset:
the measured recipe (`DEFAULT`) where it was validated (Fashion-MNIST), `none` everywhere else
(digits, the public benchmarks and their published protocols, and a user's own data, npz:,
folder:, arrays: on the second dataset built to validate it, drawn shapes, the recipe fell below
supervised, runs/RECIPE.md section 10).
Every value names its source: runs/RECIPE.md is the study that chose it.
"""
import dataclasses
from typing import Mapping, Tuple

from ssl_ema.base.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    settings: Mapping[str, object] = dataclasses.field(default_factory=dict)
    # Self-training rounds after the run, each its settings (training flags and ssl_ema.distill's;
    # each round trains --self_training_kimg); none for --algorithm=supervised, which never reads
    # the unlabeled images.
    rounds: Tuple[Mapping[str, object], ...] = ()
    # Settings that hold only together: a flag the user gives from one group keeps the recipe
    # from setting any other of that group (e.g. the student may skip the weak view only because
    # the recipe's EMA labels it: with --teacher given, student_weak_pass keeps its default).
    together: Tuple[Tuple[str, ...], ...] = ()


RECIPES = {r.name: r for r in (
    Recipe('none', 'the toolkit\'s defaults (every run made before recipes existed)'),
    Recipe('budget', 'Fashion-MNIST-sized data at 250 labels within an hour of CPU: FixMatch '
           'with its EMA as the teacher, for as many steps as the budget buys (runs/RECIPE.md: '
           'the study behind every value)', {
               'algorithm': 'fixmatch',          # RECIPE.md, "algorithms"
               'arch': 'small_cnn',
               'teacher': 'ema',                 # RECIPE.md, "teacher": the EMA labels better
               'confidence_threshold': 0.8,      # RECIPE.md, "thresholds"
               'lr_decay': 'cosine_to_zero',     # RECIPE.md, "schedule"
               # RECIPE.md, "steps, not images": the short run is bound by its steps (all
               # labels: 81% at 16 kimg, 84.6% at 32), so fewer unlabeled images per step
               'uratio': 2,
               'train_kimg': 128.,
               'eval_every_kimg': 8.,            # evaluations cost CPU: 4.5 CPU-s each here
               # RECIPE.md, "self-training": a 64-kimg round on the teacher's soft labels ties
               # with the teacher (valid +1.5 within its noise, test -0.2) at +45% CPU: off;
               # --self_training_kimg=64 adds it.
               'self_training_kimg': 0.,
           }, rounds=({'pseudo_labels': 'soft'},)),
)}
# The hour's recipe: budget's, for the steps an hour of CPU buys. Its student leaves out the weak
# view the EMA labels (RECIPE.md section 4, "The hour": -0.1 point at the same length for 0.75x
# the CPU), which pays for 3.5x budget's steps in about 2.6x its CPU.
RECIPES['hour'] = Recipe(
    'hour', 'Fashion-MNIST-sized data at 250 labels in an hour of CPU: budget\'s recipe, its '
    'student without the weak view the EMA labels, for 3.5x the steps (runs/RECIPE.md)',
    {**RECIPES['budget'].settings,
     'student_weak_pass': False,           # RECIPE.md section 4: 0.75x the CPU, a tie
     'train_kimg': 448.,                   # RECIPE.md section 4: length still pays
     'eval_every_kimg': 16.},
    RECIPES['budget'].rounds, together=(('teacher', 'student_weak_pass'),))
# The hour where bfloat16 is native (an AVX512_BF16 or AMX CPU, an A100-class GPU): a step costs
# ~0.6x float32's there (RECIPE.md sections 4-5), so the hour buys twice hour's steps.
RECIPES['hour_bf16'] = Recipe(
    'hour_bf16', 'hour\'s recipe in mixed bfloat16 for twice its steps, where bfloat16 is native '
    '(runs/RECIPE.md section 5)',
    {**RECIPES['hour'].settings,
     'precision': 'mixed_bfloat16',        # RECIPE.md section 5: ~0.6x float32's CPU a step
     'train_kimg': 896.,                   # RECIPE.md section 5: length still pays
     'eval_every_kimg': 32.},              # as many evaluations as hour makes
    RECIPES['hour'].rounds, together=RECIPES['hour'].together)
# The hour on a CPU whose float32 is no wider than AVX2 (no AVX-512): a step costs ~2.5x an
# AVX-512 CPU's there (RECIPE.md section 6), so hour's 448 kimg would take ~8,000 CPU-s.
RECIPES['hour_avx2'] = Recipe(
    'hour_avx2', 'hour\'s recipe for the steps an hour of CPU buys where float32 is no wider '
    'than AVX2 (runs/RECIPE.md section 7)',
    {**RECIPES['hour'].settings,
     'uratio': 1,                          # RECIPE.md section 7: at equal CPU, a tie or better
     'train_kimg': 320.,                   # RECIPE.md section 7: 3,221 CPU-s, 83.47% (seeds 1-3)
     'eval_every_kimg': 32.},
    RECIPES['hour'].rounds, together=RECIPES['hour'].together)
# hour_avx2 with augmentation fit for the data: what an augmentation uncovers takes each image's
# border colour (black on Fashion-MNIST, not grey or a reflected sleeve), and the 25 labels a
# class are strongly augmented too (RECIPE.md section 8: each alone ties; together +0.75 valid,
# +2.05 test over seeds 1-2 at equal CPU; at full length, section 11).
RECIPES['hour_avx2_edge'] = Recipe(
    'hour_avx2_edge', 'hour_avx2 with augmentation fit for the data: edge fills, the labeled '
    'batch strongly augmented (runs/RECIPE.md sections 8 and 11)',
    {**RECIPES['hour_avx2'].settings,
     'augment_fill': 'edge',               # RECIPE.md section 8
     'labeled_augment': 'strong'},         # RECIPE.md section 8: only with edge fills
    RECIPES['hour'].rounds,
    together=RECIPES['hour'].together + (('augment_fill', 'labeled_augment'),))
# The AVX2 hour on a network that spends a third less at full resolution: the same settings for
# the 1.5x more steps its cheaper step buys in the same CPU (RECIPE.md section 14).
RECIPES['hour_avx2_lite'] = Recipe(
    'hour_avx2_lite', 'hour_avx2_edge on small_cnn_lite (one convolution at full resolution, '
    '1.5x the steps a CPU-second) for 1.5x its steps (runs/RECIPE.md section 14)',
    {**RECIPES['hour_avx2_edge'].settings,
     'arch': 'small_cnn_lite',             # RECIPE.md section 14: 0.65x small_cnn's CPU a step
     'train_kimg': 480.},                  # RECIPE.md section 14: the same CPU as 320 kimg
    RECIPES['hour'].rounds, together=RECIPES['hour_avx2_edge'].together)
# What auto picks where a recipe was measured: by whether the run computes bfloat16 natively,
# else whether its float32 is no wider than AVX2.
DEFAULT, DEFAULT_BFLOAT16, DEFAULT_AVX2 = 'hour', 'hour_bf16', 'hour_avx2_lite'
AUTO = 'auto'
NAMES = (AUTO,) + tuple(RECIPES)


def own_data(dataset: str) -> bool:
    """Where `auto` picks the measured recipe: Fashion-MNIST only (a user's own images, npz:,
    folder:, arrays, once a dataset other than Fashion-MNIST validates it: runs/RECIPE.md
    section 10)."""
    return dataset == 'fashion_mnist'


def resolve(name: str, dataset: str, bfloat16: bool = False, avx2: bool = False) -> Recipe:
    """The recipe `--recipe=name` means for `dataset`, `bfloat16`: whether the run computes
    in bfloat16 natively (auto then takes DEFAULT_BFLOAT16), `avx2`: whether its float32 is no
    wider than AVX2 (DEFAULT_AVX2, unless bfloat16); ConfigError for an unknown name."""
    if name == AUTO:
        name = ((DEFAULT_BFLOAT16 if bfloat16 else DEFAULT_AVX2 if avx2 else DEFAULT)
                if own_data(dataset) else 'none')
    if name not in RECIPES:
        raise ConfigError(f'--recipe={name} is unknown; valid: {", ".join(NAMES)}')
    return RECIPES[name]


def defaults(recipe: Recipe, algorithm: str, explicit, config_fields, algorithm_fields):
    """(algorithm, training settings, algorithm hyperparameters) of a run under `recipe`: the
    recipe's values for every flag not in `explicit` (the flags the user gave; `algorithm` is the
    configured one, kept if the user gave it); hyperparameters only where the chosen algorithm
    has them (`algorithm_fields(name)`: its field names)."""
    if 'algorithm' not in explicit:
        algorithm = recipe.settings.get('algorithm', algorithm)
    held = set(explicit)
    for group in recipe.together:
        if held & set(group):
            held |= set(group)
    settings = {k: v for k, v in recipe.settings.items() if k not in held and k != 'algorithm'}
    own = set(algorithm_fields(algorithm))
    return (algorithm, {k: v for k, v in settings.items() if k in config_fields},
            {k: v for k, v in settings.items() if k in own})
