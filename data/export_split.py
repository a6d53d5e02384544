"""Print or export a label split, so two tools can be compared on identical labeled images.

    python -m ssl_ema.data.export_split --dataset=cifar10 --labels=250 --seed=1 --out=split.json

The JSON holds the flags that chose the split (dataset, num_labeled, num_valid, seed) and the indices (into the dataset's training part,
in its official order) of the labeled, validation and unlabeled images, the same layout as the
`split.json` a training run writes. Without --out it prints the JSON to stdout.
"""
import json
import sys

import numpy as np
from absl import app, flags

from ssl_ema.base.config import TrainConfig
from ssl_ema.base.errors import DataError
from ssl_ema.data.datasets import load
from ssl_ema.data.splits import make_split
from ssl_ema.base.files import write_atomically

# The defaults are ssl_ema.train's, so that the same flags export the split that training uses.
_TRAIN = TrainConfig()
flags.DEFINE_string('dataset', _TRAIN.dataset, 'Dataset name, as --dataset of ssl_ema.train.')
flags.DEFINE_string('data_dir', None, 'Where dataset files live (default: tfds\' data directory).')
flags.DEFINE_integer('labels', _TRAIN.labels, 'Labeled training images, class-balanced, chosen by '
                     '--seed.')
flags.DEFINE_integer('valid', _TRAIN.valid, 'Training images held out for validation (fixed for '
                     'every seed); the training run\'s --valid, which defaults to the same value.')
flags.DEFINE_integer('seed', _TRAIN.seed, 'Seed of the labeled subset.')
flags.DEFINE_string('out', None, 'Write the JSON here (atomically) instead of printing it.')
FLAGS = flags.FLAGS


def split_record(dataset, data_dir, labels, valid, seed) -> dict:
    arrays = load(dataset, data_dir)
    split = make_split(arrays.y_train, labels, valid, seed, arrays.num_classes)
    per_class = np.bincount(arrays.y_train[split.labeled], minlength=arrays.num_classes)
    # as_dict() already uses 'labeled'/'valid' for the index lists; the flags get num_ names.
    return dict(dataset=dataset, num_labeled=labels, num_valid=valid, seed=seed,
                train_size=len(arrays.y_train), labeled_per_class=per_class.tolist(),
                **split.as_dict())


def main(argv):
    del argv
    try:
        record = split_record(FLAGS.dataset, FLAGS.data_dir, FLAGS.labels, FLAGS.valid, FLAGS.seed)
    except DataError as e:
        sys.exit(f'error: {e}')
    text = json.dumps(record)
    if not FLAGS.out:
        print(text)
        return
    write_atomically(FLAGS.out, lambda f: f.write(text), mode='w')
    print(f'{FLAGS.out}: {len(record["labeled"])} labeled ({record["labeled_per_class"]} per class), '
          f'{len(record["valid"])} valid, {len(record["unlabeled"])} unlabeled of '
          f'{record["train_size"]}; labeled indices: {record["labeled"][:10]}'
          f'{" ..." if len(record["labeled"]) > 10 else ""}')


if __name__ == '__main__':
    app.run(main)
