"""The toolkit's three errors. Each message is one line naming the flag, file, step or process
at fault and what would be valid; a command prints it as `error: <message>` and exits non-zero,
the Python API raises it as it is."""


class ConfigError(ValueError):
    """Bad flag or argument value."""


class DataError(ValueError):
    """Bad data input (a dataset, file or folder)."""


class RunError(RuntimeError):
    """A run cannot go on safely (a full disk, a non-finite loss): said after everything on disk
    was left as it was before."""


def one_line(error: Exception) -> str:
    """An exception's type and the first line of its message, for one-line error messages."""
    lines = str(error).splitlines()
    return f'{type(error).__name__}: {lines[0]}' if lines else type(error).__name__
