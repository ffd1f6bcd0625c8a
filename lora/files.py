"""Files: atomic writes and checked reads. Everything the project writes goes through here.

A write goes to a temporary file in the same folder, is fsynced and renamed over the target, so a reader
sees the old file or the new one, never half of one. Reads never unpickle: tensors come through
safetensors, metadata through JSON; a bad file raises a one-line ``ValueError`` naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from lora.errors import first_line

__all__ = [
    "atomic_folder",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "describe_mismatch",
    "existing_folder",
    "read_json",
    "read_safetensors",
]


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a power cut after this keeps it); a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, ``os.replace``.

    A reader sees the old file or the new one, never half of one, even if the process dies mid-write;
    the folder is fsynced after the rename so that the rename survives a power cut too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_json(path: str | Path, obj: Mapping) -> Path:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Save ``tensors`` (moved to CPU, made contiguous) as a safetensors file, atomically."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, safetensors_bytes(cpu, metadata={"format": "pt", **(metadata or {})}))


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Build a whole folder aside and rename it to ``path`` at the end: it appears complete or not at all.

    Yields the temporary folder to write into; an existing ``path`` is replaced only on success, and the
    temporary folder is removed on any failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_folder(path.parent)


def existing_folder(path: str | Path, what: str) -> Path:
    """``path`` as a ``Path`` if it is a folder; else a one-line ``ValueError`` saying what was expected."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such {what} folder")
    return folder


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``; a missing or unparseable file raises a one-line ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file (on CPU). Never unpickles; a bad file raises a one-line ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError and friends: truncated, corrupt, or not safetensors at all
        raise ValueError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def describe_mismatch(
    got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], noun: str = "tensors"
) -> str:
    """One line naming what ``got`` lacks, has in excess, or has in the wrong shape; ``""`` if it fits."""
    common = sorted(set(got) & set(expected))
    found = {
        f"missing {noun}": sorted(set(expected) - set(got)),
        f"unexpected {noun}": sorted(set(got) - set(expected)),
        "wrong shapes": [
            f"{k} {tuple(got[k].shape)} (expected {tuple(expected[k].shape)})"
            for k in common
            if got[k].shape != expected[k].shape
        ],
    }
    parts = []
    for label, items in found.items():
        if items:
            extra = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
            parts.append(f"{label}: {', '.join(items[:4])}{extra}")
    return "; ".join(parts)
