"""What a run will allocate, estimated before anything is allocated, and refused if it cannot fit; and
what it did allocate at its peak (:func:`peak_memory_mb`, reported in ``metrics.json``); and, for the
benchmark, the peak of a step's tensors alone (:func:`tensor_peak`: what CUDA's ``max_memory_allocated``
counts, without the interpreter, the libraries and the allocator's cache that a CPU process's resident set
also holds).

A typo such as ``--d_model 100000`` or ``--num_examples 10000000000`` would otherwise take minutes to fill
the machine's memory and then die; here it costs one line. The estimate is rough (within a small factor)
and errs on the large side:

* model: 4 bytes per parameter, plus 12 per trained parameter (its gradient and two AdamW moments); the
  parameters are counted on one block built on the ``meta`` device (no memory, bounded time), times the
  number of blocks;
* data: about 400 bytes per generated example, or 10 bytes per byte of a text or JSONL file;
* activations: ``4 B T (L (16 d + 4 d_ff) + 3 V)`` bytes for a batch of ``B`` sequences of ``T`` tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from lora.config import GENERATED_TASKS, TrainConfig
from lora.errors import ConfigError
from lora.lora_transformer import LoRATransformer
from lora.model_config import ModelConfig

__all__ = [
    "available_bytes",
    "check_memory",
    "estimate_bytes",
    "peak_memory_mb",
    "reset_peak_memory",
    "storage_bytes",
    "tensor_peak",
]

BYTES_PER_EXAMPLE = 400  # a generated cipher example: its tensors and the temporaries that make them
BYTES_PER_FILE_BYTE = 10  # a byte of a data file: read, decoded, split into windows, int16 targets


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring the peak afresh (a run in a process that ran others, as a sweep's cells): CUDA's
    peak statistics, and on Linux the resident set's high-water mark (``/proc/self/clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float | None:
    """The run's peak, in MiB: on CUDA the tensors' (``max_memory_allocated``), elsewhere the process's
    resident set (``VmHWM`` on Linux, else ``ru_maxrss``: the interpreter, torch and the data included);
    ``None`` where neither can be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 2**10
    try:
        import resource  # not on Windows
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``: views of one tensor count once, a tensor subclass
    (torchao's ``NF4Tensor``) counts its inner tensors."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        if hasattr(t, "__tensor_flatten__"):  # a wrapper subclass: what it holds
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()

    for t in tensors:
        add(t)
    return sum(seen.values())


def tensor_peak(fn: Callable[[], object], resident: Iterable[torch.Tensor] | None = None) -> tuple[int, int]:
    """Run ``fn`` once under ``torch.profiler``'s memory profile; return ``(before, peak)`` in bytes: the
    tensors that existed before (``resident``, all of them, by :func:`storage_bytes`: a model's weights and
    an optimizer's state; without it, those ``fn`` used), and the most bytes of tensors ``fn`` had allocated
    and not yet freed at any moment (activations, gradients, temporaries inside any operation, custom ones
    included). Their sum is a CPU training step's peak of tensor memory, what CUDA's
    ``max_memory_allocated`` counts on a GPU (use that there). The profile makes ``fn`` slower: measure, do
    not time.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    activities = [ProfilerActivity.CPU]
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    used = now = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.PREEXISTING:
            used += size
        now += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, now)
    return (used if resident is None else storage_bytes(resident)), peak


def available_bytes() -> int | None:
    """Memory available to a new allocation now (Linux ``MemAvailable``), or ``None`` if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _file_bytes(path: str | None) -> int:
    try:
        return os.stat(path).st_size if path else 0
    except (OSError, ValueError):
        return 0  # a missing file is reported when the data are read


def estimate_bytes(cfg: TrainConfig, arch: ModelConfig, pretraining: bool) -> dict[str, int]:
    """``{"model", "data", "activations"}`` in bytes for ``cfg`` on a base of architecture ``arch``."""
    lora = cfg.lora_config() if cfg.method == "lora" else None
    with torch.device("meta"):  # one block on the meta device: counted, not allocated, in bounded time
        probe = LoRATransformer.from_config(dataclasses.replace(arch, num_layers=1), lora)
    per_block = [sum(p.numel() for n, p in probe.blocks[0].named_parameters() if lora_only is None or
                     n.endswith(("lora_A", "lora_B")) == lora_only) for lora_only in (None, True)]  # fmt: skip
    total = sum(p.numel() for p in probe.parameters()) + (arch.num_layers - 1) * per_block[0]
    lora_params = per_block[1] * arch.num_layers
    trained = total if (pretraining or cfg.method == "full") else lora_params
    if cfg.task in GENERATED_TASKS:
        examples = cfg.num_examples + max(512, cfg.num_examples // 10)
        data = examples * BYTES_PER_EXAMPLE
    else:
        data = (_file_bytes(cfg.train_file) + _file_bytes(cfg.val_file)) * BYTES_PER_FILE_BYTE
    width = cfg.sequence_width
    d, L = arch.d_model, arch.num_layers
    activations = 4 * cfg.batch_size * width * (L * (16 * d + 4 * arch.d_ff) + 3 * arch.vocab_size)
    return {"model": 4 * total + 12 * trained, "data": data, "activations": activations}


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def check_memory(
    cfg: TrainConfig, arch: ModelConfig, pretraining: bool, device: torch.device
) -> dict[str, int]:
    """Refuse (one line, with the estimate) a run that would need more memory than is available; return the
    estimate (:func:`estimate_bytes`; on a GPU the data alone).

    On a GPU only the data are held in the machine's memory; the model and activations are the device's
    business (CUDA reports its own out-of-memory error).
    """
    parts = estimate_bytes(cfg, arch, pretraining)
    if device.type != "cpu":
        parts = {"data": parts["data"]}
    need, have = sum(parts.values()), available_bytes()
    if have is not None and need > have:
        detail = ", ".join(f"{k} {_size(v)}" for k, v in parts.items())
        raise ConfigError(f"this run would need about {_size(need)} of memory ({detail}), more than the "
                          f"{_size(have)} available: use a smaller d_model, num_layers, num_examples, "
                          "batch_size or data file")  # fmt: skip
    return parts
