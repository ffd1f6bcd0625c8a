"""A run's plan: every input resolved and checked, the cheap refusals first, nothing written or trained.

:func:`plan_run` turns a :class:`TrainConfig` into a frozen :class:`RunPlan` (device, base folder resolved
once, how the base is stored, tokenizer, checkpoint to resume, memory, where the outputs go) in this
order: the output folder, the data files (found, not opened), the checkpoint to resume and its settings,
the base folder (its ``config.json`` parsed once, its header read once, checked on the meta device
once), the LoRA targets against the base's family, the sequence width against the base, the base's
storage, the memory the run needs, the tokenizer and its special tokens (a BOS or EOS the model does not
have is refused here), a chat task's template (rendered once: one that fails is refused). Only then does ``lora/application.py`` tokenize the data, pretrain a missing default
base and load the weights. A typo costs one line and touches nothing.

Under torchrun every process plans; the default base may exist only once rank 0 has pretrained it, so a
plan whose default base is still to be made resolves it after that (``RunPlan.base`` is ``None``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora.base_model import base_dir_for, check_recipe, default_base_exists, require_folder
from lora.base_storage import half_dtype
from lora.chat_template import ChatTemplate, load_chat_template
from lora.checkpoint import find_latest, read_trainer_state
from lora.config import CHAT_TASKS, TrainConfig, load_yaml, resolve_config
from lora.data import VOCAB_SIZE, check_data_files
from lora.errors import CheckpointError, ConfigError, LoRAError
from lora.fsdp import check_fsdp
from lora.memory import check_memory
from lora.model_config import ModelConfig
from lora.pretrained import BaseSource, resolve_base
from lora.quantize import check_tiles
from lora.run_folder import check_run_folder, final_folder
from lora.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from lora.trainer import autocast_dtype

__all__ = ["RunPlan", "find_resume", "plan_run", "resolve_or_refuse", "storage_for"]


@dataclass(frozen=True)
class RunPlan:
    """What one run will do, decided before it does anything.

    ``base`` is the resolved base folder (``None``: the default base, still to be pretrained by rank 0, at
    ``base_dir``); ``architecture`` the base's; ``storage`` how the frozen base is kept (``none``: float32, ``bf16``,
    ``nf4``, or ``half``: a half-precision folder's as stored); ``memory`` the bytes the run is estimated to need (``lora/memory.py``); ``final`` where its
    outputs end up (``runs/<name>``, or a resumed run's; ``lora/run_folder.py``: a new run whose name is
    taken writes ``<name>-2``, an ``--overwrite`` is built aside and swapped in); ``resume`` the checkpoint
    to continue and ``resume_state`` its trainer state.
    """

    cfg: TrainConfig
    device: torch.device
    base_dir: Path
    base: BaseSource | None
    architecture: ModelConfig
    storage: str
    tokenizer: Tokenizer
    memory: dict[str, int]
    final: Path
    resume: Path | None = None
    resume_state: dict[str, Any] = field(default_factory=dict)
    chat_template: ChatTemplate | None = None  # a chat task's (lora/chat_task.py), rendered once to check it

    @property
    def make_base(self) -> bool:
        """Whether the default base must be pretrained first."""
        return self.base is None


def plan_run(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> RunPlan:
    """Resolve and check everything a run of ``cfg`` needs (see the module docstring); raises a one-line
    :class:`~lora.errors.LoRAError` for the first problem found."""
    check_fsdp(cfg, world_size)
    check_run_folder(cfg)
    check_data_files(cfg)  # (found, files, not too large: read only when the plan holds)
    resume, resume_state = find_resume(cfg, world_size)  # its settings, before the base's are read
    base_dir = base_dir_for(cfg)
    base = _given_base(base_dir) if cfg.base_checkpoint != "auto" else _default_base(cfg, base_dir)
    arch = base.architecture if base is not None else cfg.model_config(VOCAB_SIZE)
    if cfg.method == "lora":  # a target the base's family lacks (gate on GPT-2, fc1 on Llama)
        cfg.lora_config().check_family(arch)
    width = cfg.sequence_width
    if width > arch.max_seq_len:
        raise ConfigError(f"seq_len {width} exceeds the base model's max_seq_len {arch.max_seq_len} "
                          f"({base_dir})")  # fmt: skip
    storage = storage_for(cfg, device, base)
    if storage == "nf4":  # the block weights must tile NF4's blocks: refused before a base is made or loaded
        try:
            check_tiles(arch.projection_shapes())
        except ValueError as e:
            raise ConfigError(f"quantize_base {cfg.quantize_base}: {e}") from None
    memory = check_memory(cfg, arch, base is None, device)  # before the data or a model is made
    if base is None or cfg.base_checkpoint == "auto":  # a base made here reads bytes
        tokenizer: Tokenizer = ByteTokenizer()
    else:
        tokenizer = load_tokenizer(
            base.folder, arch.vocab_size, base.hf_model, base.tokenizer_files, base.config
        )
    template = None
    if (
        cfg.task in CHAT_TASKS
    ):  # the file's, else the base folder's, else the built-in; one that fails: refused
        folder = None if base is None or cfg.base_checkpoint == "auto" else base.folder
        template = load_chat_template(folder, cfg.chat_template)
        _ = template.end_of_turn  # renders a probe conversation: a broken template is refused here
    final = final_folder(cfg, resume)
    return RunPlan(cfg, device, base_dir, base, arch, storage, tokenizer, memory, final, resume, resume_state,
                   template)  # fmt: skip


def _given_base(folder: Path) -> BaseSource:
    """A given base folder, resolved (a missing or bad one: one line)."""
    return resolve_or_refuse(require_folder(folder))


def _default_base(cfg: TrainConfig, folder: Path) -> BaseSource | None:
    """The default base if it exists (made with the settings asked for now), else ``None``: to pretrain."""
    if not default_base_exists(folder):
        return None
    check_recipe(cfg, folder)
    return resolve_or_refuse(folder)


def resolve_or_refuse(folder: Path) -> BaseSource:
    """:func:`~lora.pretrained.resolve_base`, a folder that does not fit refused as a run refuses it."""
    try:
        return resolve_base(folder)
    except ValueError as e:
        raise LoRAError(f"cannot load the base model: {e}") from None


def storage_for(cfg: TrainConfig, device: torch.device, base: BaseSource | None = None) -> str:
    """How the run stores its frozen base (``--quantize_base``): as given (``none``: float32, a half-precision
    folder widened), and ``auto`` resolved to ``half`` for a half-precision ``base`` folder (kept in its
    bfloat16 or float16 as stored: exact, half the memory; ``lora/base_storage.py``), else to bf16 where LoRA
    trains under bf16 autocast (whose products of the float32 base are the bfloat16 base's, bit for bit, so
    nothing need be cast per step), else none. Full fine-tuning trains the base: always none (float32, a
    half-precision folder widened: AdamW's updates would round away on half-precision weights)."""
    if cfg.method != "lora":
        return "none"
    if cfg.quantize_base != "auto":
        return cfg.quantize_base
    if base is not None and half_dtype(base.header) is not None:
        return "half"
    return "bf16" if autocast_dtype(cfg.precision, device) == torch.bfloat16 else "none"


def _effective(cfg: TrainConfig, world_size: int) -> str:
    accumulated = f" x grad_accum_steps {cfg.grad_accum_steps}" if cfg.grad_accum_steps > 1 else ""
    return f"batch_size {cfg.batch_size} x {world_size} process{'es' if world_size > 1 else ''}{accumulated}"


def _check_effective_batch(cfg: TrainConfig, was: TrainConfig, was_world: int, world_size: int,
                           target: Path) -> None:  # fmt: skip
    """Refuse to resume with another number of rows per optimizer update (``batch_size x processes x
    grad_accum_steps``); the same rows split another way are the same update (update ``u`` reads rows
    ``[u E, (u + 1) E)`` of the epoch's order, whatever the split of ``E``), so ``was`` takes ``cfg``'s split."""
    rows = was.batch_size * was_world * was.grad_accum_steps
    if cfg.batch_size * world_size * cfg.grad_accum_steps != rows:
        split = world_size * cfg.grad_accum_steps
        if rows % split:
            keep = f"pass a --batch_size and --grad_accum_steps whose product is {rows / world_size:g}"
        else:
            keep = f"pass --batch_size {rows // split}" + (
                f" (with --grad_accum_steps {cfg.grad_accum_steps})" if cfg.grad_accum_steps > 1 else ""
            )
        raise CheckpointError(f"--resume {target.parent}: it was trained with a global batch of {rows} "
                              f"({_effective(was, was_world)}); with {world_size} process(es) {keep} to keep it")  # fmt: skip
    was.batch_size, was.grad_accum_steps = (
        cfg.batch_size,
        cfg.grad_accum_steps,
    )  # the same rows, split another way


def find_resume(cfg: TrainConfig, world_size: int = 1) -> tuple[Path | None, dict[str, Any]]:
    """``--resume``: a checkpoint file, a run folder (its newest checkpoint) or ``auto`` (this run's).

    Returns the checkpoint and its trainer state, or ``(None, {})`` when not resuming. A run may resume on
    another number of processes (``world_size``), with another ``batch_size`` or ``grad_accum_steps``, when
    the rows of one optimizer update stay the same.
    """
    if cfg.resume is None:
        return None, {}
    if cfg.resume == "auto":  # this config's run; an unfinished --overwrite of it comes first
        final = final_folder(cfg)
        latest = [
            c for p in final.parent.glob(f"{final.name}.incomplete-*") if (c := find_latest(p)) is not None
        ]
        target = max(latest, key=lambda c: c.stat().st_mtime).parent if latest else final
    else:
        target = Path(cfg.resume)
    if target.is_dir():
        latest = find_latest(target)
        if latest is None:
            raise CheckpointError(f"no checkpoint to resume from in {target}")
        target = latest
    elif not target.is_file():
        raise CheckpointError(f"checkpoint not found: {target}")
    state = read_trainer_state(target)  # truncated, corrupted or not one: one line, before any output
    saved = target.parent / "config.yaml"
    if not saved.is_file():  # a checkpoint records no settings: without them any task or rank would go on
        raise CheckpointError(f"--resume {target}: no config.yaml beside it (a run folder has one from its "
                              "start), so the settings it was trained with cannot be checked; resume from the "
                              "run folder it was written in")  # fmt: skip
    # the run's own settings: another task or rank would train something else
    was = resolve_config(load_yaml(saved), where=str(saved), yaml_is_a_run=True)
    _check_effective_batch(cfg, was, int(state.get("world_size", 1)), world_size, target)
    cfg.check_resume(was, f"--resume {target.parent}")
    if cfg.max_steps is not None and cfg.max_steps < int(state["step"]):  # (equal: the outputs are written)
        raise CheckpointError(f"--resume {target}: it is at step {state['step']}, past --max_steps {cfg.max_steps}: "
                              "give a larger --max_steps, or none")  # fmt: skip
    return target, state
