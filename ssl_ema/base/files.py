"""Writing files that a reader, a crash or a `kill` never sees half-written, and one writer per
run directory.

Every file a run or a benchmark leaves behind (flags.json, flagfile, split.json,
evaluations.jsonl, accuracy.json, results.csv, results.md, curves.png, dataset caches) goes
through `write_atomically`: another process may read it at any moment (the benchmark polls
accuracy.json while training runs), and a run is resumed from whatever is on disk.
"""
import errno
import fcntl
import json
import os
import pathlib
import shutil
import socket
import sys
import tempfile
from typing import Callable, IO, Optional

from ssl_ema.base.errors import ConfigError

LOCK = '.lock'


def write_atomically(path, write: Callable, mode: str = 'wb', newline=None) -> None:
    """write(file) into a temporary file beside `path`, flushed to disk, then renamed to `path`
    (os.replace is atomic within a directory): `path` holds the old content or the new, never a
    part, and a failed write leaves nothing behind. Missing parent directories are created."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, mode, newline=newline) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())   # the data is on disk before the name points at it
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes the file private; this is ordinary data
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:   # name the file, not the temporary
            raise OSError(e.errno, e.strerror, str(path)) from None   # (same OSError subclass)
        raise


def write_json(path, obj) -> None:
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True) + '\n'),
                     mode='w')


def write_directory_atomically(path, write: Callable) -> None:
    """write(directory) into a temporary directory beside `path`, then renamed to `path` (an
    exported model: model.keras, saved_model/, export.json). A reader sees the old directory or
    the new one, never a mix (between the two renames that swap them, briefly neither); a failed
    write leaves the old one as it was."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes it private; this is ordinary data
        if path.exists():
            old = tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.old')
            os.replace(path, os.path.join(old, 'replaced'))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_writable_dir(path: str, flag: str) -> None:
    """ConfigError naming --flag unless `path` is, or can be created as, a directory to write in:
    checked before training, not at the first checkpoint. Creates nothing."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), existing)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f'--{flag}={path} cannot be written: {e.strerror} ({existing})') from None


def lock_run_dir(path: str) -> Optional[IO]:
    """Take the run directory `path` for this process (creating it): ConfigError naming the
    process that holds it. The lock is fcntl.flock on `path`/.lock, which the kernel releases when
    its holder exits or is killed, so a crashed run never blocks its resume; the file only says
    who holds it. Close the returned file to release the lock. Filesystems without locks get a
    warning and no lock (None)."""
    os.makedirs(path, exist_ok=True)
    lock_path = os.path.join(path, LOCK)
    try:   # never O_TRUNC: that would erase the holder's name
        lock_file = os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666), 'r+')
    except OSError as e:
        raise ConfigError(f'--train_dir={path} cannot be written: {e.strerror} ({lock_path})'
                          ) from None
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_file.read().strip() or 'another process'
        lock_file.close()
        raise ConfigError(f'--train_dir={path} is being trained by {holder}; wait for it to '
                          f'finish (or stop it), or use another --train_dir') from None
    except OSError as e:   # e.g. ENOLCK on some network filesystems
        lock_file.close()
        print(f'warning: cannot lock {lock_path} ({e.strerror}): make sure no other process '
              f'trains in {path}', file=sys.stderr)
        return None
    try:
        lock_file.truncate(0)
        lock_file.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
        lock_file.flush()
    except OSError:   # a full disk: the lock holds all the same, only unnamed
        pass
    return lock_file
