"""The run folder: where a run's outputs go, its name, and atomic writes into it.

``runs/<run_name>/`` holds config.yaml, history.json, metrics.json, training_curves.png, the adapter (or,
for full fine-tuning, ``model/``), samples.txt and checkpoints. A relative ``output_dir`` counts from the
working directory, except from inside the package folder ``lora/`` (``cd lora && python train_lora.py``),
where it counts from the project folder, so runs land in the top-level ``runs/`` either way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lora.config import TrainConfig
from lora.errors import ConfigError
from lora.files import atomic_folder, atomic_write_bytes

__all__ = ["PACKAGE_DIR", "RunFolder", "output_root", "prepare_run_folder", "run_folder_name"]

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


def prepare_run_folder(cfg: TrainConfig, resume: Path | None) -> Path:
    """The run folder: the resumed run's, or a new one (an existing name gets a suffix unless --overwrite)."""
    if resume is not None:
        return resume.parent if resume.is_file() else resume
    root = output_root(cfg.output_dir)
    name = run_folder_name(cfg)
    folder = root / name
    if folder.exists() and cfg.overwrite:
        if any(folder.iterdir()) and not (folder / "config.yaml").is_file():
            raise ConfigError(f"--overwrite refused: {folder} is not a run folder (no config.yaml)")
        shutil.rmtree(folder)
    suffix = 2
    while folder.exists():
        folder = root / f"{name}-{suffix}"
        suffix += 1
    try:
        folder.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"the run folder {folder} is not writable")
    return folder


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
