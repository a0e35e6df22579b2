"""The command line's one error boundary: a user's mistake is one line, an internal error is one line and a log.

A mistake in what the user gave (a path, a file's contents, a config field, a flag, a port, a device,
a full disk) prints `error: <what, where, what to do>` and exits 2; the message comes from the code
that found the problem, which knows the file, line or field. Anything else is a bug of ours: the
terminal gets one line naming a log file that holds the traceback (as pip does), and exit code 1.
`--debug` shows tracebacks instead.
"""

from __future__ import annotations

import errno
import os
import pickle
import sys
import tempfile
import time
import traceback
from pathlib import Path

import yaml
from safetensors import SafetensorError

#: OSErrors that are about the user's environment, with what to do about them.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free some disk space (or point the output elsewhere) and run again",
    errno.EDQUOT: "free some disk quota and run again",
    errno.EACCES: "check the file's permissions",
    errno.EPERM: "check the file's permissions",
    errno.EROFS: "write to a writable folder",
    errno.EADDRINUSE: "choose another port with --port, or stop the program using it",
    errno.EADDRNOTAVAIL: "use an address of this machine with --host",
}
#: Exception types that mean "the input is wrong": their message already says what and where.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # includes JSON and Unicode decoding errors, pydantic and huggingface_hub validation
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    KeyError,
    yaml.YAMLError,
    SafetensorError,
    pickle.UnpicklingError,
)


def user_message(error: BaseException) -> str | None:
    """The one-line message for a user's mistake, or None when `error` is not one."""
    if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or error}{where}: {_ENVIRONMENT_ERRNOS[error.errno]}"
    if isinstance(error, ValueError):  # our own messages (some also subclass a library error) say it all
        return _one_line(error)
    if isinstance(error, SafetensorError):
        return f"not a readable safetensors file ({error}); the file is truncated or not safetensors"
    if isinstance(error, pickle.UnpicklingError):
        return f"refused to load a pickle that would run code or is damaged ({_first_line(error)})"
    if isinstance(error, _USER_ERRORS):
        return str(error.args[0]) if isinstance(error, KeyError) and error.args else _one_line(error)
    return None


def _one_line(error: BaseException) -> str:
    """The message on one line (YAML and pydantic put the line, column or field on later lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = lines[0]
    for line in lines[1:]:  # a list under a heading ("skipped 3 bad sample(s):") reads as items: "a; b; c"
        text += (" " if text.endswith((":", "(")) else "; ") + line
    return text


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def log_directories() -> list[Path]:
    """Where internal-error logs go: `$XDG_CACHE_HOME/mmadapter/logs` (default `~/.cache/...`), else the
    system's temporary folder."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return [Path(cache) / "mmadapter" / "logs", Path(tempfile.gettempdir())]


def write_crash_log(error: BaseException, argv: list[str]) -> Path | None:
    """Write the traceback of an internal error to a new log file; its path, or None if nothing is writable."""
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    name = f"mmadapter-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for directory in log_directories():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(f"mmadapter {' '.join(argv)}\n\n" + "".join(lines))
        except OSError:
            continue
        return directory / name
    return None


def report(error: BaseException, argv: list[str]) -> int:
    """Print what went wrong in one line (to stderr) and return the exit code."""
    message = user_message(error)
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        return 2
    log = write_crash_log(error, argv)
    where = f"the traceback is in {log}" if log else "no folder was writable for a log"
    print(
        f"mmadapter: internal error ({type(error).__name__}: {_first_line(error)}); {where}. "
        "Please report it with that file; --debug shows the traceback here.",
        file=sys.stderr,
    )
    return 1
