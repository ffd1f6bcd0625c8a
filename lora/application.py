"""The training application: one run from a :class:`TrainConfig`, from the data to the run folder.

It checks every input first (config, data, base, checkpoint to resume), only then creates the run folder,
trains (LoRA, or full fine-tuning), and writes config.yaml, history.json, metrics.json,
training_curves.png, the adapter or model, and samples.txt.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from lora.base_model import base_dir_for, ensure_base
from lora.checkpoint import find_latest, read_trainer_state
from lora.config import TrainConfig, load_yaml, resolve_config
from lora.data import IGNORE, VOCAB_SIZE, BatchLoader, Task, load_task
from lora.distributed import (
    Distributed,
    PeerFailedError,
    barrier,
    check_same,
    from_environment,
    peer_failure,
    post_failure,
    start,
    stop,
)
from lora.errors import CheckpointError, ConfigError, Interrupted, LoRAError, exit_code, one_line
from lora.formats import WEIGHTS_NAME
from lora.lora_transformer import LoRATransformer
from lora.memory import check_memory, peak_memory_mb, reset_peak_memory
from lora.model_config import ModelConfig
from lora.quantize import check_tiles
from lora.run_folder import (
    RunFolder,
    discard_unless_resumable,
    output_root,
    prepare_run_folder,
    publish,
    run_folder_name,
    run_lock,
)
from lora.tokenizer import TOKENIZER_NAME, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from lora.trainer import LoRATrainer, Trainer, autocast_dtype, resolve_device

__all__ = ["RankError", "find_resume", "run", "say"]


def say(message: str) -> None:
    """A progress message on stderr (kept apart from the progress bar)."""
    tqdm.write(message, file=sys.stderr)


def _silent(message: str) -> None:
    """What the processes other than rank 0 say: nothing (rank 0 speaks for the run)."""


class RankError(LoRAError):
    """A failure in one process of a data-parallel run, named with its rank (the exit code is kept)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code


def find_resume(cfg: TrainConfig, world_size: int = 1) -> tuple[Path | None, dict[str, Any]]:
    """``--resume``: a checkpoint file, a run folder (its newest checkpoint) or ``auto`` (this run's).

    Returns the checkpoint and its trainer state, or ``(None, {})`` when not resuming. A run may resume on
    another number of processes (``world_size``) when the global batch stays the same.
    """
    if cfg.resume is None:
        return None, {}
    if cfg.resume == "auto":  # this config's run; an unfinished --overwrite of it comes first
        final = output_root(cfg.output_dir) / run_folder_name(cfg)
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
    was_world = int(state.get("world_size", 1))
    if was_world != world_size or was.batch_size != cfg.batch_size:
        global_batch = was.batch_size * was_world
        if cfg.batch_size * world_size != global_batch:
            raise CheckpointError(
                f"--resume {target.parent}: it was trained with a global batch of {global_batch} "
                f"(batch_size {was.batch_size} x {was_world} processes); with {world_size} process(es) "
                f"pass --batch_size {global_batch / world_size:g} to keep it"
            )
        was.batch_size = cfg.batch_size  # the same global batch, split another way
    cfg.check_resume(was, f"--resume {target.parent}")
    if cfg.max_steps is not None and cfg.max_steps < int(state["step"]):  # (equal: the outputs are written)
        raise CheckpointError(f"--resume {target}: it is at step {state['step']}, past --max_steps {cfg.max_steps}: "
                              "give a larger --max_steps, or none")  # fmt: skip
    return target, state


def samples(
    model: LoRATransformer, task: Task, device: torch.device, tokenizer: Tokenizer | None = None
) -> str:
    """What the frozen base and the adapted model produce on the same inputs, side by side (text decoded
    with ``tokenizer``, default bytes)."""
    tokenizer = tokenizer or ByteTokenizer()
    model.eval()
    lines = [f"# {task.description}", "# the frozen base vs base + adapter, on the same inputs", ""]
    if task.metric_name == "exact_match":  # read the inputs, show the predicted answer letters
        x, y = task.val.x[:12].long().to(device), task.val.y[:12].long().to(device)
        scored = y != IGNORE
        with torch.no_grad(), model.disable_adapter():
            base = model(x).argmax(-1)
        with torch.no_grad():
            adapted = model(x).argmax(-1)
        lines.append(f"{'input':<10} {'expected':<10} {'base':<10} {'adapted':<10}")
        for i in range(x.shape[0]):
            row = [bytes(t[i][scored[i]].tolist()).decode("utf-8", "replace") for t in (x, y, base, adapted)]
            lines.append(" ".join(f"{c:<10}" for c in row) + (" ok" if row[1] == row[3] else ""))
        return "\n".join(lines) + "\n"
    # about 160 characters either way: 160 bytes, or 48 tokens of a BPE tokenizer (~4 characters each)
    length = 160 if isinstance(tokenizer, ByteTokenizer) else 48
    for prompt in ("def ", "import ", "class ", "The "):
        lines.append(f"=== prompt {prompt!r} (temperature 0.8, top-k 40, seed 0)")
        ids = tokenizer.encode(prompt)
        for adapted in (False, True):
            g = torch.Generator(device=device).manual_seed(0)
            idx = torch.tensor([ids], device=device)
            new = min(length, model.max_seq_len - len(ids))
            with contextlib.nullcontext() if adapted else model.disable_adapter():
                out = model.generate(idx, new, temperature=0.8, top_k=40, generator=g)
            text = tokenizer.decode(out[0].tolist())
            lines += ["--- adapted:" if adapted else "--- base:", text]
        lines.append("")
    return "\n".join(lines) + "\n"


def _given_base(cfg: TrainConfig) -> ModelConfig | None:
    """The architecture of a given base folder, its config.json checked against its weights once (a bad
    folder: one line); ``None`` for the default base, or a folder that does not exist (reported when the
    base is looked for)."""
    if cfg.base_checkpoint == "auto" or not Path(cfg.base_checkpoint).is_dir():
        return None
    try:
        options, _ = LoRATransformer.check_pretrained(cfg.base_checkpoint, lora_r=0)
    except ValueError as e:
        raise LoRAError(f"cannot load the base model: {e}") from None
    return ModelConfig(**{k: options[k] for k in ModelConfig.__dataclass_fields__})


def _check_memory(cfg: TrainConfig, base: ModelConfig | None, device: torch.device) -> None:
    """Refuse a run that cannot fit in memory, from the base's architecture (a base to pretrain: the
    config's; a given one: ``base``)."""
    if cfg.base_checkpoint == "auto":
        arch, pretraining = cfg.model_config(VOCAB_SIZE), not (base_dir_for(cfg) / WEIGHTS_NAME).is_file()
    elif base is None:  # no such folder: ensure_base says so
        return
    else:
        arch, pretraining = base, False
    check_memory(cfg, arch, pretraining, device)


def _check_quantization(cfg: TrainConfig, base: ModelConfig | None) -> None:
    """Refuse ``--quantize_base`` for an architecture whose weights do not tile its blocks, before a base is
    pretrained or loaded (``base``: the given base's architecture; ``None``: the one pretrained here)."""
    if cfg.quantize_base != "nf4" or cfg.method != "lora":
        return
    arch = base or cfg.model_config(vocab_size=1)
    try:  # the block weights' shapes: attention (q, k, v, o) and MLP (fc1, fc2; fc2's has fc1's count)
        check_tiles({"attention": (arch.d_model, arch.d_model), "MLP": (arch.d_ff, arch.d_model)})
    except ValueError as e:
        raise ConfigError(f"quantize_base {cfg.quantize_base}: {e}") from None


def _tokenizer(cfg: TrainConfig, base: ModelConfig | None) -> Tokenizer:
    """The base's tokenizer: bytes for a base made here, else the base folder's own."""
    return ByteTokenizer() if base is None else load_tokenizer(cfg.base_checkpoint, base.vocab_size)


CPU = torch.device("cpu")


def base_storage(cfg: TrainConfig, device: torch.device) -> str:
    """How the run stores its frozen base (``--quantize_base``): as given, and ``auto`` resolved to bf16 where
    LoRA trains under bf16 autocast (whose products of the float32 base are the bfloat16 base's, bit for bit,
    so nothing need be cast per step), else none."""
    if cfg.quantize_base != "auto":
        return cfg.quantize_base
    bf16 = cfg.method == "lora" and autocast_dtype(cfg.precision, device) == torch.bfloat16
    return "bf16" if bf16 else "none"


def _load_base(cfg: TrainConfig, base_dir: Path, task: Task, device: torch.device = CPU) -> LoRATransformer:
    """The base with this run's adapter (none for full fine-tuning) and head, stored as :func:`base_storage`
    says for ``device``."""
    lora = cfg.lora_config().to_dict() if cfg.method == "lora" else {"lora_r": 0}
    try:
        model = LoRATransformer.from_pretrained(
            base_dir, num_classes=task.num_classes, dropout=cfg.dropout, **lora
        )
    except ValueError as e:  # a missing, truncated or corrupted base: one line
        raise LoRAError(f"cannot load the base model: {e}") from None
    # training keeps float32 weights (bf16 is autocast's to use): an fp16 or bf16 file is widened, so that
    # the adapter and AdamW never work in half precision (AdamW's eps of 1e-8 is 0 in fp16)
    widened = model.wte.weight.dtype != torch.float32
    model = model.float()
    storage = base_storage(cfg, device)
    if storage != "none":  # the frozen block weights in bf16 or 4 bits (QLoRA), the adapter in float32
        model.configure_lora_training()
        try:
            model.quantize_base(storage)
        except ValueError as e:  # a base whose weights do not tile the 4-bit blocks: one line
            raise ConfigError(f"quantize_base {storage}: {e}") from None
    # the fresh adapter's base-dependent start (DoRA's magnitudes, PiSSA/OLoRA's factors) from the weights
    # it trains on, where they are not the ones from_pretrained derived it from: widened to float32, or 4-bit
    # (as PEFT's QLoRA), so it starts at that base's output. Not from a bf16 copy: its start stays the float32
    # weights', as on the float32 base (whose products under autocast the bf16 base's equal), wherever a run
    # or its resumption happens to store the base
    if widened or storage == "nf4":
        model.init_adapter_from_base()
    return model


def _device(cfg: TrainConfig, place: Distributed) -> torch.device:
    """The run's device; data parallel on GPUs, each process takes ``cuda:<LOCAL_RANK>``."""
    device = resolve_device(cfg.device)
    if not place.enabled or device.type != "cuda":
        return device
    if cfg.device.startswith("cuda:"):
        raise ConfigError(f"--device {cfg.device} with torchrun: each process uses cuda:<LOCAL_RANK>; "
                          "pass --device cuda or auto (CUDA_VISIBLE_DEVICES picks the GPUs)")  # fmt: skip
    return torch.device("cuda", place.local_rank)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """The whole job: data, base, model, training, and the run folder. Returns metrics.json's content.

    Started by ``torchrun``, it is one process of a data-parallel run (``lora/distributed.py``): a failure
    is named with its rank and posted for the others, which then stop too (:class:`PeerFailedError`).
    """
    place = from_environment()
    device = _device(cfg, place)
    if not place.enabled:
        return _run(cfg, place, device)
    backend = start(place, device)
    try:
        metrics = _run(cfg, place, device, backend)
        barrier()  # the others wait for rank 0's writing: all leave the process group together
    except (Interrupted, PeerFailedError):
        raise
    except BaseException as e:
        peer = peer_failure()
        if peer is not None and not isinstance(e, (LoRAError, OSError)):
            raise peer from None  # a collective broke because that process failed first
        if isinstance(e, KeyboardInterrupt):  # torchrun stopping this process (Ctrl-C, or a peer failed)
            raise
        message = f"rank {place.rank}: {one_line(e)}"
        post_failure(message, exit_code(e))
        raise RankError(message, exit_code(e)) from e
    stop()
    return metrics


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _run(
    cfg: TrainConfig, place: Distributed, device: torch.device, backend: str | None = None
) -> dict[str, Any]:
    t_start = time.perf_counter()
    reset_peak_memory(device)
    tell = say if place.is_main else _silent
    base = _given_base(cfg)
    _check_quantization(cfg, base)
    _check_memory(cfg, base, device)  # before the data or a model is made
    tokenizer = _tokenizer(cfg, base)
    torch.manual_seed(cfg.seed)
    task = load_task(cfg, tokenizer=tokenizer)
    resume, resume_state = find_resume(cfg, place.world_size)
    if place.is_main:  # rank 0 pretrains a missing default base; the others wait for it, then load it
        ensure_base(cfg, device, say)
    barrier()  # every process has its data, and the base exists
    base_dir = base_dir_for(cfg)
    torch.manual_seed(cfg.seed)
    model = _load_base(cfg, base_dir, task, device)
    width = task.train.x.shape[1]
    if width > model.max_seq_len:
        raise ConfigError(f"seq_len {width} exceeds the base model's max_seq_len {model.max_seq_len}")
    fingerprint = model.base_fingerprint()
    check_same(fingerprint, "the base's fingerprint")  # every process holds the same frozen base
    saved = resume_state.get("base_fingerprint")
    if saved not in (None, fingerprint):
        raise CheckpointError(f"checkpoint {resume} was trained on other base weights (fingerprint {saved}, "
                              f"this base {fingerprint}); resume with the run's own base_checkpoint")  # fmt: skip
    if place.enabled:
        tell(f"data parallel: {place.world_size} processes ({backend}), global batch {cfg.batch_size} x "
             f"{place.world_size} = {cfg.batch_size * place.world_size} sequences a step")  # fmt: skip
    if not place.is_main:  # rank 0 alone writes: the others train, evaluate and agree
        return _train_and_write(cfg, task, model, device, None, None, resume, base_dir, fingerprint, t_start,
                                tokenizer, place)  # fmt: skip
    # only now that every input is checked: a typo touches no folder
    folder, final = prepare_run_folder(cfg, resume)
    say(f"run folder: {folder}" + (f" (replaces {final} when it succeeds)" if final != folder else ""))
    if final != folder:
        say(f"if this run stops, continue it with --resume {folder}")
    # a run writing in place holds its folder's lock: an --overwrite of the same name waits to swap in
    wait = lambda: say(f"waiting for another run that is writing {final} ...")  # noqa: E731
    in_place = run_lock(final, wait) if folder == final else contextlib.nullcontext()
    try:
        with in_place:
            metrics = _train_and_write(
                cfg,
                task,
                model,
                device,
                folder,
                final,
                resume,
                base_dir,
                fingerprint,
                t_start,
                tokenizer,
                place,
            )
    except BaseException:
        if resume is None:  # nothing of a failed new run is left but a checkpoint to resume from
            discard_unless_resumable(folder)
        raise
    publish(folder, final)
    peak = "" if metrics["peak_memory_mb"] is None else f" (peak memory {metrics['peak_memory_mb']:,.0f} MiB)"
    say(f"done in {metrics['wall_time_s']:.1f} s{peak}; outputs in {final}")
    return metrics


def _train_and_write(cfg: TrainConfig, task: Task, model: LoRATransformer, device: torch.device,
                     folder: Path | None, final: Path | None, resume: Path | None, base_dir: Path, fingerprint: str,
                     t_start: float, tokenizer: Tokenizer, place: Distributed) -> dict[str, Any]:  # fmt: skip
    """Train in ``folder`` and write every output there (``final`` is the name the run will have); the
    processes of a data-parallel run other than rank 0 get no folder and write nothing."""
    writes = folder is not None
    tell = say if writes else _silent
    out = RunFolder(folder) if writes else None
    if writes and resume is None:
        out.write("config.yaml", yaml.safe_dump({**cfg.to_saved(), "run_name": final.name}, sort_keys=False))
        if isinstance(tokenizer, HFTokenizer):  # the run's text is read back with the tokenizer that made it
            out.write(TOKENIZER_NAME, tokenizer.to_json())
    model.gradient_checkpointing = cfg.gradient_checkpointing
    targets = ",".join(cfg.lora_targets) + (",ff" if cfg.adapt_feedforward else "")
    name = final.name if writes else f"rank {place.rank}"
    if cfg.method == "lora":
        variant = "".join(
            [", DoRA" if cfg.use_dora else "", f", init {cfg.lora_init}" if cfg.lora_init != "kaiming" else "",
             f", LoRA+ x{cfg.lora_plus_ratio:g}" if cfg.lora_plus_ratio != 1 else "",
             f", {model.base_quantization} base" if model.base_quantization else ""]
        )  # fmt: skip
        kind = LoRATrainer
        label = f"{name}: r={cfg.lora_r}, alpha={cfg.lora_alpha:g}, targets={targets}{variant}"
    else:
        kind, label = Trainer, f"{name}: full fine-tuning"
        model.requires_grad_(True)
    shard = {"rank": place.rank, "world_size": place.world_size}
    trainer = kind(model, BatchLoader(task.train, cfg.batch_size, seed=cfg.seed, **shard),
                   BatchLoader(task.val, cfg.batch_size, shuffle=False, **shard), cfg, device=str(device),
                   metric_name=task.metric_name, run_dir=folder, label=label, quiet=not writes,
                   distributed=place)  # fmt: skip
    stats = model.get_parameter_stats()
    tell(f"{cfg.method}: training {stats['trainable_params']:,} of {stats['total_params']:,} parameters "
        f"({stats['trainable_percent']:.2f}%, {stats['reduction_factor']:.0f}x fewer) on {device}")  # fmt: skip
    trainer.run_info.update(base_fingerprint=fingerprint, world_size=place.world_size)
    base_eval = trainer.evaluate(max_batches=0)
    tell(f"frozen base on '{task.name}': {task.metric_name} {base_eval['metric']:.4f}")
    if resume is not None:
        trainer.resume_from(resume)
    try:
        trainer.train()
    except Interrupted as e:
        e.checkpoint = e.checkpoint or trainer.last_checkpoint
        raise
    result = trainer.evaluate(max_batches=0)
    tell(f"adapted on '{task.name}': {task.metric_name} {result['metric']:.4f} "
        f"(frozen base {base_eval['metric']:.4f})")  # fmt: skip
    if not writes:
        return {"final_metric": result["metric"], "steps": trainer.step}
    extra = {
        "task": task.name,
        "run_name": final.name,
        "base_checkpoint": str(base_dir),
        "labels": task.labels,
        "tokenizer": tokenizer.name,
    }
    if cfg.method == "lora":
        model.save_adapter(folder, extra=extra)
    else:
        out.write_model(model, "model")
    out.write("history.json", trainer.history)
    trainer.plot_training_history(base_metric=base_eval["metric"])
    tps = trainer.history["tokens_per_s"]
    metrics = {
        "method": cfg.method, "task": task.name, "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better, "base_metric": base_eval["metric"],
        "final_metric": result["metric"], "base_val_loss": base_eval["val_loss"], "final_val_loss": result["val_loss"],
        "total_params": stats["total_params"], "trainable_params": stats["trainable_params"],
        "lora_params": stats["lora_params"], "reduction_factor": stats["reduction_factor"],
        "steps": trainer.step, "wall_time_s": time.perf_counter() - t_start,
        "tokens_per_s": tps[-1] if tps else None, "device": str(device), "base_checkpoint": str(base_dir),
        "base_fingerprint": fingerprint, "tokenizer": tokenizer.name,
        "peak_memory_mb": _round(peak_memory_mb(device)), "world_size": place.world_size,
        "global_batch_size": cfg.batch_size * place.world_size,
    }  # fmt: skip
    out.write("metrics.json", metrics)
    if not task.is_classification:
        out.write("samples.txt", samples(model, task, device, tokenizer))
    return metrics
