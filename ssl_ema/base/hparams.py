"""Hyperparameters declared once, as dataclass fields, and exposed as absl flags.

A field's metadata carries its help string; `define_flags` turns the fields into flags and
`from_flags` builds the dataclass back from parsed flags. The training loop's settings
(`TrainConfig`) and every algorithm's own hyperparameters use the same mechanism, so a
hyperparameter is written in exactly one place.
"""
import dataclasses
import sys
import typing
from typing import Optional

from absl import flags

from ssl_ema.base.errors import ConfigError



def hparam(default, help: str, run_defining: bool = True):
    """A dataclass field that becomes a flag. `run_defining=False` marks settings that may change
    when a run resumes (paths, logging cadence, devices) and the training length, which is
    compared as a number of steps (--train_kimg and --train_steps can give the same one)."""
    return dataclasses.field(default=default, metadata={'help': help, 'run_defining': run_defining})


def _base_type(tp):
    if typing.get_origin(tp) is typing.Union:   # Optional[X]
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
           float: flags.DEFINE_float, str: flags.DEFINE_string}


def define_flags(cls, module_name: str, defaults_override: Optional[dict] = None,
                 help_suffix: Optional[dict] = None):
    """Define one absl flag per field of dataclass `cls` (skipping flags already defined)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in flags.FLAGS:
            continue
        default = (defaults_override or {}).get(f.name, f.default)
        help_text = f.metadata.get('help', '') + (help_suffix or {}).get(f.name, '')
        _DEFINE[_base_type(hints[f.name])](f.name, default, help_text, module_name=module_name)


def from_flags(cls, **overrides):
    """Instantiate `cls` from parsed flags; flags left at None keep the field's default."""
    values = {}
    for f in dataclasses.fields(cls):
        if not flags.FLAGS.is_parsed():   # used as a library: defaults and overrides only
            break
        if f.name in flags.FLAGS and flags.FLAGS[f.name].value is not None:
            values[f.name] = flags.FLAGS[f.name].value
    values.update(overrides)
    return cls(**values)


def given_flags() -> set:
    """The names of the flags given on the command line or in a flagfile (none if the flags are
    not parsed: the library used from Python)."""
    if not flags.FLAGS.is_parsed():
        return set()
    return {name for name in flags.FLAGS if flags.FLAGS[name].present}


def parse_flags(argv):
    """absl's flag parsing for `app.run(main, flags_parser=parse_flags)`: a bad flag (unknown name,
    wrong type) exits with one `error:` line, like every other bad input, not absl's two."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f'error: {" ".join(str(e).split())} (--helpfull lists every flag)')


def run_defining(obj) -> dict:
    """The fields of a config dataclass that define a run (what a resumed run must match)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
            if f.metadata.get('run_defining', True)}


def total_steps(train_kimg: float, train_steps: int, batch: int) -> int:
    """Training length in steps: --train_steps if > 0, else --train_kimg in steps of `batch`."""
    return train_steps or max(1, round(train_kimg * 1024 / batch))


def parse_floats(text: str) -> list:
    """'0.99, 0.9999' -> [0.99, 0.9999]; '' -> []. ValueError on anything else."""
    return [float(v) for v in text.split(',') if v.strip()]


def check_values(config, choices: dict, positive_ints=(), positive=()) -> None:
    """ConfigError naming the flag if a field of `config` is not one of its `choices` (name ->
    valid values), or not a positive integer / a positive number."""
    for name, valid in choices.items():
        if getattr(config, name) not in valid:
            raise ConfigError(f'--{name}={getattr(config, name)} is unknown; valid: '
                              f'{", ".join(valid)}')
    for name in positive_ints:
        if getattr(config, name) <= 0:
            raise ConfigError(f'--{name}={getattr(config, name)} must be a positive integer')
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f'--{name}={getattr(config, name)} must be positive')


class Length:
    """A config's training length and evaluation cadence in steps, from its --train_kimg,
    --train_steps, --eval_every_kimg and --batch (kimg = 1024 labeled images, as the anchors)."""

    @property
    def total_steps(self) -> int:
        return total_steps(self.train_kimg, self.train_steps, self.batch)

    @property
    def eval_every_steps(self) -> int:
        return max(1, round(self.eval_every_kimg * 1024 / self.batch))
