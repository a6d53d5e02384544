"""A self-training round: `python -m ssl_ema.distill --teacher_run=RUN_DIR [--flags]`.

The teacher (a finished run of ssl_ema.train, or another round) labels the unlabeled pool once,
and a new student trains on the labels and those pseudo-labels (soft or hard, class-balanced with
--per_class), noised by --student_view, on the teacher's dataset and split; every training flag
applies to the student (--arch, --train_kimg, --lr, ...). The round's directory is by default
TEACHER/rounds/distill_<arch>[_<flags>] and rounds chain (core/distilling.py). From Python:
`ssl_ema.distill(run, **settings)`.
"""
from absl import flags

from ssl_ema import cli
from ssl_ema.algorithms.distillation import ROUNDS
from ssl_ema.base import hparams
from ssl_ema.base.config import TrainConfig
from ssl_ema.core import distilling

flags.DEFINE_string('teacher_run', None, 'The finished run directory whose classifier labels the '
                    'pool (ssl_ema.train\'s or ssl_ema.distill\'s).')


def main(cfg: TrainConfig):
    algorithm = hparams.from_flags(ROUNDS['distill'])
    distilling.distill(cfg, algorithm, flags.FLAGS.teacher_run, explicit=hparams.given_flags())


def _define_flags():
    cli.define_train_flags()
    hparams.define_flags(ROUNDS['distill'], __name__)


if __name__ == '__main__':
    cli.run(main, TrainConfig, setup=_define_flags)
