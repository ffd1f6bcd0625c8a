"""Files: atomic writes and checked reads. Everything the project writes goes through here.

A write goes to a temporary file in the same folder, is fsynced and renamed over the target, so a reader
sees the old file or the new one, never half of one. Reads never unpickle: tensors come through
safetensors, metadata through JSON; a bad file raises a one-line ``ValueError`` naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from lora.errors import DataError, first_line, quote

__all__ = [
    "MAX_DATA_BYTES",
    "MAX_SETTINGS_BYTES",
    "atomic_folder",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_files",
    "atomic_write_json",
    "check_regular_file",
    "data_file_errors",
    "describe_mismatch",
    "existing_folder",
    "file_lock",
    "json_bytes",
    "read_json",
    "read_limited",
    "read_safetensors",
    "read_safetensors_header",
    "read_text_file",
    "safetensors_file_bytes",
    "tensors_fingerprint",
]


MAX_SETTINGS_BYTES = 1 << 20  # a YAML or JSON settings file: 1 MiB
MAX_DATA_BYTES = 512 << 20  # a text or JSONL data file: 512 MiB (read whole, then tokenized)


def check_regular_file(path: str | Path, limit: int, what: str = "file") -> int:
    """The size of ``path`` if it is a regular file of at most ``limit`` bytes, found without opening it.

    A FIFO, a device (``/dev/zero``) or a socket would block or stream without end: ``ValueError``. A missing
    path raises ``FileNotFoundError`` and a folder ``IsADirectoryError``, for the caller to word.
    """
    try:
        st = os.stat(path)
    except ValueError:  # an embedded NUL byte
        raise ValueError(f"{what} path {quote(str(path))} contains a NUL byte") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(21, "Is a directory", str(path))
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file (a FIFO, device or socket); a {what} must be a file")
    if st.st_size > limit:
        raise ValueError(f"{path}: {st.st_size:,} bytes, more than the {limit:,} a {what} may have")
    return st.st_size


def read_limited(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (checked before and while reading)."""
    check_regular_file(path, limit, what)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew since the check
        raise ValueError(f"{path}: more than the {limit:,} bytes a {what} may have")
    return data


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
    return atomic_write_files({Path(path): data})[0]


def atomic_write_files(files: Mapping[Path, bytes]) -> list[Path]:
    """Write several files as :func:`atomic_write_bytes` does, each to its temporary file first, and replace
    the files only once every one is written: a failure while writing (a full disk) leaves all of them as
    they were, never the new one of two beside the old other (a model's weights and its ``config.json``).
    The renames, which allocate nothing, then follow one another: only a kill between two of them (a window
    of microseconds) can leave a mixed pair."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    for folder in dict.fromkeys(path.parent for path in files):
        _fsync_folder(folder)
    return list(files)


def json_bytes(obj: Mapping) -> bytes:
    """``obj`` as indented, key-sorted JSON: the bytes of every JSON file written here."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def safetensors_file_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    """``tensors`` (moved to CPU, made contiguous) as the bytes of a safetensors file."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return safetensors_bytes(cpu, metadata={"format": "pt", **(metadata or {})})


def atomic_write_json(path: str | Path, obj: Mapping) -> Path:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    return atomic_write_bytes(path, json_bytes(obj))


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Save ``tensors`` (moved to CPU, made contiguous) as a safetensors file, atomically."""
    return atomic_write_bytes(path, safetensors_file_bytes(tensors, metadata))


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


@contextmanager
def file_lock(path: str | Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` for the block; another process asking for it waits
    (``on_wait`` is called once when it has to). Released when the process dies. The file is created for
    the block and removed at its end, so that no empty lock files are left behind. Where ``fcntl`` does not
    exist (Windows) there is no lock.

    Removing a lock file others may have opened is safe this way: the holder unlinks it while it still holds
    the ``flock``, and a process counts the lock as its own only once, holding the ``flock``, it finds that
    ``path`` still names the file it locked (the same device and inode). One that locked a file already
    unlinked, or since replaced, lets go and opens ``path`` afresh; so at any time at most one process holds
    the lock of the file ``path`` names.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None and not waited:
                    on_wait()
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _names(path, os.fstat(fd)):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed it while we waited: lock the file path names now
    try:
        yield
    finally:
        with suppress(OSError):  # remove it while it is still ours, then let go
            if _names(path, os.fstat(fd)):
                os.unlink(path)
        os.close(fd)  # closing releases the lock


def _names(path: Path, held: os.stat_result) -> bool:
    """Whether ``path`` is (still) the file ``held`` describes."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def existing_folder(path: str | Path, what: str) -> Path:
    """``path`` as a ``Path`` if it is a folder; else a one-line ``ValueError`` saying what was expected."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such {what} folder")
    return folder


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``; a missing or unparseable file raises a one-line ``ValueError``."""
    path = Path(path)
    try:
        raw = read_limited(path, MAX_SETTINGS_BYTES, "JSON file")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ValueError(f"{path}: file not found") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _safetensors_file(path: str | Path) -> Path:
    """``path`` if it is a regular file (a FIFO would block the reader); else a one-line ``ValueError``."""
    path = Path(path)
    try:
        check_regular_file(path, 1 << 40, "safetensors file")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ValueError(f"{path}: file not found") from None
    return path


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file (on CPU), memory-mapped: nothing is read until used, and the pages
    read are the file's (shared with the page cache, not copied; writes to a tensor are the process's own
    and never reach the file). Never unpickles; a bad file raises a one-line ``ValueError``."""
    path = _safetensors_file(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError and friends: truncated, corrupt, or not safetensors at all
        raise ValueError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors_header(path: str | Path) -> dict[str, torch.Tensor]:
    """The names, shapes and dtypes of a safetensors file's tensors, as empty ``meta`` tensors: its header
    only, nothing allocated. A bad file raises a one-line ``ValueError``; so does a tensor that is not
    floating point (integers where weights belong are refused, not converted)."""
    path = _safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # truncated, corrupt, or not safetensors at all
        raise ValueError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    out = {}
    for name, (shape, dtype) in header.items():
        if dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{path}: tensor {name} has dtype {dtype}, expected floating point ({', '.join(FLOAT_DTYPES)})"
            )
        out[name] = torch.empty(shape, dtype=FLOAT_DTYPES[dtype], device="meta")
    return out


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


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """First 16 hex digits of a sha256 over the sorted names, the shapes and the float32 values of ``tensors``
    (float32 holds fp16 and bf16 exactly: a half tensor and its widened copy hash alike)."""
    h = hashlib.sha256()
    for key, value in sorted(tensors.items()):
        t = value.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


T = TypeVar("T")


def data_file_errors(action: Callable[[], T], path: Path) -> T:
    """``action()``, its errors about the data file ``path`` worded as one-line :class:`DataError` s."""
    try:
        return action()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"data file is a folder, expected a file: {path}") from None
    except ValueError as e:
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file; missing, empty, binary, non-UTF-8, oversized or non-regular files raise
    :class:`DataError` (a FIFO or a device is refused before it is opened: it could block or never end)."""
    path = Path(path)
    raw = data_file_errors(lambda: read_limited(path, MAX_DATA_BYTES, "data file"), path)
    if not raw.strip():
        raise DataError(f"data file is empty: {path}")
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise DataError(f"{path} line {line}: looks binary (NUL byte); expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})"
        ) from None
