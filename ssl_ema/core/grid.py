"""A benchmark's grid: every (algorithm, label count, seed) run planned and checked before
anything trains, then trained one process each (`python -m ssl_ema.train`), `jobs` at a time,
resuming what was started and leaving alone what is done. The results: core/report.py."""
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

from ssl_ema.algorithms import ALGORITHMS, create
from ssl_ema.base import hparams
from ssl_ema.base.config import TrainConfig
from ssl_ema.base.errors import ConfigError
from ssl_ema.base.machine import process_environments, visible_gpus
from ssl_ema.core import fitting, run_dir


@dataclasses.dataclass
class GridRun:
    cfg: TrainConfig      # arch resolved, train_dir set
    algorithm: object
    name: str             # <dataset>.<labels>@<seed>/<run directory>, relative to OUT/runs
    status: str           # 'new', 'resume' or 'done'
    step: int = 0         # step it resumes from (the latest checkpoint's) or has reached



def run_status(train_dir: str, total_steps: int):
    """('done', step) if the run in train_dir reached total_steps, ('resume', step) if it started,
    ('new', 0) otherwise; step is that of its last evaluation, or for a run to resume that of its
    latest checkpoint (an interrupted run saves one past its last evaluation). A run with
    self-training rounds is done when they are (run_dir.finished)."""
    step = (run_dir.read_summary(train_dir) or {}).get('step', 0)
    if run_dir.finished(train_dir):
        return 'done', step
    if os.path.exists(os.path.join(train_dir, run_dir.RECORD)):
        return 'resume', max(step, run_dir.checkpoint_step(train_dir))
    return 'new', 0


def plan(algorithms, label_counts, seeds, out: str, settings: Optional[dict] = None,
         per_algorithm: Optional[Dict[str, dict]] = None) -> List[GridRun]:
    """Every run of the grid, checked before anything is trained or written.

    Values come from the parsed flags (when they are), then `settings` (flag name -> value),
    then `per_algorithm[name]`. A bad value raises ConfigError or DataError with one line.
    """
    from ssl_ema.nn import backbones
    from ssl_ema import data
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown or not algorithms:
        raise ConfigError(f'--algorithms={",".join(algorithms)}: {", ".join(unknown) or "empty"} '
                          f'is unknown; valid: {", ".join(sorted(ALGORITHMS))}')
    config_fields = TrainConfig.__dataclass_fields__
    checked = {}   # (dataset, labels, ...) -> image shape; (arch, shape) -> True
    runs = []
    for name in dict.fromkeys(algorithms):
        values = dict(settings or {}, **(per_algorithm or {}).get(name, {}))
        # --recipe's defaults where no flag was given, as ssl_ema.train applies them (the grid
        # names its algorithms: a recipe's own is not used).
        cfg = hparams.from_flags(TrainConfig, **{k: v for k, v in values.items()
                                                 if k in config_fields},
                                 algorithm=name, labels=label_counts[0], seed=seeds[0],
                                 train_dir=None)
        recipe, _, defaults, hyperparameters = fitting.recipe_defaults(
            cfg.recipe, cfg.dataset, name, hparams.given_flags() | set(values) | {'algorithm'},
            cfg.precision)
        values = dict(defaults, **hyperparameters, **values, recipe=recipe.name)
        own = ALGORITHMS[name].__dataclass_fields__
        algorithm = create(name, **{k: v for k, v in values.items() if k in own})
        for labels in label_counts:
            for seed in seeds:
                cfg = hparams.from_flags(
                    TrainConfig, **{k: v for k, v in values.items() if k in config_fields},
                    algorithm=name, labels=labels, seed=seed, train_dir=None)
                key = (cfg.dataset, cfg.labels, cfg.valid, cfg.augment, cfg.data_dir,
                       cfg.image_size, data.Protocol.of(cfg))
                if key not in checked:   # the split's errors do not depend on the seed
                    dataset = data.build(cfg.dataset, cfg.labels, cfg.valid, cfg.seed,
                                         cfg.augment, cfg.data_dir, image_size=cfg.image_size,
                                         protocol=data.Protocol.of(cfg))
                    checked[key] = (dataset.image_shape, dataset.num_classes)
                shape, num_classes = checked[key]
                arch = backbones.resolve(cfg.arch, shape)
                if (arch, shape) not in checked:
                    backbones.build(arch, shape, num_classes)   # unknown --arch fails here
                    checked[arch, shape] = True
                cfg = dataclasses.replace(cfg, arch=arch)
                run_name = os.path.relpath(run_dir.default_train_dir(cfg, algorithm, arch),
                                           run_dir.ROOT)
                cfg = dataclasses.replace(cfg, train_dir=os.path.join(out, 'runs', run_name))
                run_dir.check_compatible(cfg.train_dir, run_dir.run_record(cfg, algorithm))
                runs.append(GridRun(cfg, algorithm, run_name,
                                *run_status(cfg.train_dir, cfg.total_steps)))
    return runs


def train_command(run: GridRun) -> List[str]:
    """The `python -m ssl_ema.train` command of one run, every flag explicit."""
    args = []
    values = {**dataclasses.asdict(run.cfg), **dataclasses.asdict(run.algorithm)}
    for name, value in values.items():
        if isinstance(value, bool):
            args.append(f'--{name}' if value else f'--no{name}')
        elif value is not None:
            args.append(f'--{name}={value}')
    return [sys.executable, '-m', 'ssl_ema.train'] + args


def _ema_test(train_dir: str) -> str:
    summary = run_dir.read_summary(train_dir) or {}
    try:
        return (f'EMA test {summary["ema"]["test"]["median_last_20"]:.2f}% (median of last 20), '
                f'raw {summary["raw"]["test"]["median_last_20"]:.2f}%')
    except KeyError:
        return 'no evaluation yet'


def _last_line(path: str) -> str:
    with open(path, errors='replace') as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else '(no output)'


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C and SIGTERM held while a training is started and recorded, raised after it (as
    KeyboardInterrupt): one that lands inside Popen would leave a started training unrecorded,
    never stopped, to train to its end (seen: a grid interrupted as its second run started
    finished that run). Outside the main thread, where no handler can be set, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    before = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
              for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if caught:
        raise KeyboardInterrupt


def _say(line: str) -> None:
    """A progress line, out at once even into a pipe (`| tee`, a driver reading the lines)."""
    print(line, flush=True)


def run_grid(runs: List[GridRun], jobs: int = 1, log=_say, poll_seconds: float = 0.5,
             gpus: Optional[List[str]] = None) -> List[GridRun]:
    """Train every run that is not done, `jobs` processes at a time; return the runs that failed.

    Each run's output goes to <train_dir>/train.log. Ctrl-C or SIGTERM (KeyboardInterrupt here)
    sends SIGTERM to the running trainings, which save a checkpoint, and is re-raised. Each of
    the `jobs` slots has its own GPU of `gpus` (default: machine.visible_gpus(); round-robin,
    memory growth on), and a run takes the GPU of the slot it fills.
    """
    count = len(runs)
    pending = []
    for i, run in enumerate(runs, 1):
        if run.status == 'done':
            log(f'[{i}/{count}] done      {run.name}: finished earlier, not retrained; '
                f'{_ema_test(run.cfg.train_dir)}')
        else:
            pending.append((i, run))
    running, failed = {}, []
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get('TF_CPP_MIN_LOG_LEVEL', '2'))
    slot_envs = process_environments(jobs, visible_gpus() if gpus is None else gpus, env)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i, run = pending.pop(0)
                slot = min(set(range(jobs)) - {r[4] for r in running.values()})
                os.makedirs(run.cfg.train_dir, exist_ok=True)
                log_path = os.path.join(run.cfg.train_dir, 'train.log')
                with open(log_path, 'a') as log_file, _interrupts_held():
                    command = train_command(run)
                    log_file.write(' '.join(command) + '\n')
                    log_file.flush()
                    # Own session: a Ctrl-C reaches only this process, which forwards one SIGTERM.
                    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                               env=slot_envs[slot], start_new_session=True)
                    running[process] = (i, run, time.time(), log_path, slot)
                what = (f'resume    {run.name} from step {run.step}/{run.cfg.total_steps}'
                        if run.status == 'resume' else
                        f'train     {run.name} ({run.cfg.total_steps} steps)')
                log(f'[{i}/{count}] {what}; log: {log_path}')
            time.sleep(poll_seconds)
            for process in list(running):
                if process.poll() is None:
                    continue
                i, run, start, log_path, _ = running.pop(process)
                status, _ = run_status(run.cfg.train_dir, run.cfg.total_steps)
                if process.returncode == 0 and status == 'done':
                    log(f'[{i}/{count}] finished  {run.name} in {time.time() - start:.0f} s: '
                        f'{_ema_test(run.cfg.train_dir)}')
                else:
                    failed.append(run)
                    log(f'[{i}/{count}] FAILED    {run.name} (exit {process.returncode}): '
                        f'{_last_line(log_path)}; log: {log_path}')
    except KeyboardInterrupt:
        for process in running:
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                process.kill()
        log(f'Interrupted: {len(running)} running training(s) saved a checkpoint; run the same '
            'command again to resume the grid.')
        raise
    return failed
