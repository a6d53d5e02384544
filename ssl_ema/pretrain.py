"""Self-supervised pretraining of a backbone on a dataset's images, without their labels:
`python -m ssl_ema.pretrain --method=byol|dino --dataset=... [--arch=...]`.

BYOL or DINO with an EMA teacher (algorithms/pretraining/, the loop in core/pretraining.py); the
weighted k-NN accuracy of the student's and the teacher's backbone, with the labeled split as
memory, is logged from the random initialisation on. The run ends by writing
TRAIN_DIR/backbone.keras (stock Keras layers, pixels -> pooled features), which
`python -m ssl_ema.train --arch=keras:TRAIN_DIR/backbone.keras` fine-tunes. `--helpfull` lists
every flag, each method's under its own module.
"""
from ssl_ema import cli
from ssl_ema.algorithms import pretraining
from ssl_ema.base.pretraining_config import PretrainConfig
from ssl_ema.core import pretraining as pretraining_lib


def main(cfg: PretrainConfig):
    pretraining_lib.pretrain(cfg, pretraining.create(cfg.method))


if __name__ == '__main__':
    cli.run(main, PretrainConfig)
