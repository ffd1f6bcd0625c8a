"""Following a run: its numbers in TensorBoard while it trains (``--log_to tensorboard``), and its history
as a CSV table when it ends.

    python lora/train_lora.py --log_to tensorboard     # events in runs/<run>/tensorboard/
    tensorboard --logdir runs                           # every run's curves side by side, live

The trainer talks to a :class:`Tracker` (:func:`open_tracker`): this base class keeps nothing (``log_to
none``, and every process of a data-parallel run but rank 0); :class:`TensorBoardTracker` writes event files
with ``torch.utils.tensorboard``, imported only when one is opened. Its scalars, against the optimizer step:

- ``train/loss`` (mean cross-entropy over the update's scored tokens, nats), ``train/learning_rate``,
  ``train/grad_norm`` (the global L2 norm of the trainable parameters' gradients, before clipping:
  ``sqrt(Σ_p ||g_p||²)``), ``train/tokens_per_s``, at every step;
- ``val/loss`` and ``val/<metric>`` (``bits_per_byte``, ``exact_match``, ...) at every evaluation;

and the run's resolved settings as a text table (``settings``). A resumed run writes into the same folder,
opened with ``purge_step`` = its first new step: TensorBoard drops what an earlier session logged from that
step on (the steps after the checkpoint, done again now), so every step is shown once.

``tensorboard`` is an optional package (``pip install 'lora-transformer[tensorboard]'``); a run asking for
it without it is refused when its settings are checked (:func:`check_installed`), before anything is written.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora.errors import ConfigError, first_line

__all__ = ["TRACKERS", "TensorBoardTracker", "Tracker", "check_installed", "history_csv", "open_tracker"]

TRACKERS = ("none", "tensorboard")  # the values of log_to
TENSORBOARD_FOLDER = "tensorboard"  # in the run folder
INSTALL = "pip install 'lora-transformer[tensorboard]' (or pip install tensorboard)"


def check_installed(kind: str) -> None:
    """Refuse (:class:`ConfigError`, one line) a tracker whose package is not installed; found without
    importing it."""
    if kind == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"log_to tensorboard needs the tensorboard package, which is not installed: "
                          f"{INSTALL}")  # fmt: skip


class Tracker:
    """Where a run's numbers go while it trains. This one keeps none of them; subclasses write them."""

    def train_step(self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float) -> None:
        """One optimizer step: its loss, learning rate, gradient norm (before clipping) and throughput."""

    def evaluation(self, step: int, val_loss: float, metric_name: str, metric: float) -> None:
        """The evaluation after ``step``: validation loss and the task's metric."""

    def settings(self, step: int, settings: Mapping[str, Any]) -> None:
        """The run's resolved settings, as the session starting at ``step`` trains with them."""

    def close(self) -> None:
        """Write out what is buffered and release the files."""


class TensorBoardTracker(Tracker):
    """A :class:`Tracker` writing TensorBoard event files into ``folder``.

    ``start_step``: the step training goes on from (0: a new run). Above 0 the writer is opened with
    ``purge_step = start_step + 1``, so that the steps an earlier session logged past its checkpoint are
    replaced by this session's, not shown twice. Events are flushed every ``flush_secs`` seconds (and at
    :meth:`close`), so that ``tensorboard --logdir`` follows the run live.
    """

    def __init__(self, folder: Path, start_step: int = 0, flush_secs: int = 10) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # installed, but not importable (checked at plan time: found, at least)
            raise ConfigError(f"log_to tensorboard: cannot import it ({first_line(e)}): {INSTALL}") from None
        self.folder = folder
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None,
                                    flush_secs=flush_secs)  # fmt: skip

    def train_step(self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float) -> None:
        for tag, value in (("loss", loss), ("learning_rate", lr), ("grad_norm", grad_norm),
                           ("tokens_per_s", tokens_per_s)):  # fmt: skip
            self.writer.add_scalar(f"train/{tag}", value, step)

    def evaluation(self, step: int, val_loss: float, metric_name: str, metric: float) -> None:
        self.writer.add_scalar("val/loss", val_loss, step)
        self.writer.add_scalar(f"val/{metric_name}", metric, step)
        self.writer.flush()  # an evaluation is what a person watching waits for

    def settings(self, step: int, settings: Mapping[str, Any]) -> None:
        self.writer.add_text("settings", settings_table(settings), step)

    def close(self) -> None:
        self.writer.close()


def open_tracker(kind: str, run_dir: Path | None, start_step: int = 0) -> Tracker:
    """The tracker ``log_to`` = ``kind`` asks for, writing under ``run_dir`` (``None``: nothing is written,
    as in the processes other than rank 0); ``start_step`` as :class:`TensorBoardTracker` takes it."""
    if kind not in TRACKERS:
        raise ValueError(f"log_to must be one of {', '.join(TRACKERS)}, got {kind!r}")
    if kind == "none" or run_dir is None:
        return Tracker()
    return TensorBoardTracker(run_dir / TENSORBOARD_FOLDER, start_step)


def settings_table(settings: Mapping[str, Any]) -> str:
    """``settings`` as a Markdown table (TensorBoard's text tab renders it): one row per key, lists joined
    with commas, ``|`` escaped."""
    rows = ["| setting | value |", "|---|---|"]
    for key, value in settings.items():
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        rows.append(f"| {key} | {shown.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def history_csv(history: Mapping[str, list]) -> str:
    """A run's history (a dict of per-step lists, as history.json holds it) as CSV text: a header of its keys,
    then one row per step. A step without an evaluation has empty validation cells; floats are written
    in full (``repr``), so that the table reads back to history.json's numbers exactly."""
    keys = list(history)
    lengths = {k: len(history[k]) for k in keys}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"history columns differ in length: {lengths}")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(keys)
    for row in zip(*(history[k] for k in keys), strict=True):
        writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])
    return out.getvalue()
