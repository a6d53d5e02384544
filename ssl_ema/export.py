"""Export a run's classifier, to be used without this package:

    python -m ssl_ema.export --train_dir=DIR [--model=ema|raw] [--checkpoint=ckpt-N] [--out=PATH]

The exported classifier takes uint8 images [N, H, W, C] in 0..255 (the dataset's shape),
standardises them inside with the run's per-channel mean and standard deviation (those of the
dataset's training images, as in training), runs the backbone in inference mode and returns class
probabilities [N, K] (softmax). OUT holds:

  model.keras    Keras 3 (`keras.saving.load_model`); stock Keras layers only, float32.
  saved_model/   TensorFlow SavedModel (`tf.saved_model.load`); signature `serving_default`
                 (and the function `serve`): images (uint8) -> {'probabilities': float32}.
  export.json    class names, image shape, normalisation, and which run, checkpoint and model.

Every run that ssl_ema.train finishes exports its EMA classifier to DIR/export/ this way; the
library behind it is ssl_ema/core/classifier.py.
"""
import dataclasses
from typing import Optional


from ssl_ema import cli
from ssl_ema.base.hparams import hparam
from ssl_ema.core import classifier


@dataclasses.dataclass
class ExportConfig:
    train_dir: Optional[str] = hparam(None, 'Run directory of ssl_ema.train to export.')
    model: str = hparam('ema', 'Which weights: ema (the EMA classifier) or raw (the student\'s '
                        'own weights).')
    checkpoint: Optional[str] = hparam(None, 'Checkpoint to export, e.g. ckpt-400 (in '
                                       'TRAIN_DIR/checkpoints) or a path prefix; default: the '
                                       'latest.')
    out: Optional[str] = hparam(None, 'Export directory. Default: TRAIN_DIR/export for '
                                '--model=ema, TRAIN_DIR/export_raw for raw, with _<checkpoint> '
                                'appended when --checkpoint is given.')

    def __post_init__(self):
        classifier.check_model(self.model)


def main(cfg: ExportConfig):
    classifier.export_run(cfg.train_dir, cfg.model, cfg.checkpoint, cfg.out)


if __name__ == '__main__':
    cli.run(main, ExportConfig)
