"""The run folder: where a run's outputs go, its name, and atomic writes into it; a run never destroys
the one it replaces (``--overwrite`` builds aside and swaps on success).

``runs/<run_name>/`` holds config.yaml, history.json and history.csv, metrics.json, training_curves.png, the
adapter (or, for full fine-tuning, ``model/``), samples.txt, report.html, checkpoints, and with ``--log_to
tensorboard`` TensorBoard's event files in ``tensorboard/``. A relative ``output_dir`` counts from the
working directory, except from inside the package folder ``lora/`` (``cd lora && python train_lora.py``),
where it counts from the project folder, so runs land in the top-level ``runs/`` either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from lora.config import TrainConfig
from lora.errors import ConfigError
from lora.files import atomic_folder, atomic_write_bytes, file_lock

__all__ = [
    "PACKAGE_DIR",
    "RunFolder",
    "check_run_folder",
    "discard_unless_resumable",
    "final_folder",
    "output_root",
    "prepare_run_folder",
    "publish",
    "refuse_replacing",
    "refuse_uncreatable",
    "run_folder_name",
    "run_lock",
]

PACKAGE_DIR = Path(__file__).resolve().parent


def output_root(output_dir: str) -> Path:
    """``output_dir`` as a path: from inside ``lora/`` a relative one counts from the project folder."""
    root = Path(output_dir)
    if not root.is_absolute() and Path.cwd().resolve() == PACKAGE_DIR:
        return PACKAGE_DIR.parent / root
    return root


def run_folder_name(cfg: TrainConfig) -> str:
    """``cfg.run_name``, or by default ``<task>-lora-r<r>`` (``<task>-full`` for full fine-tuning)."""
    return cfg.run_name or (f"{cfg.task}-full" if cfg.method == "full" else f"{cfg.task}-lora-r{cfg.lora_r}")


STAGED = re.compile(r"(.+)\.incomplete-[0-9a-f]{8}")  # <name>.incomplete-<random>: an --overwrite's folder


def prepare_run_folder(cfg: TrainConfig, resume: Path | None, final: Path) -> tuple[Path, Path]:
    """``(folder, final)``: the folder this run writes into, and where its outputs end up (``final``, which the
    run's plan took from :func:`final_folder`).

    A new run claims the first free name (``<name>``, ``<name>-2``, ...) with an atomic ``mkdir``, so runs
    started together never share a folder. With ``--overwrite`` the run is built aside, in
    ``<name>.incomplete-<random>``, and :func:`publish` swaps it in only when it has succeeded: until then the
    run it replaces is untouched. A resumed run continues in its folder (an ``.incomplete`` one still
    replaces ``<name>`` when it finishes).
    """
    if resume is not None:
        return (resume.parent if resume.is_file() else resume), final
    root, name = final.parent, final.name
    if cfg.overwrite:  # (check_run_folder has refused a final that is not a run folder)
        return _claim(root / f"{name}.incomplete-{uuid.uuid4().hex[:8]}"), final
    suffix = 1
    while True:
        try:
            folder = _claim(root / (name if suffix == 1 else f"{name}-{suffix}"))
            return folder, folder
        except FileExistsError:
            suffix += 1


def final_folder(cfg: TrainConfig, resume: Path | None = None) -> Path:
    """Where a run's outputs end up: ``<output root>/<name>`` (a new run whose name is taken writes
    ``<name>-2`` ...); resuming, the checkpoint's folder, or the run an ``--overwrite``'s staged folder
    replaces (however resumed: by path, or ``--resume auto``)."""
    if resume is None:
        return output_root(cfg.output_dir) / run_folder_name(cfg)
    folder = resume.parent if resume.is_file() else resume
    staged = STAGED.fullmatch(folder.name)
    return folder.parent / staged.group(1) if staged else folder


def check_run_folder(cfg: TrainConfig) -> None:
    """Refuse, before anything is read or written, an output folder that cannot hold a new run: a path
    through a regular file, or for ``--overwrite`` a ``runs/<name>`` that is not a run folder (a resumed
    run writes into its own folder, wherever it is)."""
    if cfg.resume is not None:
        return
    root = output_root(cfg.output_dir)
    final = root / run_folder_name(cfg)
    refuse_uncreatable([root])  # (a new run's own name, if taken, becomes <name>-2)
    if cfg.overwrite:
        if final.exists() and not final.is_dir():
            raise ConfigError(f"--overwrite refused: {final} is a file, not a run folder")
        visible = [p for p in final.iterdir() if not p.name.startswith(".")] if final.is_dir() else []
        if visible and not (final / "config.yaml").is_file():
            raise ConfigError(f"--overwrite refused: {final} is not a run folder (no config.yaml)")


def refuse_replacing(folders: Sequence[Path], overwrite: bool, what: str) -> None:
    """A script's runs of fixed names (``compare-lora``, ``multitask-rot13``) replace earlier ones only with
    ``--overwrite``: refuse, naming the first that exists and ``what`` it is, before anything trains."""
    earlier = [folder for folder in folders if folder.exists()]
    if earlier and not overwrite:
        raise ConfigError(f"{earlier[0]} exists ({what}): pass --overwrite to replace it")


def refuse_uncreatable(folders: Sequence[Path]) -> None:
    """Refuse, naming it, a folder that cannot be created (or written into) where it is: one with a file in
    its place or in its path, or under a folder not writable; checked before anything trains, creating nothing."""
    for folder in folders:
        nearest = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
        it = "it" if nearest == folder else str(nearest)
        if not nearest.is_dir():
            raise ConfigError(f"cannot create the folder {folder}: {it} exists and is not a folder")
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot create the folder {folder}: {it} is not writable")


def _claim(folder: Path) -> Path:
    """Create ``folder`` (not existing before: ``FileExistsError``), writable, or refuse in one line."""
    try:  # a parent that is a file raises FileExistsError too: not a name to step past
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {folder}: {e.strerror}") from None
    try:
        folder.mkdir()
    except FileExistsError:
        raise
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"the run folder {folder} is not writable")
    return folder


def publish(folder: Path, final: Path) -> Path:
    """Put the finished run ``folder`` in place of ``final`` (the run it replaces, if any, is deleted only
    after the swap; two runs publishing the same name take turns)."""
    if folder == final:
        return final
    with run_lock(final), _signals_held():
        replaced = None
        if final.exists():
            replaced = final.with_name(f".{final.name}.replaced-{uuid.uuid4().hex[:8]}")
            os.replace(final, replaced)
        os.replace(folder, final)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return final


def run_lock(final: Path, on_wait: Callable[[], None] | None = None) -> contextlib.AbstractContextManager:
    """The lock of the run folder ``final``: held by a run writing in place for its whole life and by a
    run swapping its folder in, so that an ``--overwrite`` never lands in the middle of another run."""
    return file_lock(final.parent / f".{final.name}.lock", on_wait)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done (the two renames of a swap), where possible."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):  # not POSIX, or not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def discard_unless_resumable(folder: Path) -> None:
    """After a failed new run: remove its folder unless it holds a checkpoint to resume from."""
    if folder.is_dir() and not any(folder.glob("checkpoint-*.safetensors")):
        shutil.rmtree(folder, ignore_errors=True)


class RunFolder:
    """Writes into one run folder, each file atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, name: str, data: bytes | str | dict) -> Path:
        """``data`` as the file ``name``: bytes as they are, text as UTF-8, a dict as indented JSON."""
        if isinstance(data, dict):
            data = json.dumps(data, indent=2, allow_nan=True) + "\n"
        return atomic_write_bytes(self.path / name, data.encode("utf-8") if isinstance(data, str) else data)

    def write_model(self, model: object, name: str) -> Path:
        """A whole model folder (``model.save_pretrained``), appearing complete or not at all."""
        with atomic_folder(self.path / name) as tmp:
            model.save_pretrained(tmp)  # type: ignore[attr-defined]
        return self.path / name
