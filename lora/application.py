"""The training application: one run from a :class:`TrainConfig`, from the data to the run folder.

``run(cfg)`` is ``execute(plan_run(cfg))``: ``lora/plan.py`` resolves and checks every input first (output
folder, base, sequence width, checkpoint to resume, storage, memory, tokenizer), and only then does this
module act: tokenize the data, pretrain a missing default base, build the model from the resolved base,
take its fingerprint once, create the run folder, train (LoRA, or full fine-tuning), and write
config.yaml, history.json (and .csv), metrics.json, training_curves.png, the adapter or model, samples.txt,
and report.html (``lora/report.py``), the page that shows them together.
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

from lora.adapter_set import describe_trainable
from lora.base_model import ensure_base
from lora.chat_task import (
    ChatTask,
    LengthGroupedLoader,
    chat_samples,
    exact_match,
    exact_match_by_kind,
    generated_answers,
    load_chat_task,
)
from lora.config import CHAT_TASKS, TrainConfig
from lora.data import IGNORE, BatchLoader, Task, load_task
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
from lora.files import atomic_folder
from lora.fsdp import build_sharded_model, gather_trainable, is_sharded
from lora.lora_transformer import LoRATransformer
from lora.memory import peak_memory_mb, reset_peak_memory
from lora.plan import RunPlan, plan_run, resolve_or_refuse, storage_for
from lora.pretrained import BaseSource
from lora.report import write_run_report
from lora.run_folder import RunFolder, discard_unless_resumable, prepare_run_folder, publish, run_lock
from lora.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from lora.tracking import history_csv
from lora.trainer import LoRATrainer, Trainer, resolve_device

__all__ = ["RankError", "build_model", "execute", "run", "say"]


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
            # one line a row: a predicted newline or control byte shows as U+FFFD, as an invalid byte does
            row = ["".join(c if c.isprintable() else "\ufffd" for c in bytes(t[i][scored[i]].tolist()).decode("utf-8", "replace"))
                   for t in (x, y, base, adapted)]  # fmt: skip
            lines.append(" ".join(f"{c:<10}" for c in row) + (" ok" if row[1] == row[3] else ""))
        return "\n".join(lines) + "\n"
    # about 160 characters either way: 160 bytes, or 48 tokens of a BPE tokenizer (~4 characters each)
    length = 160 if isinstance(tokenizer, ByteTokenizer) else 48
    for prompt in ("def ", "import ", "class ", "The "):
        lines.append(f"=== prompt {prompt!r} (temperature 0.8, top-k 40, seed 0)")
        ids, special = tokenizer.encode(prompt, add_bos=True), tokenizer.special_tokens
        for adapted in (False, True):
            g = torch.Generator(device=device).manual_seed(0)
            idx = torch.tensor([ids], device=device)
            new = min(length, model.max_seq_len - len(ids))
            with contextlib.nullcontext() if adapted else model.disable_adapter():
                out = model.generate(
                    idx, new, temperature=0.8, top_k=40, generator=g, eos_token_id=special.eos_ids
                )
            # the text after BOS, up to the EOS where generation stopped
            text = tokenizer.decode(
                ids[len(special.prefix) :] + special.until_eos(out[0, len(ids) :].tolist())
            )
            lines += ["--- adapted:" if adapted else "--- base:", text]
        lines.append("")
    return "\n".join(lines) + "\n"


CPU = torch.device("cpu")


def build_model(
    cfg: TrainConfig,
    source: BaseSource,
    num_classes: int | None,
    device: torch.device = CPU,
    storage: str | None = None,
) -> LoRATransformer:
    """The model a run of ``cfg`` trains: the resolved base with this run's adapter (none for full
    fine-tuning) and head, its frozen base stored as ``storage`` says (default: :func:`~lora.plan.storage_for`
    ``device``): ``half`` keeps a half-precision folder as stored, ``none`` is float32 (such a folder widened
    while read, as for full fine-tuning), ``bf16``/``nf4`` narrow it; the adapter float32, its base-dependent
    start derived from the weights it trains on. What the training command, and any script that trains,
    builds."""
    lora = cfg.lora_config().to_dict() if cfg.method == "lora" else {"lora_r": 0}
    storage = storage_for(cfg, device, source) if storage is None else storage
    # training keeps float32 weights where they train or were asked for (bf16 is autocast's to use): a half
    # file is widened then, so that AdamW never works in half precision (its eps of 1e-8 is 0 in fp16)
    widen = torch.float32 if cfg.method == "full" or storage == "none" else None
    try:
        model = LoRATransformer.from_pretrained(
            source, base_dtype=widen, num_classes=num_classes, dropout=cfg.dropout, **lora
        )
    except ValueError as e:  # a missing, truncated or corrupted base: one line
        raise LoRAError(f"cannot load the base model: {e}") from None
    try:  # the frozen block weights in bf16 or 4 bits (QLoRA), the adapter in float32; or every weight trains
        model.prepare_training(cfg.method, "none" if storage == "half" else storage)
    except ValueError as e:  # a base whose weights do not tile the 4-bit blocks: one line
        raise ConfigError(f"quantize_base {storage}: {e}") from None
    # the fresh adapter's base-dependent start (DoRA's magnitudes, PiSSA/OLoRA's factors) from the weights it
    # trains on, where they are not the ones from_pretrained derived it from: 4-bit (as PEFT's QLoRA), so it
    # starts at that base's output. Not from a bf16 copy: its start stays the weights' as loaded, as on the
    # float32 base (whose products under autocast the bf16 base's equal), wherever a run or its resumption
    # happens to store the base
    if storage == "nf4":
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
    started = time.perf_counter()  # the run's time and peak memory count its plan too
    reset_peak_memory(device)
    if not place.enabled:
        return execute(plan_run(cfg, device), place, started=started)
    backend = start(place, device)
    try:
        metrics = execute(plan_run(cfg, device, place.world_size), place, backend, started)
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


def execute(
    plan: RunPlan, place: Distributed | None = None, backend: str | None = None, started: float | None = None
) -> dict[str, Any]:
    """Carry out ``plan`` (``lora/plan.py``), which has checked every input: the data, the default base if it
    is still to be made (by rank 0 under torchrun; the others wait), the model, training and the outputs.
    ``started``: when the run began (its ``wall_time_s`` counts from there; default now)."""
    cfg, device, place = plan.cfg, plan.device, place or from_environment()
    t_start = time.perf_counter() if started is None else started
    if started is None:
        reset_peak_memory(device)
    tell = say if place.is_main else _silent
    torch.manual_seed(cfg.seed)
    if cfg.task in CHAT_TASKS:  # conversations through the plan's chat template
        task = load_chat_task(cfg, plan.tokenizer, plan.chat_template)
        if task.dropped:
            tell(f"dropped {task.dropped} of {task.total} conversations longer than seq_len {cfg.seq_len} before "
                 "their first answer")  # fmt: skip
    else:
        task = load_task(cfg, tokenizer=plan.tokenizer)
    assert task.train.x.shape[1] == cfg.sequence_width, (task.train.x.shape, cfg.sequence_width)
    if place.is_main:  # rank 0 pretrains a missing default base; the others wait for it, then load it
        if plan.make_base:
            ensure_base(cfg, device, say)
        else:
            say(f"base model: {plan.base_dir} (reused)")
    barrier()  # every process has its data, and the base exists
    source = plan.base or resolve_or_refuse(plan.base_dir)  # the default base rank 0 has just made
    torch.manual_seed(cfg.seed)
    if cfg.fsdp:  # each process reads and keeps only its rows of the base (lora/fsdp.py)
        model, fingerprint = build_sharded_model(cfg, source, task.num_classes, device, plan.storage)
    else:
        model = build_model(cfg, source, task.num_classes, device, plan.storage)
        fingerprint = model.base_fingerprint()
    resume, resume_state, tokenizer, base_dir = plan.resume, plan.resume_state, plan.tokenizer, plan.base_dir
    check_same(fingerprint, "the base's fingerprint")  # every process holds the same frozen base
    saved = resume_state.get("base_fingerprint")
    if saved not in (None, fingerprint):
        raise CheckpointError(f"checkpoint {resume} was trained on other base weights (fingerprint {saved}, "
                              f"this base {fingerprint}); resume with the run's own base_checkpoint")  # fmt: skip
    if place.enabled:
        how = "fully sharded (FSDP2)" if cfg.fsdp else "data parallel"
        tell(f"{how}: {place.world_size} processes ({backend}), global batch {cfg.batch_size} x "
             f"{place.world_size} = {cfg.batch_size * place.world_size} sequences a step")  # fmt: skip
    if cfg.grad_accum_steps > 1:
        rows = cfg.batch_size * place.world_size
        tell(f"gradient accumulation: one update from {cfg.grad_accum_steps} micro-batches of {rows} sequences = "
             f"{rows * cfg.grad_accum_steps} sequences")  # fmt: skip
    if not place.is_main:  # rank 0 alone writes: the others train, evaluate and agree
        return _train_and_write(cfg, task, model, device, None, None, resume, base_dir, fingerprint, t_start,
                                tokenizer, place)  # fmt: skip
    # only now that every input is checked: a typo touches no folder
    folder, final = prepare_run_folder(cfg, resume, plan.final)
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
        if isinstance(tokenizer, HFTokenizer):  # the run's text is read back with the tokenizer that made it,
            for file, data in tokenizer.run_files().items():  # and its special tokens
                out.write(file, data)
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
    shard = {"rank": place.rank, "world_size": place.world_size}
    chat = isinstance(task, ChatTask)
    train_loader = (LengthGroupedLoader if chat else BatchLoader)(
        task.train, cfg.batch_size, seed=cfg.seed, **shard
    )
    chat_info: dict[str, Any] = {}
    if chat:
        padding, total = train_loader.padding()
        share = 100 * padding / max(total, 1)
        tell(f"padding: {share:.1f} % of the tokens" + (" (packed rows)" if cfg.packing else "") +
             f"; chat template: {task.template.source}")  # fmt: skip
        chat_info = {"padding_percent": share, "chat_template": task.template.source, "packing": cfg.packing,
                     "dropped_conversations": task.dropped, "conversations": task.total}  # fmt: skip
        if writes and resume is None:
            out.write("chat_template.jinja", task.template.text)
    trainer = kind(model, train_loader,
                   BatchLoader(task.val, cfg.batch_size, shuffle=False, **shard), cfg, device=str(device),
                   metric_name=task.metric_name, run_dir=folder, label=label, quiet=not writes,
                   distributed=place)  # fmt: skip
    stats = model.get_parameter_stats()
    tell(f"{cfg.method}: training {describe_trainable(stats)} on {device}")
    trainer.run_info.update(base_fingerprint=fingerprint, world_size=place.world_size)
    base_eval = trainer.evaluate(max_batches=0)
    tell(f"frozen base on '{task.name}': {task.metric_name} {base_eval['metric']:.4f}")
    # generating goes through the whole base: a sharded one would need every process at each token
    generates = not is_sharded(model)
    if not generates and (chat or not task.is_classification):
        tell("--fsdp: no samples.txt and no generated answers (each token would take every process)")
    # the frozen base's answers, generated (before training moves the adapter)
    if chat and writes and generates:
        model.eval()
        with model.disable_adapter():
            base_answers = generated_answers(model, task, tokenizer, device)
        chat_info["base_generated_exact_match"] = exact_match(base_answers, task)
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
    gather_trainable(model)  # sharded: the adapter whole in every process (a collective), for rank 0 to write
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
        model.save_adapter(folder, extra=extra, base_fingerprint=fingerprint)
    else:
        out.write_model(model, "model")
    early = trainer.early_stopping
    if early is not None and early.best_step is not None:  # the best weights beside the last, in best/
        with early.best_loaded(trainer.trainable_weights()):
            if cfg.method == "lora":
                with atomic_folder(folder / "best") as best:
                    model.save_adapter(
                        best,
                        extra={**extra, "best_step": early.best_step, "best_val_loss": early.best_loss},
                        base_fingerprint=fingerprint,
                    )
            else:
                out.write_model(model, "best")
    out.write("history.json", trainer.history)
    out.write("history.csv", history_csv(trainer.history))
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
        "global_batch_size": cfg.batch_size * place.world_size, **trainer.summary(),
    }  # fmt: skip
    if chat and not generates:
        metrics.update(chat_info)
    if chat and generates:  # the adapted model's answers beside the base's
        model.eval()
        answers = generated_answers(model, task, tokenizer, device)
        chat_info["generated_exact_match"] = exact_match(answers, task)
        tell(f"held-out answers generated: exact match {chat_info['generated_exact_match']:.1%} (frozen base "
             f"{chat_info['base_generated_exact_match']:.1%})")  # fmt: skip
        if kinds := exact_match_by_kind(answers, task):  # the built-in instructions, kind by kind
            chat_info["generated_exact_match_by_kind"] = kinds
            tell("  by kind: " + ", ".join(f"{k} {v:.0%}" for k, v in kinds.items()))
        metrics.update(chat_info)
        out.write("samples.txt", chat_samples(base_answers, answers, task))
    out.write("metrics.json", metrics)
    if not task.is_classification and not chat and generates:
        out.write("samples.txt", samples(model, task, device, tokenizer))
    try:  # last: a view of the files above, whose failure must not cost the run they hold
        write_run_report(folder, final)
    except Exception as e:  # any failure: the run is done, so say so in one line
        tell(f"warning: report.html not written: {one_line(e)}")
    return metrics
