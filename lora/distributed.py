"""Data parallelism on PyTorch's own engine: one process per device, started by ``torchrun``.

``torchrun --nproc_per_node N lora/train_lora.py ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in
each process; :func:`from_environment` reads them, :func:`start` joins the process group (NCCL on CUDA,
Gloo on CPU). The trainer wraps the model in ``DistributedDataParallel`` (only the trainable LoRA tensors
take part in the gradient all-reduce), each process reads its own shard of every global batch, and rank 0
alone writes. Without ``WORLD_SIZE`` everything here is a no-op for one process.

A process that fails posts its message in the process group's store (:func:`post_failure`) before it
exits; the others see their next collective fail (Gloo notices a closed peer at once) and read the message
there (:func:`peer_failure`), so every process stops within seconds and rank 0 prints the one that failed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lora.errors import ConfigError, LoRAError

__all__ = ["Distributed", "PeerFailedError", "all_max", "all_sum", "barrier", "check_same", "from_environment", "peer_failure",
           "post_failure", "start", "stop"]  # fmt: skip

FAILURE_KEY = "lora/failure"


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class PeerFailedError(LoRAError):
    """Another process failed with ``message`` (its exit code is kept)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def from_environment(env: Mapping[str, str] | None = None) -> Distributed:
    """This process's place from torchrun's variables; one process when ``WORLD_SIZE`` is unset."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return Distributed()
    try:
        rank, world, local = (int(env.get(k, "0")) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise ConfigError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are torchrun's to set)"
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(
            f"RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK {local}: expected 0 <= RANK < WORLD_SIZE"
        )
    return Distributed(rank, world, local)


def start(place: Distributed, device: torch.device) -> str:
    """Join the process group (``env://``: torchrun's rendezvous); returns the backend."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=place.rank, world_size=place.world_size)
    return backend


def stop() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every process, in place (one process: ``t`` itself)."""
    if _joined():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_max(t: torch.Tensor) -> torch.Tensor:
    """``t``'s largest value over every process, in place (one process: ``t`` itself)."""
    if _joined():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    """Wait until every process is here (one process: return at once)."""
    if _joined():
        dist.barrier()


def check_same(value: str, what: str) -> None:
    """Refuse to go on unless every process has the same ``value`` (e.g. the base's fingerprint): rank 0
    raises a :class:`ConfigError`, the others a :class:`PeerFailedError` (they stop without a word)."""
    if not _joined():
        return
    values: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    differ = [i for i, v in enumerate(values) if v != values[0]]
    if differ:  # every process sees it; rank 0 says it, the others only stop
        message = (f"{what} differs between processes: rank 0 has {values[0]}, rank {differ[0]} "
                   f"{values[differ[0]]}; every process must load the same files")  # fmt: skip
        raise (
            ConfigError(message) if dist.get_rank() == 0 else PeerFailedError(message, ConfigError.exit_code)
        )


def _store() -> dist.Store | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no process group, or a torch without it
        return None


def post_failure(message: str, exit_code: int) -> None:
    """Tell the other processes why this one stops (best effort: the store may be gone too)."""
    store = _store() if _joined() else None
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(FAILURE_KEY, json.dumps([message, exit_code]))


def peer_failure() -> PeerFailedError | None:
    """The failure another process posted, if any."""
    store = _store()
    if store is None:
        return None
    try:
        if not store.check([FAILURE_KEY]):
            return None
        message, code = json.loads(store.get(FAILURE_KEY))
    except Exception:
        return None
    return PeerFailedError(message, int(code))
