"""Training loops for any model that maps token ids to logits: nothing here is specific to one model.

:class:`Trainer` trains the parameters that require grad (base pretraining, full fine-tuning);
:class:`LoRATrainer` freezes everything but the LoRA tensors first. Both run AdamW with warmup + cosine
(or constant) learning rate, gradient clipping, gradient accumulation, bf16 autocast on CUDA, periodic
evaluation with early stopping, atomic checkpoints with exact resume, and SIGINT/SIGTERM handling. Their settings are :class:`TrainConfig`'s
fields, with its defaults: ``LoRATrainer(model=m, train_loader=t, val_loader=v, learning_rate=1e-4)``.

A loader is any iterable of batches with a length (or ``max_steps`` set): a :class:`BatchLoader`, or a
``torch.utils.data.DataLoader`` over ``(input_ids, labels)`` tuples or ``{"input_ids", "labels"}`` dicts.
``labels`` are the targets at each position (the next tokens for language modelling, already shifted;
``-100`` where no loss is taken), or one class per row for classification.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lora.checkpoint import load_checkpoint, save_checkpoint
from lora.config import TrainConfig
from lora.data import IGNORE
from lora.distributed import Distributed, all_max, all_sum
from lora.early_stopping import EarlyStopping
from lora.errors import CheckpointError, ConfigError, DivergenceError, Interrupted, did_you_mean
from lora.files import atomic_write_bytes
from lora.fsdp import gathered, is_sharded, no_gradient_sync, replicated
from lora.lora_layer import fixed_dora_norms, mark_only_lora_as_trainable
from lora.plotting import render_history
from lora.tracking import Tracker, open_tracker

__all__ = [
    "TRAINER_SETTINGS",
    "LoRATrainer",
    "Trainer",
    "as_batch",
    "autocast_dtype",
    "batch_loss",
    "evaluate_model",
    "get_lr",
    "has_chunked_loss",
    "resolve_device",
]

# the TrainConfig fields a trainer reads; the others (task, data, model size, LoRA) are the application's
TRAINER_SETTINGS = (
    "learning_rate", "weight_decay", "epochs", "max_steps", "warmup_steps", "lr_schedule", "grad_clip",
    "eval_every", "eval_batches", "log_every", "device", "precision", "compile", "compile_mode", "save_every",
    "keep_checkpoints", "lora_plus_ratio", "grad_accum_steps", "early_stopping_patience", "log_to",
)  # fmt: skip
HISTORY_KEYS = ("step", "epoch", "train_loss", "val_loss", "metric", "lr", "tokens_per_s", "elapsed_s")


def get_lr(step: int, peak: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Learning rate for optimizer step ``step`` (1-based): linear warmup, then cosine to 10% or constant."""
    if warmup and step <= warmup:
        return peak * step / warmup
    if schedule == "constant" or total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype a training step's forward autocasts to for ``precision`` (auto, fp32, bf16) on ``device``:
    bfloat16 for bf16, and for auto on a GPU that supports it; ``None`` (float32, no autocast) otherwise."""
    if precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    return None


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for a missing device is a :class:`ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name} was asked for, but no CUDA GPU is available (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps was asked for, but MPS is not available (try --device cpu)")
    return torch.device(name)


def as_batch(batch: Any) -> dict[str, torch.Tensor]:
    """Any loader's batch as ``{"x", "y"[, "lengths"]}``.

    Accepted: this project's dicts (``x``, ``y``, ``lengths``), dicts with ``input_ids`` and ``labels``
    (and ``lengths``), and tuples or lists ``(input_ids, labels[, lengths])``.
    """
    if isinstance(batch, Mapping):
        if "x" in batch and "y" in batch:
            return dict(batch)
        if "input_ids" in batch and "labels" in batch:
            out = {"x": batch["input_ids"], "y": batch["labels"]}
            return {**out, "lengths": batch["lengths"]} if "lengths" in batch else out
        raise ValueError(
            f"a batch dict needs 'input_ids' and 'labels' (or 'x' and 'y'), got keys {sorted(batch)}"
        )
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return dict(zip(("x", "y", "lengths"), batch, strict=False))
    raise ValueError(f"a batch must be (input_ids, labels[, lengths]) or a dict, got {type(batch).__name__}")


def batch_loss(
    forward: Callable[..., torch.Tensor],
    batch: dict[str, torch.Tensor],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    chunked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(Σ loss, n, logits)`` of one batch: the cross-entropy summed over its ``n`` scored tokens (labels
    not ``-100``; float32, 0 when ``n`` is 0), ``n`` (an int64 tensor on ``device``, counted without a host
    sync) and the logits. Sums and counts, not means, so that batches add up: the mean over several
    (accumulated micro-batches, data-parallel shards) is ``Σ sums / Σ n``, not a mean of their means.
    A batch's ``segment_ids`` (packed rows) are passed on: ``forward(x, segment_ids=...)``.
    ``chunked``: the loss alone (logits ``None``), from a language model's ``forward(x, targets=y)``, which
    never holds the whole logits and returns the mean (times ``n`` here, which is the sum to float rounding).
    """
    x = batch["x"].to(device, non_blocking=True).long()
    y = batch["y"].to(device, non_blocking=True).long()
    n = (y != IGNORE).sum()
    # packed rows' segment ids (lora/chat_task.py), classification's lengths
    extra = {k: batch[k].to(device) for k in ("segment_ids", "lengths") if k in batch}
    if chunked:
        with autocast():
            mean = forward(x, targets=y, **extra).float()
        return torch.where(n > 0, mean, 0.0) * n, n, None  # no scored token: 0, not NaN x 0
    with autocast():
        logits = forward(x, **extra).float()  # (B, T, vocab) or, classifying, (B, classes)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total, n, logits


LOSS_METRICS = ("bits_per_byte", "bits_per_token")  # metrics read from the loss alone


def has_chunked_loss(model: nn.Module) -> bool:
    """Whether ``model(x, targets=y)`` returns its language-model loss computed a chunk of tokens at a time
    (a :class:`~lora.lora_transformer.LoRATransformer` without a classification head)."""
    return hasattr(model, "loss_chunk_tokens") and getattr(model, "cls_head", None) is None


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: Iterable,
    metric_name: str,
    device: torch.device | str = "cpu",
    max_batches: int = 0,
    forward: Callable[..., torch.Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lockstep: bool = False,
) -> dict[str, float]:
    """``val_loss`` (nats per scored token) and ``metric`` over ``loader`` (``max_batches`` 0: all).

    Data parallel, each process reads its share of the batches (a :class:`~lora.data.BatchLoader` with a
    ``rank``; ``max_batches`` counts global batches) and ``reduce`` (a sum over the processes) adds up
    their sums, so every process gets the same numbers.

    ``exact_match`` counts rows whose scored tokens are all right (greedy decoding then gets them right
    too); ``accuracy`` counts right labels; ``bits_per_byte`` (byte-level tokens) and ``bits_per_token`` are the loss over ln 2.
    For those two a language model's loss is its chunked one (``model(x, targets=y)``, equal within float
    rounding): an evaluation batch never holds the whole ``(B, T, vocab)`` logits, as training does not.

    ``lockstep``: every process runs as many forwards, as a model sharded by FSDP2 needs (each forward gathers
    its weights from every process): one with fewer batches than another runs empty ones (0 rows, which add
    nothing).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    # a loss-only metric of a language model: its chunked loss, never the whole (B, T, vocab) logits
    loss_only = metric_name in LOSS_METRICS and has_chunked_loss(model)
    loss_sum, tokens, correct, rows = 0.0, 0, 0, 0
    source = loader
    if hasattr(loader, "batches") and hasattr(loader, "world_size"):  # sharded by global batch number
        loader, max_batches = loader.batches(limit=max_batches or None), 0
    if lockstep:
        own = [as_batch(raw) for raw in itertools.islice(loader, max_batches or None)]
        most = int(all_max(torch.tensor(len(own), device=device)))
        empty = {k: v[:0] for k, v in own[0].items()} if own else source.data.batch(torch.arange(0))
        loader, max_batches = own + [empty] * (most - len(own)), 0
    with fixed_dora_norms(model):  # no weight changes here: DoRA's norms once, not once per batch
        for b, raw in enumerate(loader):
            if max_batches and b >= max_batches:
                break
            batch = as_batch(raw)
            run = forward if forward is not None else model
            total, scored, logits = batch_loss(run, batch, device, autocast, loss_only)
            y = batch["y"].to(device).long()
            loss_sum += total.item()
            tokens += scored.item()
            rows += y.shape[0]
            if logits is None:
                continue
            pred = logits.argmax(dim=-1)
            if metric_name == "exact_match":
                correct += ((pred == y) | (y == IGNORE)).all(dim=1).sum().item()
            else:
                correct += (pred == y).sum().item()
    model.train(was_training)
    if reduce is not None:
        totals = torch.tensor([loss_sum, tokens, correct, rows], dtype=torch.float64, device=device)
        loss_sum, tokens, correct, rows = reduce(totals).tolist()
    val_loss = loss_sum / max(tokens, 1)
    bits = val_loss / math.log(2)
    metric = {"bits_per_byte": bits, "bits_per_token": bits, "exact_match": correct / max(rows, 1),
              "accuracy": correct / max(rows, 1)}[metric_name]  # fmt: skip
    return {"val_loss": val_loss, "metric": metric}


def _trainer_config(config: TrainConfig | None, settings: dict[str, Any]) -> TrainConfig:
    """``config`` (default: ``TrainConfig()``) with the keyword ``settings`` applied and checked."""
    for key in settings:
        if key not in TRAINER_SETTINGS:
            hint = did_you_mean(key, TRAINER_SETTINGS) or f"; the settings are {', '.join(TRAINER_SETTINGS)}"
            raise TypeError(f"unexpected trainer setting {key!r}{hint}")
    if isinstance(settings.get("device"), torch.device):  # cpu:0 is cpu; cuda:1 stays cuda:1
        device = settings["device"]
        settings["device"] = "cpu" if device.type == "cpu" else str(device)
    return dataclasses.replace(config or TrainConfig(), **settings).validate()


def _ddp_skips() -> dict[str, bool]:
    """``DistributedDataParallel``'s options that skip what is not needed, by this torch's names: no buffer sync
    before each forward (the model's only buffers, PiSSA/OLoRA's initial factors, are equal everywhere;
    ``forward_sync_buffers``, ``broadcast_buffers`` before torch 2.13) and no initial sync of the frozen base
    (``init_sync``, torch 2.5 on; the processes' fingerprints were compared)."""
    params = inspect.signature(DistributedDataParallel).parameters
    buffers = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {buffers: False, **({"init_sync": False} if "init_sync" in params else {})}


def _param_groups(model: nn.Module, params: list[nn.Parameter], lora_plus_ratio: float) -> list[dict]:
    """The optimizer's groups: one, or with LoRA+ (Hayou et al. 2024, ``lora_plus_ratio != 1``) the ``lora_B``
    tensors apart with ``lr_ratio`` = the ratio (their learning rate is ``ratio x`` the schedule's)."""
    names = {p: n for n, p in model.named_parameters()}
    b = [p for p in params if names[p].rsplit(".", 1)[-1] == "lora_B"]
    if lora_plus_ratio == 1.0:
        return [{"params": params, "lr_ratio": 1.0}]
    if not b:
        raise ValueError("lora_plus_ratio needs LoRA B matrices to train; this model has none")
    rest = [p for p in params if names[p].rsplit(".", 1)[-1] != "lora_B"]
    groups = [{"params": rest, "lr_ratio": 1.0}] if rest else []
    return [*groups, {"params": b, "lr_ratio": float(lora_plus_ratio)}]


def _length(loader: Iterable) -> int | None:
    """``len(loader)``, or ``None`` for a loader without one (a generator, an IterableDataset's loader)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


class Trainer:
    """Trains the parameters of ``model`` that require grad; the others get no gradient and no state.

    ``model(x)`` maps token ids ``(B, T)`` to logits ``(B, T, vocab)`` (or ``(B, classes)``; classification
    batches with ``lengths`` call ``model(x, lengths=...)``). Settings are :class:`TrainConfig` fields
    (:data:`TRAINER_SETTINGS`), from ``config`` and keyword arguments, with ``TrainConfig``'s defaults.
    ``run_dir``: where checkpoints, the training-curve PNG and ``log_to``'s event files go (``None``: no
    checkpoints).

    A step is one optimizer update, from ``grad_accum_steps`` batches of the loader (micro-batches): the
    learning-rate schedule, ``max_steps``, ``eval_every``, ``save_every``, the history and the checkpoints
    count updates, and a checkpoint is only written between two. Its loss is the mean over every scored
    token of all of them, on every process: ``Σ sums / Σ n`` (:func:`batch_loss`), not a mean of means.
    With ``early_stopping_patience`` P >= 1, training stops after P evaluations in a row without a lower
    validation loss; :attr:`early_stopping` holds the best step, its loss and weights.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable,
        val_loader: Iterable,
        config: TrainConfig | None = None,
        *,
        metric_name: str = "bits_per_byte",
        run_dir: str | Path | None = None,
        label: str = "training",
        quiet: bool = False,
        distributed: Distributed | None = None,
        **settings: Any,
    ) -> None:
        self.config = cfg = _trainer_config(config, settings)
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.metric_name, self.label, self.quiet = metric_name, label, quiet
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.accum = cfg.grad_accum_steps  # loader batches (micro-batches) per optimizer update
        self.batches_per_epoch = self._updates_per_epoch()  # None: a loader without len()
        self.total_steps = self._total_steps()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        # fused (CPU, CUDA): one kernel for all tensors, and a step it can skip on the device (found_inf)
        self.fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(_param_groups(model, self.params, cfg.lora_plus_ratio),
                                           lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.999), fused=self.fused or None)  # fmt: skip
        self.log_every = cfg.log_every or (10 if self.device.type == "cuda" else 1)
        # a language model that computes its own loss in chunks (LoRATransformer) trains without full logits
        self.chunked_loss = has_chunked_loss(model)
        self.autocast_dtype = autocast_dtype(cfg.precision, self.device)
        self.distributed = distributed or Distributed()
        forward: nn.Module = model
        self.ddp: DistributedDataParallel | None = None
        # the trainable tensors start equal everywhere; only their grads sync (a model sharded by FSDP2,
        # lora/fsdp.py, is loaded equal everywhere and reduce-scatters its own grads)
        if self.distributed.enabled and not is_sharded(model):
            with torch.no_grad():
                for p in self.params:
                    torch.distributed.broadcast(p, 0)
            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = self.ddp = DistributedDataParallel(model, device_ids=ids, **_ddp_skips())
        # the whole forward, the chunked loss included; reduce-overhead adds CUDA graphs (the step is sync-free)
        self.forward = torch.compile(forward, mode=cfg.compile_mode) if cfg.compile else forward
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.history: dict[str, list] = {k: [] for k in HISTORY_KEYS}
        self._stop_signal: int | None = None
        self.last_checkpoint: Path | None = None
        # JSON kept in every checkpoint (the application puts the base fingerprint there)
        self.run_info: dict[str, Any] = {}
        patience = cfg.early_stopping_patience
        self.early_stopping = EarlyStopping(patience) if patience else None
        self.stopped_early_at: int | None = None  # the step after which early stopping ended training
        if self.early_stopping is not None:
            self._check_evaluations(patience)
        if cfg.log_to != "none" and self.run_dir is None and self.distributed.is_main:
            raise ValueError(f"log_to {cfg.log_to} writes into the run folder: give run_dir")
        self.tracker = Tracker()  # log_to's, while train() runs (lora/tracking.py); rank 0's alone writes

    # ----------------------------------------------------------------------------------------------------

    def _updates_per_epoch(self) -> int | None:
        """Optimizer updates in an epoch: ``len(train_loader) // grad_accum_steps`` (the last micro-batches,
        too few for an update, are left out, as a loader leaves out its last partial batch)."""
        batches = _length(self.train_loader)
        if batches is None:
            return None
        if batches < 1:
            raise ValueError("the training loader yields no batch (fewer rows than one batch?)")
        if batches < self.accum:
            raise ConfigError(f"grad_accum_steps {self.accum} is more than the {batches} batch(es) the training "
                              f"loader yields in an epoch: no update could be made; lower it")  # fmt: skip
        return batches // self.accum

    def _total_steps(self) -> int:
        """``epochs x`` the updates of an epoch, capped by ``max_steps``; a loader without a length needs it."""
        max_steps, per_epoch = self.config.max_steps, self.batches_per_epoch
        if per_epoch is None:
            if max_steps is None:
                raise ValueError("the training loader has no len(): set max_steps")
            return max_steps
        total = self.config.epochs * per_epoch
        return total if max_steps is None else min(total, max_steps)

    def _check_evaluations(self, patience: int) -> None:
        """Refuse early stopping that cannot happen: ``patience`` evaluations without improvement need
        ``patience + 1`` of them (one every ``eval_every`` steps and one at the end)."""
        evaluations = math.ceil(self.total_steps / self.config.eval_every)
        if evaluations <= patience:
            raise ConfigError(f"early_stopping_patience {patience} has no effect: {self.total_steps} steps with "
                              f"eval_every {self.config.eval_every} evaluate {evaluations} time(s); evaluate more "
                              "often (--eval_every) or drop it")  # fmt: skip

    def say(self, message: str) -> None:
        """A message on stderr that does not break the progress bar."""
        if not self.quiet:
            tqdm.write(message, file=sys.stderr)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _update(
        self, micro_batches: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, bool | torch.Tensor]:
        """One optimizer update from ``micro_batches``: ``(its mean loss, the gradient norm, stop)``.

        Each micro-batch back-propagates its summed loss; the gradients add up in ``.grad``, and once all
        are in they are divided by the count ``N`` of scored tokens of all the micro-batches of every
        process, which makes them the gradient of ``Σ sums / N``: the mean loss over the whole accumulated
        (and global) batch, exactly the update of one batch ``grad_accum_steps x processes`` times larger.
        Data parallel, DDP exchanges gradients only in the last micro-batch's backward (the others run in
        ``no_sync()``) and averages them over the ``world_size`` processes, which the sums are multiplied
        by first; ``N``, the loss and the stop request (a signal seen by any process) are then agreed with
        one small all-reduce. Nothing here waits for the device.
        """
        world = self.distributed.world_size
        total = count = None
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = (contextlib.nullcontext() if last else self.ddp.no_sync() if self.ddp is not None
                    else no_gradient_sync(self.model))  # fmt: skip
            with sync:
                loss_sum, n, _ = batch_loss(
                    self.forward, batch, self.device, self._autocast, self.chunked_loss
                )
                (loss_sum * world if world > 1 else loss_sum).backward()
            total = loss_sum.detach() if total is None else total + loss_sum.detach()
            count = n if count is None else count + n
        stop = self._stop_signal is not None
        if self.distributed.enabled:
            stats = all_sum(
                torch.stack(
                    [count.double(), total.double(), count.new_full((), float(stop), dtype=torch.float64)]
                )
            )
            count, total, stop = stats[0], stats[1], stats[2]  # stop: read later
        count = count.clamp(min=1).to(torch.float32)
        grads = [p.grad for p in self.params if p.grad is not None]
        torch._foreach_div_(grads, count)
        # with clipping off, max_norm inf only measures (the grads are scaled by exactly 1)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip or math.inf)
        return (total / count).float(), replicated(norm), stop

    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Validation loss (mean nats per scored token) and the task metric."""
        limit = self.config.eval_batches if max_batches is None else max_batches
        return evaluate_model(self.model, self.val_loader, self.metric_name, self.device, limit,
                              forward=self.forward, autocast=self._autocast,
                              reduce=all_sum if self.distributed.enabled else None,
                              lockstep=is_sharded(self.model))  # fmt: skip

    def _epoch_batches(self) -> Iterator[Any]:
        """This epoch's batches from update ``batch_in_epoch`` on (exactly reproducible with a
        ``BatchLoader``): each update reads ``grad_accum_steps`` of them."""
        loader, first = self.train_loader, self.batch_in_epoch * self.accum
        if hasattr(loader, "batches"):
            return loader.batches(self.epoch, first)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler and friends: a new order every epoch
            sampler.set_epoch(self.epoch)
        return itertools.islice(iter(loader), first, None)

    def _epoch_updates(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """This epoch's updates from ``batch_in_epoch`` on, each ``grad_accum_steps`` batches (the last
        ones, too few for an update, are left out)."""
        batches, pin = self._epoch_batches(), self.device.type == "cuda"
        while len(group := list(itertools.islice(batches, self.accum))) == self.accum:
            group = [as_batch(raw) for raw in group]
            if pin:  # page-locked: the copy to the GPU runs without blocking the host
                group = [{k: v.pin_memory() for k, v in batch.items()} for batch in group]
            yield group

    def _state(self) -> dict[str, Any]:
        epoch, batch = self.epoch, self.batch_in_epoch
        if self.batches_per_epoch is not None and batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        return {"step": self.step, "epoch": epoch, "batch_in_epoch": batch, "history": self.history,
                **self.run_info}  # fmt: skip

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint into ``run_dir`` (none without one); return its path."""
        with gathered(self.model, self.optimizer):  # sharded: every process gathers, rank 0 writes
            if self.run_dir is None:
                return None
            best = self.early_stopping.weights if self.early_stopping is not None else None
            path = save_checkpoint(
                self.run_dir, self.model, self.optimizer, self._state(), self.config.keep_checkpoints, best
            )
        self.last_checkpoint = path
        return path

    def resume_from(self, path: Path) -> None:
        """Continue exactly where the checkpoint at ``path`` left off."""
        with gathered(self.model, self.optimizer, write_back=True):  # sharded: whole, then each its rows
            state = load_checkpoint(path, self.model, self.optimizer)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.history = state["history"]
        self.last_checkpoint = path
        if self.early_stopping is not None:  # the evaluations so far again, the best weights from the file
            self.early_stopping = early = EarlyStopping(self.early_stopping.patience)
            early.replay(self.history["step"], self.history["val_loss"])
            early.weights = state.get("best_weights", {})
            if early.best_step is not None and not early.weights:
                raise CheckpointError(f"checkpoint {path} keeps no best weights, which early stopping needs: "
                                      "resume with the run's own early_stopping_patience")  # fmt: skip
        self.say(
            f"resumed from {path} at step {self.step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch})"
        )

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal == signum:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        if self._stop_signal is not None:  # torchrun passing on the stop as SIGTERM: already stopping
            return
        self._stop_signal = signum
        self.say(f"{signal.Signals(signum).name}: finishing this step, then writing a checkpoint ...")

    def train(self, epochs: int | None = None) -> dict[str, list]:
        """Train until ``epochs`` epochs in all have passed (default: the configured ``epochs``; a fresh
        trainer's ``train(epochs=10)`` trains ten), or until ``max_steps`` if that is set and comes first.
        Returns the history: a dict of per-step lists."""
        if epochs is not None:
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
                raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
            self.config = dataclasses.replace(self.config, epochs=epochs)
            self.total_steps = self._total_steps()
        per_epoch, max_steps = self.batches_per_epoch, self.config.max_steps
        if per_epoch and max_steps is not None and self.total_steps < max_steps:  # --epochs came first
            self.say(f"warning: max_steps {max_steps} is more than {self.config.epochs} epoch(s) of {per_epoch} "
                     f"steps: training stops at step {self.total_steps}; --epochs "
                     f"{math.ceil(max_steps / per_epoch)} reaches it")  # fmt: skip
        kind = self.config.log_to if self.distributed.is_main else "none"
        self.tracker = open_tracker(kind, self.run_dir, self.step)
        self.tracker.settings(self.step, self.config.to_saved())
        handlers = {}
        if torch.multiprocessing.current_process().name == "MainProcess":
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._train_loop()
        finally:
            self.tracker.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        return self.history

    def _train_loop(self) -> None:
        """The steps, with no host-device synchronisation inside one: each step's loss, gradient norm and
        stop request stay on the device (a non-finite step skips its update there, through fused AdamW's
        ``found_inf``) and are read together every ``log_every`` steps, before an evaluation, a checkpoint
        and the end (:meth:`_flush`), which reports a divergence with the step it happened at."""
        self.model.train()
        cfg = self.config
        interval = 0.5 if sys.stderr.isatty() else 15.0  # a log file gets a line every 15 s, not a flood
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.label, disable=self.quiet,
                   dynamic_ncols=True, mininterval=interval, leave=True)  # fmt: skip
        elapsed = self.history["elapsed_s"][-1] if self.history["elapsed_s"] else 0.0
        self._window = {"t0": time.perf_counter(), "tokens": 0, "time": 0.0, "elapsed": elapsed}
        pending: list[tuple] = []
        if self.early_stopping is not None and self.early_stopping.should_stop:  # resumed after it stopped
            self.stopped_early_at = self.step
        try:
            while self.step < self.total_steps and self.stopped_early_at is None:
                start = self.step
                for micro_batches in self._epoch_updates():
                    lr = get_lr(
                        self.step + 1, cfg.learning_rate, cfg.warmup_steps, self.total_steps, cfg.lr_schedule
                    )
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_ratio", 1.0)  # LoRA+: B's group runs faster
                    loss, norm, stop = self._update(micro_batches)
                    if self.fused:  # a non-finite loss or gradient: the step skips itself on the device
                        self.optimizer.found_inf = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    self.batch_in_epoch += 1
                    tokens = sum(batch["x"].numel() for batch in micro_batches)
                    self._window["tokens"] += tokens * self.distributed.world_size
                    # a copy: a forward compiled with CUDA graphs (reduce-overhead) writes the next step's
                    # loss over this one's memory, and the pending losses are read steps later
                    kept = loss.detach().clone()
                    pending.append((self.step, self._epoch_now(), lr, kept, norm.detach(), stop))
                    evaluate = self.step % cfg.eval_every == 0 or self.step == self.total_steps
                    save = bool(cfg.save_every) and self.step % cfg.save_every == 0
                    if evaluate or save or self.step % self.log_every == 0 or self.step >= self.total_steps:
                        stop = self._flush(pending, bar)
                        pending = []
                        if evaluate:
                            evaluation = self.evaluate()
                            self.history["val_loss"][-1] = evaluation["val_loss"]
                            self.history["metric"][-1] = evaluation["metric"]
                            self.tracker.evaluation(self.step, evaluation["val_loss"], self.metric_name,
                                                    evaluation["metric"])  # fmt: skip
                            self._observe(evaluation["val_loss"])
                            self._window["t0"] = time.perf_counter()  # evaluation is not training time
                        if save:
                            self.save_checkpoint()
                        if stop:  # every process stops after the same step; rank 0 writes the checkpoint
                            raise Interrupted(self.save_checkpoint())
                    if self.step >= self.total_steps or self.stopped_early_at is not None:
                        break
                else:
                    if self.step == start:
                        raise ValueError(f"the training loader yielded fewer than {self.accum} batch(es) in an "
                                         "epoch: no update")  # fmt: skip
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    continue
                break
        finally:
            bar.close()

    def _observe(self, val_loss: float) -> None:
        """Early stopping: this step's evaluation (every process has the same loss, so all stop together)."""
        early = self.early_stopping
        if early is None:
            return
        with gathered(self.model):  # sharded: the best weights are kept whole
            early.observe(self.step, val_loss, self.trainable_weights())
        if early.should_stop:
            self.stopped_early_at = self.step
            self.say(f"early stopping after step {self.step}: validation loss {early.best_loss:.4f} at step "
                     f"{early.best_step}, not lower in the {early.patience} evaluation(s) since")  # fmt: skip

    def trainable_weights(self) -> dict[str, nn.Parameter]:
        """The parameters that train, by name (the names checkpoints use)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def summary(self) -> dict[str, Any]:
        """How the run batched its updates and how it ended, for its metrics: ``grad_accum_steps``, the
        ``effective_batch_size`` (rows per update: batch x processes x micro-batches, for a loader with a
        ``batch_size``), and with early stopping the best step, its validation loss, and where it stopped."""
        rows = getattr(self.train_loader, "batch_size", None)
        out: dict[str, Any] = {
            "grad_accum_steps": self.accum,
            "effective_batch_size": rows * self.distributed.world_size * self.accum if rows else None,
        }
        early = self.early_stopping
        if early is not None:
            out.update(best_step=early.best_step, best_val_loss=early.best_loss if early.best_step is not None else None,
                       stopped_early=self.stopped_early_at is not None, stopped_at_step=self.step)  # fmt: skip
        return out

    def _epoch_now(self) -> float:
        per_epoch = self.batches_per_epoch
        return self.epoch + self.batch_in_epoch / per_epoch if per_epoch else float(self.epoch)

    def _flush(self, pending: list[tuple], bar: tqdm) -> bool:
        """Read the pending steps' losses, norms and stop requests in one transfer; raise at the first
        non-finite step (its update was skipped on the device); record each step and move the bar.
        Returns whether to stop (a signal: agreed by every process, or this one's)."""
        if not pending:
            return False
        rows = [torch.stack([loss.float(), norm.float(), torch.as_tensor(stop, dtype=torch.float32,
                                                                     device=loss.device)])
                for _, _, _, loss, norm, stop in pending]  # fmt: skip
        values = torch.stack(rows).tolist()  # the one read of the device
        window, now = self._window, time.perf_counter()
        window["time"] += now - window["t0"]
        window["elapsed"] += now - window["t0"]
        window["t0"] = now
        tps = window["tokens"] / max(window["time"], 1e-9)
        stop = False
        for (step, epoch, lr, *_), (loss, norm, asked) in zip(pending, values, strict=True):
            if not math.isfinite(loss):
                raise self._diverged("loss", loss, step)
            if not math.isfinite(norm):
                raise self._diverged("gradient norm", norm, step)
            self._record(step, epoch, loss, lr, tps, window["elapsed"])
            self.tracker.train_step(step, loss, lr, norm, tps)
            stop = stop or asked > 0
        bar.update(len(pending))
        bar.set_postfix(self._postfix(loss, lr, tps), refresh=False)
        return stop or (self._stop_signal is not None and not self.distributed.enabled)

    def _diverged(self, what: str, value: float, step: int) -> DivergenceError:
        kept = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
        return DivergenceError(f"{what} is {value} at step {step}: training stopped{kept} "
                               "(try a lower --learning_rate)")  # fmt: skip

    def _record(self, step: int, epoch: float, loss: float, lr: float, tps: float, elapsed: float) -> None:
        """One step's row of the history (its evaluation, if any, is filled in after it)."""
        for key, value in zip(HISTORY_KEYS, (step, epoch, loss, None, None, lr, tps, elapsed), strict=True):
            self.history[key].append(value)

    def _postfix(self, loss: float, lr: float, tps: float) -> dict[str, str]:
        post = {"loss": f"{loss:.3f}", "lr": f"{lr:.1e}", "tok/s": f"{tps:,.0f}"}
        # the newest evaluation is at most eval_every entries back: no scan of the whole history
        last = next((m for m in reversed(self.history["metric"]) if m is not None), None)
        if last is not None:
            post[self.metric_name] = f"{last:.3f}"
        return post

    def plot_training_history(self, path: str | Path | None = None, title: str | None = None,
                              base_metric: float | None = None) -> Path:  # fmt: skip
        """Write the training curves as a PNG and return its path.

        ``path`` defaults to ``training_curves.png`` in the run folder, or, outside a run,
        ``training_history.png`` in the working directory. ``base_metric`` draws the frozen base's metric.
        """
        if path is None:
            path = self.run_dir / "training_curves.png" if self.run_dir else Path("training_history.png")
        png = render_history(self.history, title or self.label, self.metric_name, base_metric)
        return atomic_write_bytes(Path(path), png)


class LoRATrainer(Trainer):
    """A :class:`Trainer` for a model with LoRA adapters: only the adapters train, the base stays frozen.

    At construction it freezes every non-LoRA weight: ``model.configure_lora_training()`` if the model has
    one (a :class:`~lora.lora_transformer.LoRATransformer` also trains its classification head, which has
    no pretrained weights), else :func:`~lora.lora_layer.mark_only_lora_as_trainable`.
    """

    def __init__(self, model: nn.Module, train_loader: Iterable, val_loader: Iterable,
                 config: TrainConfig | None = None, **kwargs: Any) -> None:  # fmt: skip
        if not any(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n, _ in model.named_parameters()):
            raise ValueError(
                "LoRATrainer needs a model with LoRA adapters (lora_r >= 1, or inject_lora()); "
                "Trainer trains every weight"
            )
        configure = getattr(model, "configure_lora_training", None)
        if callable(configure):
            configure()
        else:
            mark_only_lora_as_trainable(model)
        super().__init__(model, train_loader, val_loader, config, **kwargs)
