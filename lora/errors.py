"""The project's errors and their exit codes: the bottom of the package, importing nothing of it.

The command line prints a :class:`LoRAError` as one line and exits with its ``exit_code``:
0 done, 1 a write failed (``OSError``), 2 bad input, 3 training diverged, 130 interrupted.
Input errors are also ``ValueError`` s, so library callers can catch them as such.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DivergenceError",
    "Interrupted",
    "LoRAError",
    "did_you_mean",
    "first_line",
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
