"""Fully sharded data parallel (``--fsdp``): the frozen base and the adapter split across torchrun's processes.

Data parallel (``lora/distributed.py``) keeps the whole model in every process. With ``--fsdp`` PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``) keeps in each of the ``N`` processes only its rows of every tensor:
rows ``[r c, (r + 1) c)`` of dimension 0 in process ``r``, ``c = ceil(rows / N)`` (a ``DTensor`` placed
``Shard(0)``). Each decoder block is one unit: its tensors are all-gathered before its forward (and again for
its backward) and freed after it, and the gradients of its trainable tensors are reduce-scattered, each
process keeping, clipping and updating (AdamW) its own rows. The frozen tensors outside the blocks (the
embeddings, the final norm, the LM head) stay whole in every process, since a step needs them whole from its
first operation (the embedding) to its last (the head's backward): sharded, a process would hold its shard
and the gathered copy. The model's root unit holds what trains outside the blocks (a classification head).
The batches, the loss and the update are data parallel's, so the adapter is the one of a single process
with the same global batch, to float rounding.

Loading (:func:`build_sharded_model`) never holds the whole base in a process: the model is built on the
``meta`` device (nothing allocated) with the dtypes a single-process run stores its tensors in, the random
draws of its construction are made again (``lora/skeleton.py``), FSDP2 shards it, and each process reads
from the safetensors files only its rows of each block tensor (the file mapped for one read at a time, so that
the pages read leave the process with the mapping). The base's fingerprint is hashed from the files a few
rows at a time (:func:`streamed_fingerprint`): the one the whole base would give.

Outputs (:func:`gathered`): every process gathers the whole trainable tensors (the adapter: megabytes) and
their AdamW moments, and rank 0 writes them into the same checkpoint and adapter files as any run, so a run
resumes on another number of processes, or on one without ``--fsdp``, and the reverse.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor

try:  # torch 2.6 on; 2.5 keeps FSDP2 under _composable
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # pragma: no cover - torch 2.5
    from torch.distributed._composable.fsdp import FSDPModule, fully_shard

from lora.base_storage import freeze_half, half_dtype, kept_as
from lora.config import TrainConfig
from lora.decoder import rotary_frequencies
from lora.errors import ConfigError, LoRAError
from lora.files import read_safetensors_header
from lora.lora_layer import BASE_DERIVED_INITS, LORA_LEAVES, LoRALinear, deferred_base_init
from lora.lora_transformer import LoRATransformer
from lora.pretrained import BIN_NAME, HEAD_PREFIX, IMPORTERS, BaseSource, read_base_tensors
from lora.quantize import release_freed_memory
from lora.skeleton import build_on_meta, construction_draws

__all__ = [
    "build_sharded_model",
    "check_fsdp",
    "gather_trainable",
    "gathered",
    "is_sharded",
    "no_gradient_sync",
    "replicated",
    "streamed_fingerprint",
]

READ_BYTES = 16 << 20  # bytes of a tensor read (and hashed) at a time: what a read adds to the process
M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 128 << 10  # glibc's mallopt parameter, and the value set on a CPU


def check_fsdp(cfg: TrainConfig, world_size: int) -> None:
    """Refuse (one line) ``--fsdp`` where it cannot work: a single process, full fine-tuning, a 4-bit base."""
    if not cfg.fsdp:
        return
    if world_size < 2:
        raise ConfigError("--fsdp shards the model across the processes of a torchrun; this is one process: "
                          "start it with torchrun --nproc_per_node N (N >= 2), or run without --fsdp "
                          "(--no-fsdp resumes a --fsdp run on one process)")  # fmt: skip
    if cfg.method != "lora":
        raise ConfigError("--fsdp shards the frozen base of a LoRA run; method full trains every weight: drop "
                          "--fsdp (data parallel), or use --method lora")  # fmt: skip
    if cfg.quantize_base == "nf4":
        raise ConfigError("--fsdp with quantize_base nf4: a 4-bit weight's double quantization takes the mean of "
                          "all its block scales, so a process cannot quantize its rows alone into the base one "
                          "process makes; use --quantize_base bf16 with --fsdp, or nf4 without it")  # fmt: skip


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (:func:`build_sharded_model`)."""
    return isinstance(model, FSDPModule)


def replicated(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole in this process: a ``DTensor`` gathered (a collective: every process calls it), else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local_rows(t: torch.Tensor) -> tuple[int, int]:
    """The rows ``[a, b)`` of dimension 0 that this process holds of ``t`` (all of a plain tensor)."""
    n = t.shape[0]
    if not isinstance(t, DTensor):
        return 0, n
    mesh = t.device_mesh
    per = math.ceil(n / mesh.size())  # torch.chunk's split, which Shard(0) uses
    a = min(mesh.get_local_rank() * per, n)
    b = min(a + per, n)
    assert b - a == t.to_local().shape[0], (t.shape, a, b, t.to_local().shape)
    return a, b


def _shard_like(full: torch.Tensor, like: DTensor) -> DTensor:
    """``full`` (whole, in every process) as a ``DTensor`` placed like ``like``: this process's rows, copied."""
    a, b = _local_rows(like)
    local = full[a:b].to(like.dtype).contiguous()
    return DTensor.from_local(
        local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    )


def _return_large_frees() -> None:
    """Have the C allocator (glibc) map every block of 128 KiB or more on its own, and so give it back to the
    system when it is freed: its initial threshold, without the raise that follows the first such block freed
    (to up to 32 MiB), after which glibc serves those blocks from its heap and keeps their pages when they are
    freed. FSDP gathers each transformer block and frees it, twice a step: without this, the resident set of
    a process grew step after step, to a peak of 1,296 MiB against 995 MiB with it (6 steps on a 175 M base:
    ``scripts/fsdp_memory.py``'s --fsdp run), at the same step time."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


# ---------------------------------------------------------------------------------------------------------
# Where each base tensor is in the files


def _locations(source: BaseSource) -> dict[str, tuple[Path, str] | None]:
    """For each of ``source.header``'s tensors (this model's names), the safetensors file and the name in it
    of the file tensor it is (renamed, not changed: this project's folders, the Llama layouts); ``None`` for one
    that reading converts (a GPT-2 file's transposed weights, Phi-3's split ones, any ``.bin``)."""
    if source.importer == "lora":
        return {name: (source.weights_path, name) for name in source.header}
    if source.weights_path.name == BIN_NAME:
        return dict.fromkeys(source.header)
    family = IMPORTERS[source.importer]
    file_of: dict[str, Path] = {}
    metas: dict[str, torch.Tensor] = {}
    for shard in source.shards:
        part = read_safetensors_header(shard)
        metas.update(part)
        file_of.update(dict.fromkeys(part, shard))
    metas = family.strip(metas)
    theirs = {id(v): k for k, v in metas.items()}
    # the converter run on the header's meta tensors: a tensor it returns as it is, it only renamed
    converted = family.convert(metas, source.architecture)
    out: dict[str, tuple[Path, str] | None] = {}
    for name in source.header:
        key = theirs.get(id(converted.get(name)))
        out[name] = (file_of[key], key) if key is not None else None
    return out


class _Reader:
    """Rows of ``source``'s base tensors (this model's names), in the file's dtype, read one piece at a time."""

    def __init__(self, source: BaseSource) -> None:
        self.source = source
        self.where = _locations(source)
        self._converted: dict[str, torch.Tensor] | None = None

    def rows(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows ``[a, b)`` of tensor ``name``: read from its file, which is mapped for this read only (the
        pages read are not the process's afterwards); a converted one from the whole converted base."""
        where = self.where[name]
        if where is None:
            if self._converted is None:  # (read once, memory-mapped: GPT-2's and Phi-3's converted copies)
                self._converted = read_base_tensors(self.source, with_head=True)
            return self._converted[name][a:b]
        path, key = where
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_slice(key)[a:b]

    def pieces(self, name: str) -> Iterator[torch.Tensor]:
        """Tensor ``name`` whole, as consecutive pieces of rows of about :data:`READ_BYTES` each."""
        header = self.source.header[name]
        n = header.shape[0]
        row = max(1, header[0].numel() * header.element_size()) if header.dim() > 1 else header.element_size()
        step = max(1, READ_BYTES // row)
        for a in range(0, n, step):
            yield self.rows(name, a, min(a + step, n))


def streamed_fingerprint(model: LoRATransformer, reader: _Reader) -> str:
    """``model.base_fingerprint()`` of the base ``reader`` reads (:func:`~lora.files.tensors_fingerprint`: a
    sha256 over the sorted names, the shapes and the float32 values), hashed a few rows at a time, so the
    whole base is never in the process. A tensor holding nan or inf is refused, naming it, as loading does."""
    h = hashlib.sha256()
    keys = sorted(k for k in model.state_dict() if model.is_base_key(k))
    for key in keys:
        h.update(f"{key}|{tuple(reader.source.header[key].shape)}|{torch.float32}\n".encode())
        bad = 0
        for piece in reader.pieces(key):
            piece = piece.to(torch.float32).contiguous()
            bad += int((~torch.isfinite(piece)).sum())
            h.update(piece.reshape(-1).view(torch.uint8).numpy().tobytes())
        if bad:
            numel = reader.source.header[key].numel()
            raise LoRAError(f"cannot load the base model: {reader.source.folder}: the weights hold non-finite values "
                            f"(nan or inf): {key} has {bad:,} of {numel:,}; the file is damaged, or was saved "
                            "from a diverged run")  # fmt: skip
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# The sharded model


def build_sharded_model(
    cfg: TrainConfig, source: BaseSource, num_classes: int | None, device: torch.device, storage: str
) -> tuple[LoRATransformer, str]:
    """``(model, base fingerprint)``: the model :func:`~lora.application.build_model` makes for ``cfg``, sharded
    by FSDP2 across the processes (each block a unit, then the root), each process holding only its rows of
    every block tensor, read from ``source``'s files (the module docstring). ``storage`` is how the frozen base is
    kept (``none``: float32, ``half``: a half-precision file's dtype, ``bf16``); the adapter is float32 and
    trains, its base-dependent start (DoRA, PiSSA, OLoRA) derived from each whole weight, one at a time."""
    if device.type == "cpu":
        _return_large_frees()
    lora = cfg.lora_config().to_dict()
    options = {**source.architecture.to_dict(), **lora, "num_classes": num_classes, "dropout": cfg.dropout}
    try:
        model = build_on_meta(lambda: LoRATransformer(**options))
    except ValueError as e:
        raise LoRAError(
            f"cannot load the base model: {source.config_path}: cannot build the model ({e})"
        ) from None
    with_head = model.cls_head is not None and source.architecture.num_classes == num_classes
    fresh = construction_draws(model, fresh_head=model.cls_head is not None and not with_head)
    header = {k: v for k, v in source.header.items() if with_head or not k.startswith(HEAD_PREFIX)}
    half = None if storage == "none" else half_dtype(header)
    # the meta model takes the dtypes of the one a single process loads: the file's, kept or widened
    tensors = {**kept_as(model, header, half), **{k: v.to("meta") for k, v in fresh.items()}}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    assert missing == (["lm_head.weight"] if model.config.tied_head else []) and not unexpected, (
        missing,
        unexpected,
    )
    if model.config.tied_head:
        model.lm_head.weight = model.wte.weight
    model._half = half  # what from_pretrained records: the half-precision file's dtype, kept (or None)
    if half is not None:
        freeze_half(model)
    model.base_source = source
    reader = _Reader(source)
    fingerprint = streamed_fingerprint(model, reader)
    model.configure_lora_training()
    if storage == "bf16":  # (on the meta device: the dtypes only; the values are read so below)
        model.quantize_base(storage, fingerprint=fingerprint)
    for block in model.blocks:
        # q, k and v as three products, each of its own gathered weight: the fused path stacks them into a copy
        # that autograd keeps for the backward of every block, and that FSDP does not free with the block
        block.attn.fused_qkv = False
        fully_shard(block)
        if device.type == "cpu":  # a CPU collective runs in the caller's thread: a block gathered ahead for
            # backward overlaps nothing and holds a second block; each gathers only itself
            block.set_modules_to_backward_prefetch([block])
    # the frozen tensors outside the blocks (embeddings, final norm, LM head) stay whole in every process: a
    # step needs them whole throughout (the embedding at its start, the head at its end), so sharding them
    # would add a gathered copy to each process's shard, and a gather to each step
    kept = {
        p for name, p in model.named_parameters() if not name.startswith("blocks.") and not p.requires_grad
    }
    fully_shard(model, ignored_params=kept)
    model.to_empty(device=device)
    if model.config.tied_head:  # (to_empty makes each module's tensor of its own)
        model.lm_head.weight = model.wte.weight
    _fill(model, reader, fresh)
    _derive_adapter_start(model, reader, fresh, half)
    if model.rope_freq is not None:  # a plain attribute, made on the meta device too
        config = model.config
        model.rope_freq = rotary_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    release_freed_memory()  # the pieces read, back to the system
    return model, fingerprint


@torch.no_grad()
def _fill(model: nn.Module, reader: _Reader, fresh: Mapping[str, torch.Tensor]) -> None:
    """Every parameter and buffer of the sharded ``model``: this process's rows, from the files or, for what
    they do not hold (the adapter, a fresh head), from ``fresh``."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        local = t.to_local() if isinstance(t, DTensor) else t
        a, b = _local_rows(t)
        if a == b:
            continue
        values = fresh[name][a:b] if name in fresh else reader.rows(name, a, b)
        local.copy_(values)


@torch.no_grad()
def _derive_adapter_start(
    model: LoRATransformer, reader: _Reader, fresh: Mapping[str, torch.Tensor], half: torch.dtype | None
) -> None:
    """The base-dependent start of each adapted layer (DoRA's magnitudes, PiSSA's and OLoRA's factors): derived
    as a single process derives it (``LoRALinear.init_from_base``), from the whole weight as loaded, read for
    one layer at a time, then this process's rows kept."""
    for name, layer in model.lora_layers():
        if not (layer.use_dora or layer.lora_init in BASE_DERIVED_INITS):
            continue
        weight = reader.rows(f"{name}.weight", 0, layer.out_features)
        weight = kept_as(model, {f"{name}.weight": weight}, half)[f"{name}.weight"]
        with torch.device("meta"), deferred_base_init():  # (no random draw on the meta device)
            scratch = LoRALinear(layer.in_features, layer.out_features, layer.r, layer.lora_alpha, bias=False,
                                 use_rslora=layer.use_rslora, use_dora=layer.use_dora, lora_init=layer.lora_init)  # fmt: skip
        scratch.weight = nn.Parameter(weight, requires_grad=False)
        for leaf in LORA_LEAVES:
            if getattr(scratch, leaf) is not None:
                value = fresh[f"{name}.{leaf}"].clone()
                setattr(scratch, leaf, nn.Parameter(value) if leaf in scratch._parameters else value)
        scratch.init_from_base()
        for leaf in LORA_LEAVES:
            t = getattr(layer, leaf)
            if t is not None:
                a, b = _local_rows(t)
                (t.to_local() if isinstance(t, DTensor) else t).copy_(getattr(scratch, leaf)[a:b])


# ---------------------------------------------------------------------------------------------------------
# The trainable tensors whole, for checkpoints and outputs


def _trainable(model: nn.Module) -> dict[str, tuple[nn.Module, str, DTensor]]:
    """``name -> (module, leaf, parameter)`` of every sharded trainable parameter, in ``named_parameters``'
    order (the same in every process: each gathers them in it)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and isinstance(p, DTensor):
            module, _, leaf = name.rpartition(".")
            out[name] = (model.get_submodule(module), leaf, p)
    return out


def _swap_in(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict, dict, list, dict | None]:
    """Gather every sharded trainable parameter (and its optimizer state) and put the whole ones in their
    place; returns what :func:`_swap_out` needs to put the shards back."""
    for module in model.modules():  # the root stays gathered after a forward without backward (evaluation)
        if isinstance(module, FSDPModule):
            module.reshard()
    owners = _trainable(model)
    whole = {id(p): nn.Parameter(p.full_tensor(), requires_grad=True) for _, _, p in owners.values()}
    for module, leaf, p in owners.values():
        module._parameters[leaf] = whole[id(p)]
    groups, state = [], None
    if optimizer is not None:
        groups = [list(g["params"]) for g in optimizer.param_groups]
        state = optimizer.state
        gathered_state: dict = {}
        for params in groups:
            for p in params:
                if p in state:
                    gathered_state[whole.get(id(p), p)] = {
                        k: replicated(v) for k, v in sorted(state[p].items())
                    }
        for g, params in zip(optimizer.param_groups, groups, strict=True):
            g["params"] = [whole.get(id(p), p) for p in params]
        optimizer.state = type(state)(dict)
        optimizer.state.update(gathered_state)
    return owners, whole, groups, state


@torch.no_grad()
def _swap_out(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, swapped: tuple, write_back: bool
) -> None:
    """Put the shards back; with ``write_back``, first copy into them this process's rows of the whole
    tensors (and of the optimizer's state, which may have been replaced: a checkpoint loaded)."""
    owners, whole, groups, state = swapped
    sharded = {id(whole[id(p)]): p for _, _, p in owners.values()}
    for module, leaf, p in owners.values():
        if write_back:
            a, b = _local_rows(p)
            p.to_local().copy_(module._parameters[leaf][a:b])
        module._parameters[leaf] = p
    if optimizer is None:
        return
    if write_back:
        new = type(state)(dict)
        for whole_p, s in optimizer.state.items():
            p = sharded.get(id(whole_p), whole_p)
            new[p] = {k: _shard_like(v, p) if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape
                      else v for k, v in s.items()}  # fmt: skip
        state = new
    for g, params in zip(optimizer.param_groups, groups, strict=True):
        g["params"] = params
    optimizer.state = state


@contextlib.contextmanager
def gathered(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, write_back: bool = False
) -> Iterator[None]:
    """Within the block the sharded trainable parameters of ``model`` (and ``optimizer``'s state of them) are
    whole in every process, as plain tensors: what checkpoints, early stopping's best weights and the adapter
    files hold. Every process must enter it (gathering is a collective). With ``write_back`` the shards take
    the whole tensors' values when it ends (a checkpoint loaded within it). A model not sharded: nothing."""
    if not is_sharded(model):
        yield
        return
    swapped = _swap_in(model, optimizer)
    ok = False
    try:
        yield
        ok = True
    finally:
        _swap_out(model, optimizer, swapped, write_back and ok)


def no_gradient_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within the block a sharded ``model``'s backward keeps its gradients in each process, unreduced (the
    micro-batches of an update before its last: one reduce-scatter an update); a model not sharded: nothing."""
    if not is_sharded(model):
        return contextlib.nullcontext()
    return _unsynced(model)


@contextlib.contextmanager
def _unsynced(model: FSDPModule) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def gather_trainable(model: nn.Module) -> None:
    """The sharded trainable parameters of ``model`` whole from now on, in every process (a collective), for
    writing the outputs once training is over: the model no longer trains, nor computes through its base."""
    if is_sharded(model):
        _swap_in(model, None)
