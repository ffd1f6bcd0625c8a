"""Train a LoRA adapter (or fine-tune fully) from the command line: the main job.

    python lora/train_lora.py                              # the default task (reverse), defaults
    python lora/train_lora.py --lora_r 16 --lora_targets q,k,v,o
    python lora/train_lora.py --config configs/code.yaml --max_steps 200
    python lora/train_lora.py --task text --train_file my.txt
    python lora/train_lora.py --resume runs/reverse-lora-r8   # continue an interrupted run exactly

The first run pretrains the task's base model (full training, once) under ``runs/bases/``; every later run
reuses it. Each run writes ``runs/<run_name>/``: config.yaml, history.json, metrics.json,
training_curves.png, the adapter, samples.txt (language models) and checkpoints if asked for.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

if __package__ in (None, ""):  # `python lora/train_lora.py` or `cd lora && python train_lora.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora.adapters import atomic_write_bytes, base_fingerprint, save_adapter, save_pretrained
from lora.checkpoint import CheckpointError, find_latest, load_checkpoint, read_trainer_state, save_checkpoint
from lora.config import ConfigError, LoRAError, TrainConfig, load_config
from lora.data import IGNORE, VOCAB_SIZE, Task, TaskData, base_task_of, load_task
from lora.lora_transformer import LoRATransformer
from lora.plotting import render_history

__all__ = ["BatchLoader", "LoRATrainer", "RunOutput", "batch_loss", "evaluate_model", "get_lr", "main", "run"]


class DivergenceError(LoRAError):
    """A non-finite loss or gradient."""

    exit_code = 3


class Interrupted(Exception):  # noqa: N818 - a control signal, not an error
    """SIGINT / SIGTERM: the run stopped after a step and wrote a checkpoint."""

    def __init__(self, checkpoint: Path | None) -> None:
        super().__init__("interrupted")
        self.checkpoint = checkpoint


def get_lr(step: int, peak: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Learning rate for optimizer step ``step`` (1-based): linear warmup, then cosine to 10% or constant."""
    if warmup and step <= warmup:
        return peak * step / warmup
    if schedule == "constant" or total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for a missing device is a :class:`ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but no CUDA GPU is available (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps was asked for, but MPS is not available (try --device cpu)")
    return torch.device(name)


class BatchLoader:
    """Batches of a :class:`TaskData` in a order fixed by ``(seed, epoch)``, so a run can resume mid-epoch.

    Training loaders shuffle and drop the last partial batch; evaluation loaders keep the order and all rows.
    """

    def __init__(self, data: TaskData, batch_size: int, shuffle: bool = True, seed: int = 0) -> None:
        self.data, self.batch_size, self.shuffle, self.seed = data, batch_size, shuffle, seed

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.shuffle else math.ceil(n / self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.data)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        else:
            order = torch.arange(n)
        for b in range(start, len(self)):
            yield self.data.batch(order[b * self.batch_size : (b + 1) * self.batch_size])


class RunOutput:
    """Every write of a run (files, checkpoints, the progress bar and messages) goes through here.

    ``enabled=False`` (for example on non-zero ranks under ``torchrun``) makes all of it silent.
    ``folder=None`` keeps the messages and progress bar but writes no files.
    """

    def __init__(self, folder: Path | None = None, enabled: bool = True) -> None:
        self.folder, self.enabled = folder, enabled

    def say(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def progress(self, total: int, initial: int, desc: str) -> tqdm:
        interval = 0.5 if sys.stderr.isatty() else 15.0  # a log file gets a line every 15 s, not a flood
        return tqdm(total=total, initial=initial, desc=desc, disable=not self.enabled, dynamic_ncols=True,
                    mininterval=interval, leave=True)  # fmt: skip

    def write(self, name: str, data: bytes | str | dict) -> Path | None:
        if not (self.enabled and self.folder):
            return None
        if isinstance(data, dict):
            data = json.dumps(data, indent=2, allow_nan=True) + "\n"
        path = self.folder / name
        atomic_write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)
        return path

    def checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int):
        if not (self.enabled and self.folder):
            return None
        return save_checkpoint(self.folder, model, optimizer, state, keep)

    def model(self, model: LoRATransformer, path: Path) -> None:
        """A whole model folder, written to a temporary folder and renamed: it appears complete or not at all."""
        if not self.enabled:
            return
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)

    def adapter(self, model: LoRATransformer, extra: dict) -> None:
        if self.enabled and self.folder:
            save_adapter(model, self.folder, extra=extra)


def batch_loss(
    forward: Callable[..., torch.Tensor],
    batch: dict[str, torch.Tensor],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (mean over scored tokens, in float32) and the logits of one batch."""
    x = batch["x"].to(device, non_blocking=True)
    y = batch["y"].to(device, non_blocking=True)
    extra = {"lengths": batch["lengths"].to(device)} if "lengths" in batch else {}
    with autocast():
        logits = forward(x, **extra).float()  # (B, T, vocab) or, classifying, (B, classes)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE)
    return loss, logits


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    loader: BatchLoader,
    metric_name: str,
    device: torch.device | str = "cpu",
    max_batches: int = 0,
    forward: Callable[..., torch.Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """``val_loss`` (nats per scored token) and ``metric`` over ``loader`` (``max_batches`` 0: all).

    ``exact_match`` counts rows whose scored tokens are all right (greedy decoding then gets them right
    too); ``accuracy`` counts right labels; ``bits_per_byte`` is the loss over ln 2 (byte-level tokens).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum, tokens, correct, rows = 0.0, 0, 0, 0
    for b, batch in enumerate(loader.batches()):
        if max_batches and b >= max_batches:
            break
        loss, logits = batch_loss(forward if forward is not None else model, batch, device, autocast)
        y = batch["y"].to(device)
        scored = (y != IGNORE).sum().item()
        loss_sum += loss.item() * scored
        tokens += scored
        pred = logits.argmax(dim=-1)
        if metric_name == "exact_match":
            correct += ((pred == y) | (y == IGNORE)).all(dim=1).sum().item()
        else:
            correct += (pred == y).sum().item()
        rows += y.shape[0]
    model.train(was_training)
    val_loss = loss_sum / max(tokens, 1)
    metric = {"bits_per_byte": val_loss / math.log(2), "exact_match": correct / max(rows, 1),
              "accuracy": correct / max(rows, 1)}[metric_name]  # fmt: skip
    return {"val_loss": val_loss, "metric": metric}


class LoRATrainer:
    """AdamW over the trainable parameters only, warmup + cosine (or constant) schedule, gradient clipping,
    bf16 autocast on CUDA, periodic evaluation, atomic checkpoints and exact resume.

    ``model`` is a :class:`LoRATransformer` whose ``requires_grad`` flags already say what trains
    (``configure_lora_training()`` for LoRA). Loaders are :class:`BatchLoader` objects.
    """

    def __init__(
        self,
        model: LoRATransformer,
        train_loader: BatchLoader,
        val_loader: BatchLoader,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        epochs: int = 1,
        max_steps: int | None = None,
        warmup_steps: int = 0,
        lr_schedule: str = "cosine",
        grad_clip: float = 1.0,
        eval_every: int = 50,
        eval_batches: int = 8,
        metric_name: str = "bits_per_byte",
        device: torch.device | str | None = None,
        precision: str = "auto",
        compile: bool = False,
        save_every: int = 0,
        keep_checkpoints: int = 2,
        output: RunOutput | None = None,
        label: str = "training",
    ) -> None:
        self.device = torch.device(device) if device is not None else resolve_device("auto")
        self.model = model.to(self.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.lr, self.warmup, self.schedule, self.grad_clip = (
            learning_rate,
            warmup_steps,
            lr_schedule,
            grad_clip,
        )
        self.epochs, self.eval_every, self.eval_batches = epochs, eval_every, eval_batches
        self.metric_name, self.save_every, self.keep = metric_name, save_every, keep_checkpoints
        self.out, self.label = output or RunOutput(), label
        self.total_steps = epochs * len(train_loader)
        if max_steps is not None:
            self.total_steps = min(self.total_steps, max_steps)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (call configure_lora_training() first)")
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=weight_decay,
                                           betas=(0.9, 0.999), fused=fused or None)  # fmt: skip
        use_bf16 = precision == "bf16" or (
            precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.forward = torch.compile(model) if compile else model
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.history: dict[str, list] = {k: [] for k in ("step", "epoch", "train_loss", "val_loss", "metric",
                                                        "lr", "tokens_per_s", "elapsed_s")}  # fmt: skip
        self._stop_signal: int | None = None
        self.last_checkpoint: Path | None = None
        self.run_info: dict[str, Any] = {}  # JSON kept in every checkpoint: run() puts the base fingerprint

    # ----------------------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _loss_and_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_loss(self.forward, batch, self.device, self._autocast)

    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Validation loss (mean nats per scored token) and the task metric."""
        limit = self.eval_batches if max_batches is None else max_batches
        return evaluate_model(self.model, self.val_loader, self.metric_name, self.device, limit,
                              forward=self.forward, autocast=self._autocast)  # fmt: skip

    def _state(self) -> dict[str, Any]:
        epoch, batch = self.epoch, self.batch_in_epoch
        if batch >= len(self.train_loader):
            epoch, batch = epoch + 1, 0
        return {"step": self.step, "epoch": epoch, "batch_in_epoch": batch, "history": self.history,
                **self.run_info}  # fmt: skip

    def save_checkpoint(self) -> Path | None:
        path = self.out.checkpoint(self.model, self.optimizer, self._state(), self.keep)
        self.last_checkpoint = path or self.last_checkpoint
        return path

    def resume_from(self, path: Path) -> None:
        """Continue exactly where the checkpoint at ``path`` left off."""
        state = load_checkpoint(path, self.model, self.optimizer)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.history = state["history"]
        self.last_checkpoint = path
        self.out.say(
            f"resumed from {path} at step {self.step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch})"
        )

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_signal = signum
        self.out.say(f"{signal.Signals(signum).name}: finishing this step, then writing a checkpoint ...")

    def train(self, epochs: int | None = None) -> dict[str, list]:
        """Train until ``epochs`` (default: the constructor's) or ``max_steps``; return the history."""
        if epochs is not None:
            self.epochs = epochs
            self.total_steps = min(self.total_steps, epochs * len(self.train_loader))
        handlers = {}
        if torch.multiprocessing.current_process().name == "MainProcess":
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._train_loop()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return self.history

    def _train_loop(self) -> None:
        self.model.train()
        bar = self.out.progress(self.total_steps, self.step, self.label)
        elapsed = self.history["elapsed_s"][-1] if self.history["elapsed_s"] else 0.0
        tokens = 0
        train_time = 0.0
        try:
            while self.step < self.total_steps:
                for batch in self.train_loader.batches(self.epoch, self.batch_in_epoch):
                    t0 = time.perf_counter()
                    lr = get_lr(self.step + 1, self.lr, self.warmup, self.total_steps, self.schedule)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    loss, _ = self._loss_and_logits(batch)
                    if not torch.isfinite(loss):
                        raise self._diverged("loss", loss.item())
                    loss.backward()
                    # with clipping off, max_norm inf only measures (the grads are scaled by exactly 1)
                    norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or math.inf)
                    if not torch.isfinite(norm):
                        raise self._diverged("gradient norm", norm.item())
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    loss_value = loss.item()  # waits for the device: the step's time is complete
                    dt = time.perf_counter() - t0
                    self.step += 1
                    self.batch_in_epoch += 1
                    tokens += batch["x"].numel()
                    train_time += dt
                    elapsed += dt
                    evaluation = {"val_loss": None, "metric": None}
                    if self.step % self.eval_every == 0 or self.step == self.total_steps:
                        evaluation = self.evaluate()
                    tps = tokens / max(train_time, 1e-9)
                    self._record(loss_value, lr, tps, elapsed, evaluation)
                    bar.update(1)
                    bar.set_postfix(self._postfix(loss_value, lr, tps), refresh=False)
                    if self.save_every and self.step % self.save_every == 0:
                        self.save_checkpoint()
                    if self._stop_signal is not None:
                        raise Interrupted(self.save_checkpoint())
                    if self.step >= self.total_steps:
                        break
                else:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    continue
                break
        finally:
            bar.close()

    def _diverged(self, what: str, value: float) -> DivergenceError:
        kept = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
        return DivergenceError(f"{what} is {value} at step {self.step + 1}: training stopped{kept} "
                        "(try a lower --learning_rate)")  # fmt: skip

    def _record(self, loss: float, lr: float, tps: float, elapsed: float, evaluation: dict) -> None:
        h = self.history
        h["step"].append(self.step)
        h["epoch"].append(self.epoch + self.batch_in_epoch / len(self.train_loader))
        h["train_loss"].append(loss)
        h["val_loss"].append(evaluation["val_loss"])
        h["metric"].append(evaluation["metric"])
        h["lr"].append(lr)
        h["tokens_per_s"].append(tps)
        h["elapsed_s"].append(elapsed)

    def _postfix(self, loss: float, lr: float, tps: float) -> dict[str, str]:
        post = {"loss": f"{loss:.3f}", "lr": f"{lr:.1e}", "tok/s": f"{tps:,.0f}"}
        # the newest evaluation is at most eval_every entries back: no scan of the whole history
        last = next((m for m in reversed(self.history["metric"]) if m is not None), None)
        if last is not None:
            post[self.metric_name] = f"{last:.3f}"
        return post

    def plot_training_history(self, path: str | Path | None = None, title: str | None = None,
                              base_metric: float | None = None) -> Path | None:  # fmt: skip
        """Write the training curves as a PNG to ``path`` (default: the run folder's training_curves.png)."""
        png = render_history(self.history, title or self.label, self.metric_name, base_metric)
        if path is None:
            return self.out.write("training_curves.png", png)
        atomic_write_bytes(Path(path), png)
        return Path(path)


# ---------------------------------------------------------------------------------------------------------
# The application: base model, run folder, training, outputs


def _lora_options(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.method == "full":
        return {"lora_r": 0, "dropout": cfg.dropout}
    return {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "lora_targets": cfg.lora_targets, "adapt_feedforward": cfg.adapt_feedforward,
            "use_rslora": cfg.use_rslora, "dropout": cfg.dropout}  # fmt: skip


def base_dir_for(cfg: TrainConfig) -> Path:
    """The base checkpoint folder: ``cfg.base_checkpoint``, or for ``auto`` a name from its recipe."""
    if cfg.base_checkpoint != "auto":
        return Path(cfg.base_checkpoint)
    name = (f"{base_task_of(cfg.task)}-d{cfg.d_model}-h{cfg.num_heads}-l{cfg.num_layers}-s{cfg.max_seq_len}"
            f"-steps{cfg.base_steps}-seed{cfg.seed}")  # fmt: skip
    return Path(cfg.output_dir) / "bases" / name


def ensure_base(cfg: TrainConfig, device: torch.device, out: RunOutput) -> Path:
    """Return the base folder, pretraining (full training, once) when the default base is missing."""
    folder = base_dir_for(cfg)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        out.say(f"base model: {folder} (reused)")
        return folder
    if cfg.base_checkpoint != "auto":
        raise LoRAError(f"base checkpoint not found: {folder} (expected config.json and model.safetensors)")
    try:  # an output_dir that cannot be written fails now, not after pretraining
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoRAError(f"cannot create the folder {folder.parent}: {e.strerror}") from None
    base_task = load_task(cfg, base_task_of(cfg.task))
    out.say(f"No base model yet: pretraining one on '{base_task.name}' ({base_task.description}), "
            f"{cfg.base_steps} steps, once; it is saved to {folder} and reused by later runs.")  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = LoRATransformer(VOCAB_SIZE, d_model=cfg.d_model, num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                            max_seq_len=cfg.max_seq_len, dropout=cfg.dropout, lora_r=0)  # fmt: skip
    trainer = LoRATrainer(
        model, BatchLoader(base_task.train, cfg.batch_size, seed=cfg.seed),
        BatchLoader(base_task.val, cfg.batch_size, shuffle=False), learning_rate=cfg.base_learning_rate,
        epochs=10**6, max_steps=cfg.base_steps, warmup_steps=min(100, cfg.base_steps // 10), grad_clip=1.0,
        weight_decay=0.01, eval_every=max(cfg.base_steps // 5, 1), eval_batches=cfg.eval_batches,
        metric_name=base_task.metric_name, device=device, precision=cfg.precision, compile=cfg.compile,
        output=RunOutput(None, out.enabled), label=f"pretraining base ({base_task.name})",
    )  # fmt: skip
    with _dropping_signals_as_errors():
        trainer.train()
    result = trainer.evaluate(max_batches=0)
    out.say(f"base model on '{base_task.name}': {base_task.metric_name} {result['metric']:.4f}")
    out.model(model.cpu(), folder)
    return folder


@contextlib.contextmanager
def _dropping_signals_as_errors() -> Iterator[None]:
    """Base pretraining has no checkpoints: an interrupt there simply stops (nothing is saved)."""
    try:
        yield
    except Interrupted:
        raise LoRAError("interrupted while pretraining the base model; nothing was saved") from None


def run_folder_name(cfg: TrainConfig) -> str:
    """``cfg.run_name``, or by default ``<task>-lora-r<r>`` (``<task>-full`` for full fine-tuning)."""
    return cfg.run_name or (f"{cfg.task}-full" if cfg.method == "full" else f"{cfg.task}-lora-r{cfg.lora_r}")


def prepare_run_folder(cfg: TrainConfig, resume: Path | None) -> Path:
    """The run folder: the resumed run's, or a new one (an existing name gets a suffix unless --overwrite)."""
    if resume is not None:
        return resume.parent if resume.is_file() else resume
    root = Path(cfg.output_dir)
    name = run_folder_name(cfg)
    folder = root / name
    if folder.exists() and cfg.overwrite:
        if any(folder.iterdir()) and not (folder / "config.yaml").is_file():
            raise LoRAError(f"--overwrite refused: {folder} is not a run folder (no config.yaml)")
        shutil.rmtree(folder)
    suffix = 2
    while folder.exists():
        folder = root / f"{name}-{suffix}"
        suffix += 1
    try:
        folder.mkdir(parents=True)
    except OSError as e:
        raise LoRAError(f"cannot create the run folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise LoRAError(f"the run folder {folder} is not writable")
    return folder


def _find_resume(cfg: TrainConfig) -> tuple[Path | None, dict[str, Any]]:
    """``--resume``: a checkpoint file, a run folder (its newest checkpoint) or ``auto`` (this run's).

    Returns the checkpoint and its trainer state, or ``(None, {})`` when not resuming.
    """
    if cfg.resume is None:
        return None, {}
    target = Path(cfg.output_dir) / run_folder_name(cfg) if cfg.resume == "auto" else Path(cfg.resume)
    if target.is_dir():
        latest = find_latest(target)
        if latest is None:
            raise CheckpointError(f"no checkpoint to resume from in {target}")
        target = latest
    elif not target.is_file():
        raise CheckpointError(f"checkpoint not found: {target}")
    return target, read_trainer_state(target)  # truncated, corrupted or not one: one line, before any output


def _samples(model: LoRATransformer, task: Task, device: torch.device) -> str:
    """What the frozen base and the adapted model produce on the same inputs, side by side."""
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
    for prompt in (b"def ", b"import ", b"class ", b"The "):
        lines.append(f"=== prompt {prompt.decode()!r} (temperature 0.8, top-k 40, seed 0)")
        for adapted in (False, True):
            g = torch.Generator(device=device).manual_seed(0)
            idx = torch.tensor([list(prompt)], device=device)
            with contextlib.nullcontext() if adapted else model.disable_adapter():
                out = model.generate(idx, 160, temperature=0.8, top_k=40, generator=g)
            text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
            lines += ["--- adapted:" if adapted else "--- base:", text]
        lines.append("")
    return "\n".join(lines) + "\n"


def run(cfg: TrainConfig, out_enabled: bool = True) -> dict[str, Any]:
    """The whole job: data, base, model, training, and the run folder. Returns metrics.json's content."""
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    task = load_task(cfg)
    resume, resume_state = _find_resume(cfg)
    base_dir = ensure_base(cfg, device, RunOutput(None, out_enabled))
    torch.manual_seed(cfg.seed)
    try:
        model = LoRATransformer.from_pretrained(base_dir, num_classes=task.num_classes, **_lora_options(cfg))
    except ValueError as e:  # a missing, truncated or corrupted base: one line
        raise LoRAError(f"cannot load the base model: {e}") from None
    width = task.train.x.shape[1]
    if width > model.max_seq_len:
        raise ConfigError(f"seq_len {width} exceeds the base model's max_seq_len {model.max_seq_len}")
    fingerprint = base_fingerprint(model)
    saved = resume_state.get("base_fingerprint")
    if saved not in (None, fingerprint):
        raise CheckpointError(f"checkpoint {resume} was trained on other base weights (fingerprint {saved}, "
                              f"this base {fingerprint}); resume with the run's own base_checkpoint")  # fmt: skip
    folder = prepare_run_folder(cfg, resume)  # only now that every input is checked: a typo touches no folder
    out = RunOutput(folder, out_enabled)
    out.say(f"run folder: {folder}")
    if resume is None:
        out.write("config.yaml", yaml.safe_dump({**cfg.to_dict(), "run_name": folder.name}, sort_keys=False))
    if cfg.method == "lora":
        model.configure_lora_training()
    else:
        model.requires_grad_(True)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    stats = model.get_parameter_stats()
    out.say(f"{cfg.method}: training {stats['trainable_params']:,} of {stats['total_params']:,} parameters "
            f"({stats['trainable_percent']:.2f}%, {stats['reduction_factor']:.0f}x fewer) on {device}")  # fmt: skip

    targets = ",".join(cfg.lora_targets) + (",ff" if cfg.adapt_feedforward else "")
    label = (f"{folder.name}: r={cfg.lora_r}, alpha={cfg.lora_alpha:g}, targets={targets}"
             if cfg.method == "lora" else f"{folder.name}: full fine-tuning")  # fmt: skip
    trainer = LoRATrainer(
        model, BatchLoader(task.train, cfg.batch_size, seed=cfg.seed),
        BatchLoader(task.val, cfg.batch_size, shuffle=False), learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, epochs=cfg.epochs, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
        lr_schedule=cfg.lr_schedule, grad_clip=cfg.grad_clip, eval_every=cfg.eval_every,
        eval_batches=cfg.eval_batches, metric_name=task.metric_name, device=device, precision=cfg.precision,
        compile=cfg.compile, save_every=cfg.save_every, keep_checkpoints=cfg.keep_checkpoints, output=out,
        label=label,
    )  # fmt: skip
    trainer.run_info["base_fingerprint"] = fingerprint
    base_eval = trainer.evaluate(max_batches=0)
    out.say(f"frozen base on '{task.name}': {task.metric_name} {base_eval['metric']:.4f}")
    if resume is not None:
        trainer.resume_from(resume)
    try:
        trainer.train()
    except Interrupted as e:
        e.checkpoint = e.checkpoint or trainer.last_checkpoint
        raise
    final = trainer.evaluate(max_batches=0)
    out.say(f"adapted on '{task.name}': {task.metric_name} {final['metric']:.4f} "
            f"(frozen base {base_eval['metric']:.4f})")  # fmt: skip

    extra = {"task": task.name, "run_name": folder.name, "base_checkpoint": str(base_dir),
             "labels": task.labels}  # fmt: skip
    if cfg.method == "lora":
        out.adapter(model, extra)
    else:
        out.model(model, folder / "model")
    out.write("history.json", trainer.history)
    trainer.plot_training_history(base_metric=base_eval["metric"])
    tps = trainer.history["tokens_per_s"]
    metrics = {
        "method": cfg.method, "task": task.name, "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better, "base_metric": base_eval["metric"],
        "final_metric": final["metric"], "base_val_loss": base_eval["val_loss"], "final_val_loss": final["val_loss"],
        "total_params": stats["total_params"], "trainable_params": stats["trainable_params"],
        "lora_params": stats["lora_params"], "reduction_factor": stats["reduction_factor"],
        "steps": trainer.step, "wall_time_s": time.perf_counter() - t_start,
        "tokens_per_s": tps[-1] if tps else None, "device": str(device), "base_checkpoint": str(base_dir),
        "base_fingerprint": fingerprint,
    }  # fmt: skip
    out.write("metrics.json", metrics)
    if not task.is_classification:
        out.write("samples.txt", _samples(model, task, device))
    out.say(f"done in {metrics['wall_time_s']:.1f} s; outputs in {folder}")
    return metrics


def resume_command(folder: Path) -> str:
    """The shell command that continues the run in ``folder`` (run from the current folder)."""
    script = Path(__file__).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(Path.cwd())
    return f"python {shlex.quote(str(script))} --resume {shlex.quote(str(folder))}"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 I/O failure, 2 bad input, 3 diverged,
    130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        cfg = load_config(argv, description=__doc__)
        run(cfg)
        return 0
    except Interrupted as e:
        if e.checkpoint is None:
            print("interrupted; no checkpoint was written", file=sys.stderr)
        else:
            print(f"interrupted; checkpoint {e.checkpoint}", file=sys.stderr)
            print(f"resume with: {resume_command(e.checkpoint.parent)}", file=sys.stderr)
        return 130
    except LoRAError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a write failed (disk full, say); the checkpoints written so far are whole
        if debug:
            raise
        print(f"error: {e.filename or 'I/O'}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
