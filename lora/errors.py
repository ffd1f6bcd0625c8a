"""The project's errors and their exit codes: the bottom of the package, importing nothing of it.

The command line prints an error as one line and exits with its code: 0 done, 1 a write failed
(``OSError``), 2 bad input, 3 training diverged, 4 an unexpected error (a bug: ``--debug`` shows the
traceback), 130 interrupted. Input errors are also ``ValueError`` s, so library callers can catch them as such.
"""

from __future__ import annotations

import difflib
import sys
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
    "first_line",
    "guarded",
    "one_line",
    "quote",
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


def exit_code(e: BaseException) -> int:
    """The command line's exit code for ``e`` (see the module docstring)."""
    if isinstance(e, (LoRAError, Interrupted)):
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return 130
    if isinstance(e, OSError):
        return 1
    if isinstance(e, (ValueError, MemoryError, RecursionError)):
        return 2
    return 4


def one_line(e: BaseException) -> str:
    """``e`` as the one line the command line prints after ``error: ``."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename or 'I/O'}: {e.strerror}"
    if isinstance(e, MemoryError):
        return "out of memory: try a smaller model, batch or data"
    if exit_code(e) == 4:
        return f"unexpected {type(e).__name__}: {first_line(e)} (a bug: rerun with --debug for the traceback)"
    return first_line(e)


def guarded(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run a command line's ``body`` and return its exit code; any error is one line on stderr,
    ``<prog>: error: ...`` (``error: ...`` for an empty ``prog``), with its code (``debug``: the
    traceback instead); Ctrl-C is 130."""
    prefix = f"{prog}: " if prog else ""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"{prefix}error: {one_line(e)}", file=sys.stderr)
        return exit_code(e)
