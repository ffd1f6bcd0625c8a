"""Training checkpoints: everything needed to continue a run exactly, written atomically, no pickle.

A checkpoint is one ``checkpoint-<step>.safetensors`` file. Its tensors are the trainable weights
(``model.<name>``), the AdamW moments (``optim.<i>.<key>``), the torch RNG states (``rng.*``) and, with
early stopping, the best weights so far (``best.<name>``); its
header metadata holds the step, the epoch, the position inside the epoch, the history so far, the
optimizer's hyper-parameters and the Python / NumPy RNG states, as JSON. Loading goes through safetensors
and JSON only, so a crafted file cannot run code.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lora.errors import CheckpointError, first_line, quote
from lora.files import atomic_save_safetensors, describe_mismatch

__all__ = ["find_latest", "load_checkpoint", "read_trainer_state", "save_checkpoint"]

_NAME = re.compile(r"^checkpoint-(\d+)\.safetensors$")
_STATE_KEYS = ("step", "epoch", "batch_in_epoch", "history", "rng", "param_groups", "param_names")


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(state), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    best: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``folder/checkpoint-<step>.safetensors`` atomically and keep only the newest ``keep``; ``best``:
    the best weights so far by trainable parameter name (early stopping), kept too."""
    names = {p: n for n, p in model.named_parameters()}
    tensors = {
        f"model.{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }
    opt = optimizer.state_dict()
    for i, s in opt["state"].items():
        for key, value in s.items():
            tensors[f"optim.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors.update({f"best.{n}": t.detach().cpu().contiguous() for n, t in (best or {}).items()})
    rng_tensors, rng_meta = _rng_state()
    tensors.update(rng_tensors)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    params = [[names[p] for p in g["params"]] for g in optimizer.param_groups]
    meta = {**state, "rng": rng_meta, "param_groups": groups, "param_names": params}
    path = folder / f"checkpoint-{state['step']:07d}.safetensors"
    atomic_save_safetensors(tensors, path, metadata={"trainer_state": json.dumps(meta)})
    for old in _checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    for stale in folder.glob(".checkpoint-*.tmp"):  # left by a process killed while writing a checkpoint
        stale.unlink(missing_ok=True)
    return path


def _checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in ``folder``, oldest first (by step, as a number: step 10**7 sorts after 9999999)."""
    found = [(int(m[1]), p) for p in folder.glob("checkpoint-*.safetensors") if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest(folder: Path) -> Path | None:
    """The newest checkpoint in ``folder`` (by step), or ``None``."""
    found = _checkpoints(folder)
    return found[-1] if found else None


def _corrupted(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is truncated or corrupted ({first_line(e)})")


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The JSON trainer state in ``path``'s header, checked without reading the tensors.

    safetensors checks that the header covers the whole file, so a truncated or padded file, or one that is
    not safetensors at all (a pickle, say), raises :class:`CheckpointError` here, before any output is made.
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("trainer_state")
        meta = json.loads(raw) if raw is not None else None
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupted(path, e) from None
    missing = [k for k in _STATE_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (its header lacks {', '.join(missing)})")
    problem = _check_state(meta)
    if problem:  # a hand-edited header: named, not a crash three functions later
        raise CheckpointError(f"checkpoint {path}: trainer_state {problem}")
    return meta


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any, low: float, high: float = math.inf) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value < high


def _check_group(group: dict[str, Any]) -> str:
    """What is wrong with one AdamW parameter group (``""`` if nothing)."""
    checks = {
        "lr": _is_number(group.get("lr"), 0.0) and math.isfinite(group["lr"]),
        "eps": _is_number(group.get("eps"), 1e-300),
        "weight_decay": _is_number(group.get("weight_decay"), 0.0),
        "betas": isinstance(group.get("betas"), list) and len(group["betas"]) == 2
        and all(_is_number(b, 0.0, 1.0) for b in group["betas"]),
        # LoRA+'s multiplier of the group's learning rate (absent in checkpoints from before it: 1)
        "lr_ratio": _is_number(group.get("lr_ratio", 1.0), 1e-300) and math.isfinite(group.get("lr_ratio", 1.0)),
    }  # fmt: skip
    for key, ok in checks.items():
        if not ok:
            return f"{key} is out of range or of the wrong type: {quote(group.get(key))}"
    return ""


def _check_state(meta: dict[str, Any]) -> str:
    """What is wrong with a checkpoint's trainer state, key by key (``""`` if nothing)."""
    for key in ("step", "epoch", "batch_in_epoch"):
        if not _is_count(meta[key]):
            return f"{key} must be an integer >= 0, got {quote(meta[key])}"
    history = meta["history"]
    if not isinstance(history, dict) or not all(isinstance(v, list) for v in history.values()):
        return f"history must map names to lists, got {quote(history)}"
    if len({len(v) for v in history.values()}) > 1 or len(history.get("step", [])) != meta["step"]:
        return f"history's lists must all have one entry per step ({meta['step']})"
    if meta["epoch"] > meta["step"] or meta["batch_in_epoch"] > meta["step"]:
        return f"epoch {meta['epoch']} and batch_in_epoch {meta['batch_in_epoch']} cannot exceed step {meta['step']}"
    groups, names = meta["param_groups"], meta["param_names"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return f"param_groups must be a list of objects, got {quote(groups)}"
    for i, group in enumerate(groups):
        problem = _check_group(group)
        if problem:
            return f"param_groups[{i}].{problem}"
    if not isinstance(names, list) or not all(
        isinstance(n, list) and all(isinstance(x, str) for x in n) for n in names
    ):
        return f"param_names must be lists of names, got {quote(names)}"
    rng = meta["rng"]
    if (
        not isinstance(rng, dict)
        or not isinstance(rng.get("python"), list)
        or not isinstance(rng.get("numpy"), list)
    ):
        return f"rng must hold the python and numpy states, got {quote(rng)}"
    if "base_fingerprint" in meta and not isinstance(meta["base_fingerprint"], str):
        return f"base_fingerprint must be a string, got {quote(meta['base_fingerprint'])}"
    return ""


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states from ``path``; return the trainer state (step, history...),
    with ``best_weights`` (by parameter name) where the checkpoint keeps the best weights so far."""
    meta = read_trainer_state(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupted(path, e) from None
    for key, t in tensors.items():  # weights and moments are floats, RNG states bytes: nothing converted
        want = "uint8" if key.startswith("rng.") else "floating point"
        if (t.dtype != torch.uint8) if key.startswith("rng.") else not t.is_floating_point():
            raise CheckpointError(f"checkpoint {path}: tensor {key} has dtype {t.dtype}, expected {want}")
    trainable = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k: v for k, v in tensors.items() if k.startswith("model.")}
    problem = describe_mismatch(saved, trainable, noun="weights")
    if problem:
        raise CheckpointError(f"checkpoint {path} does not match this run's trainable weights: {problem}")
    best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
    problem = describe_mismatch(
        best, {k.removeprefix("model."): p for k, p in trainable.items()}, noun="weights"
    )
    if best and problem:
        raise CheckpointError(f"checkpoint {path}: its best weights do not match this run's trainable weights: "
                              f"{problem}")  # fmt: skip
    with torch.no_grad():
        for key, target in trainable.items():
            target.copy_(tensors[key])
    names = {p: n for n, p in model.named_parameters()}
    if [[names[p] for p in g["params"]] for g in optimizer.param_groups] != meta["param_names"]:
        raise CheckpointError(f"checkpoint {path} was written for other optimizer parameters")
    opt = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    try:
        # the hyperparameters are the checkpoint's; how the step is computed (fused, ...) is this run's
        how = ("params", "fused", "foreach", "capturable", "differentiable")
        groups = [
            {**g, **{k: og[k] for k in how if k in og}}
            for g, og in zip(meta["param_groups"], opt["param_groups"], strict=True)
        ]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        _set_rng_state(tensors, meta["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise _corrupted(path, e) from None
    state = {k: v for k, v in meta.items() if k not in ("rng", "param_groups", "param_names")}
    return {**state, "best_weights": best} if best else state
