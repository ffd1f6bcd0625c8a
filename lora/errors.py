"""The project's errors and their exit codes: the bottom of the package, importing nothing of it.

The command line prints an error as one line and exits with its code: 0 done, 1 a write failed
(``OSError``), 2 bad input, 3 training diverged, 4 an unexpected error (a bug: ``--debug`` shows the
traceback), 130 interrupted. Input errors are also ``ValueError`` s, so library callers can catch them as such.
"""

from __future__ import annotations

import difflib
import errno
import signal
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DivergenceError",
    "Interrupted",
    "LoRAError",
    "did_you_mean",
    "exit_code",
    "exit_on_signals",
    "first_line",
    "guarded",
    "one_line",
    "quote",
    "shorten",
]


class LoRAError(Exception):
    """A problem the user can fix: reported as one line, exit code ``exit_code`` (2: bad input)."""

    exit_code = 2


class ConfigError(LoRAError, ValueError):
    """A bad configuration value, key, option or file."""


class DataError(LoRAError, ValueError):
    """Unusable data: the message names the file, the line and what was expected."""


class CheckpointError(LoRAError, ValueError):
    """A missing, truncated, corrupted or mismatched checkpoint."""


class DivergenceError(LoRAError):
    """A non-finite loss or gradient: training stopped."""

    exit_code = 3


class Interrupted(Exception):  # noqa: N818 - a control signal, not an error
    """SIGINT / SIGTERM stopped training after a step; ``checkpoint`` is what was written (or ``None``)."""

    exit_code = 130

    def __init__(self, checkpoint: Path | None) -> None:
        super().__init__("interrupted")
        self.checkpoint = checkpoint


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to ``word``, or ``""`` if none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def quote(value: object, limit: int = 60) -> str:
    """``repr(value)``, shortened to about ``limit`` characters: a message never echoes megabytes back."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 20]}...{text[-8:]} ({len(text):,} characters)"


_BAD_PATH = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.ENOENT, errno.EINVAL, errno.ELOOP}
MAX_LINE = 400  # characters of an error line; longer ones are cut in the middle


def exit_code(e: BaseException) -> int:
    """The command line's exit code for ``e`` (see the module docstring)."""
    if isinstance(e, (LoRAError, Interrupted)):
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return 130
    if isinstance(e, OSError):  # a path that cannot be one is bad input; a write that failed is not
        return 2 if e.errno in _BAD_PATH else 1
    if isinstance(e, (ValueError, MemoryError, RecursionError)):
        return 2
    return 4


def one_line(e: BaseException) -> str:
    """``e`` as the one line the command line prints after ``error: ``, at most ``MAX_LINE`` characters."""
    if isinstance(e, OSError) and e.strerror:
        line = f"{e.filename or 'I/O'}: {e.strerror}"
    elif isinstance(e, MemoryError):
        line = "out of memory: try a smaller model, batch or data"
    elif exit_code(e) == 4:
        line = f"unexpected {type(e).__name__}: {first_line(e)} (a bug: rerun with --debug for the traceback)"
    else:
        line = first_line(e)
    return shorten(line)


def shorten(line: str, limit: int = MAX_LINE) -> str:
    """``line`` cut in the middle to at most about ``limit`` characters, saying how long it was."""
    if len(line) <= limit:
        return line
    return f"{line[: limit - 80]} ... {line[-40:]} ({len(line):,} characters)"


def exit_on_signals() -> None:
    """Until a command line installs its own handlers: Ctrl-C or SIGTERM print one line and exit 130 at
    once (also while torch is still being imported, which takes a second or two)."""

    def stop(signum: int, frame: object) -> None:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stop)


def guarded(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run a command line's ``body`` and return its exit code; any error is one line on stderr,
    ``<prog>: error: ...`` (``error: ...`` for an empty ``prog``), with its code (``debug``: the
    traceback instead); Ctrl-C is 130. A warning is one line too, ``<prog>: warning: ...``."""
    prefix = f"{prog}: " if prog else ""

    def show(message: Warning | str, *_: object, **__: object) -> None:  # not the file, line and source
        print(f"{prefix}warning: {shorten(' '.join(str(message).split()))}", file=sys.stderr)

    try:
        with warnings.catch_warnings():  # each warning one line too (the traceback's detail with debug)
            if not debug:
                warnings.showwarning = show
            return body()
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"{prefix}error: {one_line(e)}", file=sys.stderr)
        return exit_code(e)
