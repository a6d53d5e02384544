"""Print or export a label split, so two tools can be compared on identical labeled images.

    python -m ssl_ema.data.export_split --dataset=cifar10 --labels=250 --seed=1 --out=split.json

The JSON holds the flags that chose the split (dataset, num_labeled, num_valid, seed) and the indices (into the dataset's training part,
in its official order) of the labeled, validation and unlabeled images, the same layout as the
`split.json` a training run writes. Without --out it prints the JSON to stdout. The protocol
flags (--labeled_head, --known_classes, ...: docs/datasets.md) give the same split as training.
"""
import dataclasses
import json
import sys

import numpy as np
from absl import app, flags

from ssl_ema.base.config import TrainConfig
from ssl_ema.base.errors import ConfigError, DataError
from ssl_ema.data.datasets import load
from ssl_ema.data.splits import Protocol, protocol_split
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
# The protocol's split flags (long tail, known classes), as ssl_ema.train defines them.
_PROTOCOL = [f.name for f in dataclasses.fields(Protocol)]
for _field in dataclasses.fields(TrainConfig):
    if _field.name in _PROTOCOL:
        {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}[
            type(_field.default)](_field.name, _field.default, _field.metadata['help'])
FLAGS = flags.FLAGS


def split_record(dataset, data_dir, labels, valid, seed, protocol: Protocol = None) -> dict:
    arrays = load(dataset, data_dir)
    split = protocol_split(arrays.y_train, labels, valid, seed, arrays.num_classes, protocol,
                           arrays.x_extra)
    per_class = np.bincount(arrays.y_train[split.labeled], minlength=arrays.num_classes)
    # as_dict() already uses 'labeled'/'valid' for the index lists; the flags get num_ names.
    return dict(dataset=dataset, num_labeled=labels, num_valid=valid, seed=seed,
                train_size=len(arrays.y_train), labeled_per_class=per_class.tolist(),
                **split.as_dict())


def main(argv):
    del argv
    try:
        record = split_record(FLAGS.dataset, FLAGS.data_dir, FLAGS.labels, FLAGS.valid, FLAGS.seed,
                              Protocol(**{name: FLAGS[name].value for name in _PROTOCOL}))
    except (DataError, ConfigError) as e:
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
