"""Multi-worker training (`--distribute=multi_worker`): the cluster, a lost worker, a preemption.

tf.distribute.MultiWorkerMirroredStrategy runs one process per worker (each with its GPUs, or its
CPU); they all-reduce gradients and batch-norm statistics at every step, so they stay in lockstep
and hold identical weights, EMA and algorithm state. Worker 0 (the chief) alone evaluates and
writes the run directory (core/engine.py, core/records.py). What can go wrong between processes
is handled here:
- a worker dies: TensorFlow aborts the collectives of the others (its coordination service or a
  failed all-reduce notices within seconds; a hung worker is caught by --collective_timeout_s),
  and each exits with one line naming the lost worker. Restarting every worker with the same
  command resumes from the chief's last checkpoint.
- the job is preempted (SIGTERM to any worker): tf.distribute.experimental.
  PreemptionCheckpointHandler agrees on a step with all workers, the chief saves a checkpoint
  there, and all of them stop.
"""
import os
import re

import keras
import tensorflow as tf

from ssl_ema.base.errors import ConfigError, one_line


def strategy(collective_timeout_s: float = 0.):
    """MultiWorkerMirroredStrategy over the cluster that $TF_CONFIG describes (`python -m
    ssl_ema.launch` writes one per worker), else SLURM's (every task of an `srun` is a worker,
    task 0 the chief). Must be called before TensorFlow initialises."""
    resolvers = tf.distribute.cluster_resolver
    source = '$TF_CONFIG' if os.environ.get('TF_CONFIG') else 'the SLURM environment'
    try:
        if os.environ.get('TF_CONFIG'):
            resolver = resolvers.TFConfigClusterResolver()
            resolver.cluster_spec()   # parses $TF_CONFIG now, to name it if it is malformed
        elif 'SLURM_PROCID' in os.environ:
            resolver = resolvers.SlurmClusterResolver()
        else:
            raise ConfigError('--distribute=multi_worker needs a cluster: $TF_CONFIG (as python '
                              '-m ssl_ema.launch --workers=N sets it) or a SLURM job step (srun)')
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=collective_timeout_s or None)
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                         communication_options=options)
    except (ValueError, KeyError, RuntimeError) as e:   # bad JSON, missing SLURM variables
        raise ConfigError(f'--distribute=multi_worker: {source} does not describe a cluster '
                          f'({one_line(e)})') from None


def lost_worker(error: tf.errors.OpError, collective_timeout_s: float) -> str:
    """One line for a step that failed because another worker died or hung."""
    task = re.search(r'/job:(\w+)/replica:\d+/task:(\d+)', error.message)
    if task:
        lost = f'lost {task[1]} {task[2]}'
    elif isinstance(error, tf.errors.DeadlineExceededError):
        lost = (f'a collective did not complete within --collective_timeout_s='
                f'{collective_timeout_s:g}: a worker is lost or hung')
    else:
        lost = 'lost a worker'
    reason = re.search(r'(?:aborted by|grpc_message): ?"?([^"\n]+)', error.message)
    reason = f'{type(error).__name__}' + (f': {reason[1].strip()}' if reason else '')
    return (f'{lost} ({reason}); restart every worker with the same command to resume from the '
            'last checkpoint')


class Preempted(KeyboardInterrupt):
    """Every worker saved (the chief into the run directory) at the same step and stops."""


def preemption_handler(strategy, save, scratch_dir: str):
    """A PreemptionCheckpointHandler that calls `save()` on every worker at a step they agree on
    once any of them gets a SIGTERM, then raises Preempted. The handler's own bookkeeping (a run
    counter) lives in `scratch_dir`, outside the run directory; the run's checkpoints are ours,
    so every worker starts counting from zero whatever checkpoint it resumed from."""
    def stop():
        raise Preempted

    config = tf.distribute.experimental.TerminationConfig(exit_fn=stop, save_fn=save)
    return tf.distribute.experimental.PreemptionCheckpointHandler(
        strategy.cluster_resolver, tf.train.Checkpoint(), os.path.join(scratch_dir, 'preemption'),
        config)


def make_strategy(cfg):
    """The tf.distribute strategy of --distribute (and --cpu_devices, --collective_timeout_s)."""
    if cfg.distribute == 'default':
        return tf.distribute.get_strategy()
    if cfg.distribute == 'multi_worker':
        return strategy(cfg.collective_timeout_s)
    if tf.config.list_physical_devices('GPU'):
        return tf.distribute.MirroredStrategy()
    cpu = tf.config.list_physical_devices('CPU')[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) < cfg.cpu_devices:
        try:   # possible only before TensorFlow initialises its devices, hence run() starts here
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.cpu_devices)
        except RuntimeError:
            raise ConfigError(f'--cpu_devices={cfg.cpu_devices} must be set before TensorFlow '
                              'starts (as from the command line)') from None
    return tf.distribute.MirroredStrategy([f'/cpu:{i}' for i in range(cfg.cpu_devices)])


def update_every_copy(strategy, variable, fn, *args) -> None:
    """`fn(copy, *args)` on every device's copy of a mirrored `variable`, each with its own
    device's copy of any mirrored `args` (tf.distribute's `extended.update`, as Keras' optimizer
    applies its updates): each replica moves its own copy from its own weights, which are
    identical on every replica, so nothing is computed once and broadcast. Called in
    cross-replica context; on one device it is `fn(variable, *args)`. Keras variables are
    unwrapped to their tf.Variable (the mirrored one under a strategy)."""
    def unwrap(v):
        return v.value if isinstance(v, keras.Variable) else v
    strategy.extended.update(unwrap(variable), fn, args=tuple(unwrap(a) for a in args),
                             group=False)
