"""Speed and peak memory of LoRA against full fine-tuning and against transformers + PEFT.

Each configuration runs in a fresh subprocess, so its peak memory is its own (CPU: peak RSS from
``getrusage``; CUDA: ``torch.cuda.max_memory_allocated``). A run does ``--warmup`` untimed steps, then
``--steps`` timed ones, and reports the median (on CUDA also the device's time per step, from CUDA events,
beside the wall time). One more step is profiled for its count of operators dispatched and, on CUDA, of
kernels launched and their device time (what a launch-bound step is made of). Training is forward,
cross-entropy on random tokens, backward and AdamW over the trainable parameters only (``foreach`` on CPU,
``fused`` on CUDA); inference is one forward pass of the batch under ``torch.inference_mode``, the base
frozen as it is in the merged model. Dropout is 0 in every model. The peer is transformers'
``GPT2LMHeadModel`` of the same shape (random init, nothing downloaded, SDPA attention) with PEFT LoRA r 8
on the fused ``c_attn``: it adapts q, k and v with as many parameters as our q+v adapter.

    python scripts/benchmark.py --quick                                    # tiny model, seconds
    python scripts/benchmark.py --sizes small --threads 1 --configs lora_qv,peft_qv --profile   # where time goes
    python scripts/benchmark.py --sizes small --threads 2 --rounds 3 --out benchmarks/cpu
    python scripts/benchmark.py --sizes small,gpt2 --device cuda --dtype bf16 --out benchmarks/h100
    python scripts/benchmark.py --sizes small,gpt2 --device cuda --dtype bf16 --compile --out ...
    python scripts/benchmark.py --sizes small --device cuda --compile --compile_mode reduce-overhead --out ...
    python scripts/benchmark.py --base path/to/gpt2 --sizes base --out runs/benchmark-gpt2   # a real base
    python scripts/benchmark.py --sizes smollm2 --threads 2 --rounds 3 --loss chunked \
        --configs full,lora_qv,peft_qv,infer_base,generate,hf_generate --out benchmarks/cpu_smollm2

``--configs`` may also name configurations not run by default: ``lora_qv_ckpt`` (gradient checkpointing),
``infer_lora_qkvo_unmerged`` (all four attention projections adapted), and ``lora_qv_unfused``,
``infer_base_unfused``, ``infer_lora_qkvo_unmerged_unfused``: q, k, v as three products instead of the fused
path (``model.fused_qkv = False``), for a comparison within the same rounds; ``lora_qv_dora`` (DoRA) and
``lora_qv_nf4`` (the frozen base's block weights in 4-bit NF4, QLoRA) and ``lora_qv_bf16`` (in bfloat16,
which bf16 autocast then casts nothing of; under float32 each product widens them) beside ``lora_qv``; and
``lora_qv_sync`` (the step reads its loss back, as a loop that logs every step does) and ``lora_qv_chunked``
(the chunked LM head and loss, whatever ``--loss`` says): with ``lora_qv_unfused`` and ``lora_qv_bf16`` they
fill the report's levers table, what each lever of a LoRA step buys in time and memory.

Peak memory is the process's whole peak (loading the model included) and, as ``train_peak_mem_mb``, the peak
of the timed steps alone (CPU: the resident set's high-water mark reset once the model is built; CUDA: the
peak statistics reset), which is what a 4-bit base changes. On a CPU ``train_tensor_peak_mb`` is the steps'
peak of tensor memory alone (weights, optimizer state, activations, gradients: ``lora.memory.tensor_peak``
of one more step), what CUDA's number counts; the resident set also holds the interpreter, torch and
the allocator's cache. ``lora_qv_nf4_ckpt`` is the 4-bit base with gradient checkpointing, beside
``lora_qv_ckpt``. ``--loss chunked`` trains our models as ``lora/train_lora.py`` does, the LM head and
cross-entropy a chunk of tokens at a time (``model(idx, targets=...)``); the peer always makes the whole
logits tensor.

``--base DIR`` adds the size ``base``: a model folder (this project's, or a Hugging Face GPT-2 or Llama-family
folder) whose weights both models load (the peer from the Hugging Face folder itself; from our format it
starts random), timed on ``--base_batch`` sequences of ``min(128, max_seq_len)`` tokens.

The Llama family: the sizes ``smollm2`` (SmolLM2-135M's shape: hidden 576, 30 layers, 9 heads, 3 key/value
heads, MLP 1,536 gated SiLU, vocabulary 49,152, tied embeddings, RMSNorm, rotary; random weights) and
``tiny_llama`` build ours with those family fields and the peer as transformers' ``LlamaForCausalLM`` of the
same config (random init, SDPA) with PEFT LoRA r 8 on ``q_proj`` and ``v_proj``: our q+v's targets and
parameters. ``generate`` and ``hf_generate`` time greedy generation with the key/value cache, one sequence of
``prompt`` tokens and ``new_tokens`` more (tokens/s counts the new ones): ours (``model.generate``, loaded
from the peer's weights through a temporary Hugging Face folder) against transformers'
``generate(do_sample=False)``; the report says whether the tokens are the same.

Writes ``results.json``, ``results.md`` (table, targets, machine) and ``results.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # `python scripts/benchmark.py` without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch is imported: one line, exit 130
        from lora.errors import exit_on_signals

        exit_on_signals()

from lora.config import COMPILE_MODES, CommandLineParser
from lora.errors import guarded
from lora.files import atomic_write_bytes
from lora.gpt2 import is_hf_folder
from lora.lora_transformer import LoRATransformer
from lora.memory import peak_memory_mb as steps_peak_mb
from lora.memory import reset_peak_memory, tensor_peak
from lora.pretrained import resolve_base
from lora.quantize import import_torchao_quietly
from lora.versions import library_versions
from scripts.bench_report import FLOPS_NOTE, markdown, plot, summarise


@dataclass(frozen=True)
class Shape:
    """A model and the batch it is timed on: GPT-2's layout (``family`` "gpt2": LayerNorm, learned positions,
    a GELU MLP of ``d_ff = 4 d_model``) or Llama's ("llama": RMSNorm, rotary positions, a gated SiLU MLP of
    ``d_ff``, ``num_kv_heads`` key/value heads, no biases, the head tied to the embeddings). Generation
    reads a ``prompt``-token prompt of one sequence and appends ``new_tokens`` greedily."""

    d_model: int
    num_layers: int
    num_heads: int
    seq_len: int
    batch: int
    vocab_size: int
    base: str | None = None  # a model folder whose weights are loaded (the size "base")
    family: str = "gpt2"
    num_kv_heads: int | None = None  # (None: num_heads)
    d_ff: int | None = None  # (None: 4 d_model)
    rope_theta: float = 10000.0
    prompt: int = 32
    new_tokens: int = 64

    @property
    def llama(self) -> bool:
        return self.family == "llama"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def positions(self) -> int:
        """The models' position count: a Llama's 2,048 (rotary: no weights), GPT-2's what a step or a
        generation reaches."""
        return 2048 if self.llama else max(self.seq_len, self.prompt + self.new_tokens)


@dataclass(frozen=True)
class Config:
    """One thing to time: ``task`` "train", "infer" or "generate"; ``impl`` "ours", "peft" (transformers +
    PEFT) or "hf" (transformers alone); LoRA ``targets``."""

    name: str
    task: str
    impl: str = "ours"
    targets: tuple[str, ...] = ()
    merged: bool = False
    checkpointing: bool = False
    fused_qkv: bool = True  # False: q, k, v as three products (the layout before the fused one)
    dora: bool = False  # DoRA's magnitude vectors on the adapted projections
    quantize: str | None = None  # "nf4" or "bf16": how the frozen block weights are stored (lora/quantize.py)
    loss: str | None = None  # "chunked" or "full": this configuration's loss, whatever --loss says
    sync: bool = False  # the step reads its loss back (loss.item(), as a plain training loop logs every step)
    adapters: int = 0  # generate: this many prompts, row i with its own random adapter i (multi_adapter.py)
    separate: bool = False  # ... answered one adapter at a time instead of in one mixed batch


SIZES = {
    "tiny": Shape(d_model=64, num_layers=2, num_heads=2, seq_len=64, batch=4, vocab_size=256),
    "small": Shape(d_model=512, num_layers=8, num_heads=8, seq_len=256, batch=8, vocab_size=256),
    "gpt2": Shape(d_model=768, num_layers=12, num_heads=12, seq_len=128, batch=4, vocab_size=50257),
    # the GPU-speed issue's shapes: GPT-2 small at its full context, batch 8 and 16 (for a GPU, not a CPU)
    "gpt2_1024x8": Shape(d_model=768, num_layers=12, num_heads=12, seq_len=1024, batch=8, vocab_size=50257),
    "gpt2_1024x16": Shape(d_model=768, num_layers=12, num_heads=12, seq_len=1024, batch=16, vocab_size=50257),
    # the Llama family: a tiny one (tests, --quick), and SmolLM2-135M's shape (random weights)
    "tiny_llama": Shape(d_model=64, num_layers=2, num_heads=4, seq_len=64, batch=4, vocab_size=256, family="llama",
                        num_kv_heads=2, d_ff=96, prompt=8, new_tokens=8),
    "smollm2": Shape(d_model=576, num_layers=30, num_heads=9, seq_len=128, batch=4, vocab_size=49152,
                     family="llama", num_kv_heads=3, d_ff=1536, rope_theta=100000.0),
    # the same on a GPU, at sequence 1,024, batch 8
    "smollm2_1024x8": Shape(d_model=576, num_layers=30, num_heads=9, seq_len=1024, batch=8, vocab_size=49152,
                            family="llama", num_kv_heads=3, d_ff=1536, rope_theta=100000.0),
}  # fmt: skip
# the sizes --quick runs (and the Llama family's in tests)
QUICK_SIZES = ("tiny", "tiny_llama")
MULTI_TARGETS = ("q", "k", "v", "o")  # the multi-adapter configurations' adapted projections
CONFIGS = (
    Config("full", "train"),
    Config("lora_qv", "train", targets=("q", "v")),
    Config("lora_qkvo", "train", targets=("q", "k", "v", "o")),
    Config("peft_qv", "train", impl="peft", targets=("q", "v")),
    Config("infer_base", "infer"),
    Config("infer_lora_unmerged", "infer", targets=("q", "v")),
    Config("infer_lora_merged", "infer", targets=("q", "v"), merged=True),
    # greedy generation with a key/value cache: ours (model.generate) and transformers' generate, same weights
    Config("generate", "generate"),
    Config("hf_generate", "generate", impl="hf"),
    # several adapters of one base: 4 prompts in one batch, row i with adapter i, against one adapter at a time
    Config("multi_adapter", "generate", targets=MULTI_TARGETS, adapters=4),
    Config("multi_adapter_separate", "generate", targets=MULTI_TARGETS, adapters=4, separate=True),
)
CHECKPOINTED = Config("lora_qv_ckpt", "train", targets=("q", "v"), checkpointing=True)
# timed only when --configs names them: all four projections adapted, and the unfused q/k/v layout
EXTRA_CONFIGS = (
    CHECKPOINTED,
    Config("infer_lora_qkvo_unmerged", "infer", targets=("q", "k", "v", "o")),
    Config("lora_qv_unfused", "train", targets=("q", "v"), fused_qkv=False),
    Config("infer_base_unfused", "infer", fused_qkv=False),
    Config("infer_lora_qkvo_unmerged_unfused", "infer", targets=("q", "k", "v", "o"), fused_qkv=False),
    Config("lora_qv_dora", "train", targets=("q", "v"), dora=True),
    Config("lora_qv_bf16", "train", targets=("q", "v"), quantize="bf16"),
    Config("lora_qv_nf4", "train", targets=("q", "v"), quantize="nf4"),
    Config("lora_qv_nf4_ckpt", "train", targets=("q", "v"), checkpointing=True, quantize="nf4"),
    # the levers of a LoRA step one at a time, beside lora_qv: each without (sync) or with (chunked) its own
    Config("lora_qv_sync", "train", targets=("q", "v"), sync=True),
    Config("lora_qv_chunked", "train", targets=("q", "v"), loss="chunked"),
)
LORA_R, LORA_ALPHA = 8, 16.0
# Dense bf16 peak FLOP/s by GPU name (first match wins); the H100 PCIe card is slower than the SXM one.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


# -------------------------------------------------------------------------------------------------------
# Pure helpers


def flops_per_token(shape: Shape, config: Config) -> float:
    """Model FLOPs per token as ``bench_report.FLOPS_NOTE`` states them (the peer counts as LoRA q+v).
    Generation: per new token, its context the prompt and half the new tokens (the prompt's own pass not
    counted)."""
    d, L, T = shape.d_model, shape.num_layers, shape.seq_len
    kv = d * shape.kv_heads // shape.num_heads  # the keys' and values' width
    mlp = (3 if shape.llama else 2) * d * shape.ff  # (gate, up, down) or (fc1, fc2)
    n = L * (2 * d * d + 2 * d * kv + mlp) + d * shape.vocab_size  # (q, k, v, o, MLP) x L + LM head
    lora_in_out = {"q": 2 * d, "k": d + kv, "v": d + kv, "o": 2 * d}  # each adapted projection's in + out
    n_lora = L * LORA_R * sum(lora_in_out[t] for t in config.targets)
    if config.task == "generate":
        return 2 * n + 4 * L * (shape.prompt + shape.new_tokens // 2) * d
    attn = 4 * L * T * d
    if config.task == "infer":
        return 2 * n + attn + (0 if config.merged else 2 * n_lora)
    if not config.targets:
        return 6 * n + 3 * attn
    return 4 * n + 3 * attn + 6 * n_lora


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU, else ``None``."""
    return next((f for key, f in PEAK_BF16_FLOPS if key in device_name), None)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by tensors; CPU: peak resident set size of this process (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def time_steps(
    fn: Callable[[], object], warmup: int, steps: int, device: torch.device
) -> tuple[list[float], list[float] | None]:
    """Run ``fn`` ``warmup`` times untimed, then ``steps`` times: each timed step's wall seconds and, on CUDA,
    its seconds on the device's stream between two CUDA events (recorded before and after the step; they
    include the device's waits for the host, so a launch-bound step's device time is close to its wall
    time, and the kernels' own time is :func:`count_launches`'s)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times, device_times = [], []
    for _ in range(steps):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        start = time.perf_counter()
        fn()
        if cuda:
            end.record()
        sync()
        times.append(time.perf_counter() - start)
        if cuda:
            device_times.append(begin.elapsed_time(end) / 1e3)  # elapsed_time: milliseconds
    return times, device_times if cuda else None


# CUDA runtime calls that start kernels (one cudaGraphLaunch replays a whole captured graph)
LAUNCH_CALLS = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
)
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_",
              "aten::matmul", "aten::linear", "aten::_scaled_mm")  # fmt: skip


def count_launches(fn: Callable[[], object], device: torch.device, shares: bool = False) -> dict:
    """One more step under ``torch.profiler``: how many operators it dispatched (``aten`` operators not called
    by another one: what Python and autograd asked for) and, on CUDA, how many kernels it launched and the
    milliseconds the device spent running them (``kernel_ms``; against the step's time, how busy the GPU
    was). The fused q/k/v path's claim, fewer operations per block, is these counts. ``shares`` (``--profile``):
    also where that step's time went, from the same profile (:func:`operator_shares`, as ``profile``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()

    def dispatched(e: object) -> bool:
        parent = e.cpu_parent
        return e.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::"))

    out: dict = {"ops_per_step": sum(1 for e in events if e.device_type == DeviceType.CPU and dispatched(e))}
    if cuda:
        # device work only: not the spans of user annotations (an optimizer step, a compiled region), which
        # the profiler also reports on the device and which cover kernels counted already
        on_device = [
            e
            for e in events
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        ]
        out["kernels_per_step"] = sum(1 for e in events if e.name in LAUNCH_CALLS)
        out["kernel_ms"] = sum(e.time_range.elapsed_us() for e in on_device) / 1e3
    if shares:
        out["profile"] = operator_shares(prof.key_averages(), cuda)
    return out


def operator_shares(events: Sequence, cuda: bool, top: int = 8) -> dict:
    """From a profile's averaged events: ``{"matmul_share", "top": [{"op", "self_ms", "share", "calls"}, ...]}``:
    the operators' self time (on CUDA their kernels' device time) as fractions of the step's time, and the
    share of it in matrix products (:data:`MATMUL_OPS`): where a step's time goes, before anyone optimises it.

    The operators are the events on the CPU's side (user annotations left out). On a CPU the whole is their
    sum. On CUDA it is the kernels' device time: each kernel is also an event of its own, which counting
    beside its operator would count twice, and kernels that no ``aten`` operator launched (a compiled
    graph's Triton kernels, a CUDA graph's replay) still count in the whole though they are in no row."""
    from torch.autograd import DeviceType

    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = [
        e
        for e in events
        if getattr(e, key) > 0
        and not getattr(e, "is_user_annotation", False)
        and e.device_type == DeviceType.CPU
    ]
    ops.sort(key=lambda e: getattr(e, key), reverse=True)
    kernels = [
        e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    total = (
        sum(e.self_device_time_total for e in kernels) if cuda else sum(getattr(e, key) for e in ops)
    ) or 1.0
    matmul = sum(getattr(e, key) for e in ops if e.key in MATMUL_OPS) / total
    top_ops = [
        {"op": e.key, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total, "calls": e.count}
        for e in ops[:top]
    ]
    return {"matmul_share": matmul, "top": top_ops}


def machine_info(device: str) -> dict:
    """CPU model, threads, versions and the GPU, for the report."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "cuda": torch.version.cuda if device == "cuda" else None,
    }
    info.update(library_versions(("transformers", "peft")))
    return info


# -------------------------------------------------------------------------------------------------------
# One configuration (runs inside its own subprocess)


def build_ours(shape: Shape, config: Config, device: torch.device) -> nn.Module:
    """Our model: LoRA on ``config.targets`` (frozen base), or, with no targets, everything trainable."""
    torch.manual_seed(0)
    lora = {"lora_r": LORA_R if config.targets else 0, "lora_alpha": LORA_ALPHA, "use_dora": config.dora,
            "lora_targets": config.targets or ("q",), "adapt_attention": bool(config.targets)}  # fmt: skip
    if config.task == "generate" and not config.adapters and not shape.base and peer_installed():
        with tempfile.TemporaryDirectory(prefix="benchmark-") as folder:
            build_hf(shape, device).save_pretrained(folder)
            return LoRATransformer.from_pretrained(folder, dropout=0.0, lora_r=0).to(device).eval()
    if shape.base:
        model = LoRATransformer.from_pretrained(shape.base, dropout=0.0, **lora).to(device)
    else:
        family = (
            dict(
                norm="rmsnorm",
                mlp="gated",
                positions="rotary",
                num_kv_heads=shape.kv_heads,
                bias=False,
                tied_head=True,
                rope_theta=shape.rope_theta,
                activation="silu",
            )
            if shape.llama
            else {}
        )
        model = LoRATransformer(shape.vocab_size, shape.d_model, shape.num_heads, shape.num_layers,
                                d_ff=shape.ff, max_seq_len=shape.positions, dropout=0.0, **lora,
                                **family).to(device)  # fmt: skip
    if config.adapters:
        return with_random_adapters(model, config.adapters).eval()
    if config.task == "generate":
        return model.eval()
    model.gradient_checkpointing = config.checkpointing
    model.fused_qkv = config.fused_qkv
    if config.targets or config.task == "train":  # a LoRA run's model, or a full fine-tune's
        model.prepare_training("lora" if config.targets else "full", config.quantize or "none")
    # (inference: the base stays frozen, as the merged model's, so both take the fused q/k/v path)
    return model


def adapter_names(n: int) -> list[str]:
    """The names of the multi-adapter configurations' ``n`` adapters."""
    return [f"adapter{i}" for i in range(n)]


def with_random_adapters(model: LoRATransformer, n: int) -> LoRATransformer:
    """``model`` holding ``n`` adapters (:func:`adapter_names`) of random ``B`` (std 0.05, so each changes the
    greedy tokens): the first ``n - 1`` parked, the last one active (each one ``set_adapter`` can name)."""
    names = adapter_names(n)
    for name in names:
        with torch.no_grad():
            for _, layer in model.lora_layers():
                nn.init.normal_(layer.lora_B, std=0.05)
        model.adapters.parked[name] = model.adapters.capture()
    model.set_adapter(names[-1])
    return model


def build_hf(shape: Shape, device: torch.device) -> nn.Module:
    """transformers' model of ``shape`` (``GPT2LMHeadModel`` or ``LlamaForCausalLM``, SDPA attention, no
    dropout), random init from seed 0 (or a GPT-2 folder's weights for the size ``base``); no end-of-text
    token, so a generation runs its whole length."""
    import_torchao_quietly()  # peft and transformers import it when installed: without its log lines
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if shape.base and is_hf_folder(shape.base):  # the same folder, loaded by transformers
        if shape.llama:  # (a Llama-family folder: its attention dropout is 0 unless it says otherwise)
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(shape.base, attention_dropout=0.0, use_cache=False,
                                                        attn_implementation="sdpa").to(device)  # fmt: skip
        return GPT2LMHeadModel.from_pretrained(shape.base, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                               use_cache=False, attn_implementation="sdpa").to(device)  # fmt: skip
    if shape.llama:
        cfg = LlamaConfig(
            vocab_size=shape.vocab_size, hidden_size=shape.d_model, intermediate_size=shape.ff,
            num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.kv_heads, hidden_act="silu", max_position_embeddings=shape.positions,
            rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=shape.rope_theta, attention_dropout=0.0,
            use_cache=False, bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
        )  # fmt: skip
        return LlamaForCausalLM(cfg).to(device)
    cfg = GPT2Config(
        vocab_size=shape.vocab_size, n_positions=shape.positions, n_embd=shape.d_model,
        n_layer=shape.num_layers, n_head=shape.num_heads, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, use_cache=False, bos_token_id=None, eos_token_id=None, attn_implementation="sdpa",
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).to(device)


def build_peer(shape: Shape, device: torch.device) -> nn.Module:
    """:func:`build_hf`'s model with PEFT LoRA r 8 as ours: GPT-2's on the fused ``c_attn`` (q, k and v, with
    as many parameters as our q+v), a Llama's on ``q_proj`` and ``v_proj``."""
    import_torchao_quietly()
    from peft import LoraConfig, get_peft_model

    model = build_hf(shape, device)
    gpt2 = not shape.llama
    lora = LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
        target_modules=["c_attn"] if gpt2 else ["q_proj", "v_proj"], fan_in_fan_out=gpt2,
    )  # fmt: skip
    return get_peft_model(model, lora).to(device)


def prepare_inference(model: nn.Module, config: Config, idx: torch.Tensor, autocast: Callable) -> dict:
    """Eval mode, a trained-looking adapter (not ``B = 0``) and, for a merged configuration, the merge, checked
    on one sequence's hidden states (no logits to inflate peak memory): ``{"merged_vs_unmerged_max_abs_diff"}``
    or ``{}``."""
    model.eval()
    if config.targets:
        for _, layer in model.lora_layers():
            nn.init.normal_(layer.lora_B, std=0.02)
    if not config.merged:
        return {}
    with torch.inference_mode(), autocast():
        before = model.hidden_states(idx[:1]).float()
        model.merge_lora()
        after = model.hidden_states(idx[:1]).float()
    return {"merged_vs_unmerged_max_abs_diff": (after - before).abs().max().item()}


def paired_times(shape: Shape, configs: Sequence[Config], opts: dict, passes: int) -> dict:
    """Steps of ``configs`` timed side by side in one process: the models built together, then ``passes``
    passes each running every model's step once, in reverse order every other pass. A ratio of two
    configurations taken within each pass (:func:`summarise`'s ``*_paired``) compares steps moments apart, so
    the machine's drift and the spread between separate processes cancel. ``{name: {"ms": median,
    "ms_passes": [...]}}``."""
    device = torch.device(opts["device"])
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    steps = {c.name: make_step(build(shape, c, device), shape, c, opts, device).fn for c in configs}
    for fn in steps.values():
        time_steps(fn, max(opts["warmup"], 1), 0, device)  # warm-up only
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(passes):
        for name in list(steps) if i % 2 == 0 else list(steps)[::-1]:
            times[name] += time_steps(steps[name], 0, 1, device)[
                0
            ]  # one step, the device synchronised around it
    return {name: {"ms": 1e3 * statistics.median(ts), "ms_passes": [round(1e3 * t, 3) for t in ts]}
            for name, ts in times.items()}  # fmt: skip


def batch(shape: Shape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The one batch every step reuses (no data loading in the loop): random tokens and targets (B, T)."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len), generator=g).to(device)
    return idx, torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len), generator=g).to(device)


@dataclass
class Step:
    """A configuration's step, ready to run: ``fn()`` does one; ``optimizer`` and ``losses`` are training's."""

    fn: Callable[[], None]
    optimizer: torch.optim.Optimizer | None = None
    losses: list[torch.Tensor] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def make_step(model: nn.Module, shape: Shape, config: Config, opts: dict, device: torch.device) -> Step:
    """One step of ``config`` on ``model``: a forward under ``inference_mode`` (the adapter given and merged
    by :func:`prepare_inference`), or forward, loss, backward and AdamW over the trainable parameters."""
    if config.task == "generate":
        return generation_step(model, shape, config, device)
    idx, targets = batch(shape, device)
    peer = config.impl == "peft"
    forward = (lambda m, x: m(input_ids=x).logits) if peer else (lambda m, x: m(x))
    chunked = (config.loss or opts.get("loss")) == "chunked" and not peer
    bf16 = opts["dtype"] == "bf16"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    if config.task == "infer":
        extra = prepare_inference(model, config, idx, autocast)
        run = compiled(model, opts)

        def infer() -> None:
            with torch.inference_mode(), autocast():
                forward(run, idx)

        return Step(infer, extra=extra)
    model.train()
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0, **fast)
    run = compiled(model, opts)
    losses: list[torch.Tensor] = []

    def train() -> None:
        with autocast():
            if chunked:  # as lora/train_lora.py trains: the head and loss a chunk of tokens at a time
                loss = run(idx, targets=targets)
            else:
                logits = forward(run, idx)
        if not chunked:
            loss = F.cross_entropy(logits.float().reshape(-1, shape.vocab_size), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if config.sync:  # the host waits for the device: what the trainer's reads every log_every steps avoid
            loss.item()
        losses.append(loss.detach())  # only the last is read (CUDA graphs reuse an earlier one's memory)

    return Step(train, opt, losses)


def generation_step(model: nn.Module, shape: Shape, config: Config, device: torch.device) -> Step:
    """One greedy generation of ``shape.new_tokens`` tokens after a random ``shape.prompt``-token prompt (one
    sequence; ``config.adapters`` of them for the multi-adapter configurations), each with the key/value cache:
    ours ``model.generate(temperature=0)``, transformers' ``generate(do_sample=False)``. Multi-adapter: one
    ``generate(adapter_names=...)`` over the batch, row i with adapter i, or (``separate``) each row alone after
    ``set_adapter``. ``extra["generated"]``: the new tokens of the last call, rows joined (with the same weights,
    ours and the peer's, or mixed and separate, are the same tokens)."""
    g = torch.Generator().manual_seed(2)
    rows = config.adapters or 1
    prompt = torch.randint(0, shape.vocab_size, (rows, shape.prompt), generator=g).to(device)
    extra: dict = {}
    names = adapter_names(config.adapters)
    if config.adapters and config.separate:

        def generate() -> torch.Tensor:
            out = []
            for i, name in enumerate(names):
                model.set_adapter(name)
                out.append(model.generate(prompt[i : i + 1], shape.new_tokens, temperature=0.0))
            return torch.cat(out)
    elif config.adapters:

        def generate() -> torch.Tensor:
            return model.generate(prompt, shape.new_tokens, temperature=0.0, adapter_names=names)
    elif config.impl == "hf":
        mask = torch.ones_like(prompt)

        def generate() -> torch.Tensor:
            return model.generate(prompt, attention_mask=mask, max_new_tokens=shape.new_tokens, do_sample=False,
                                  use_cache=True, pad_token_id=0)  # fmt: skip
    else:

        def generate() -> torch.Tensor:
            return model.generate(prompt, shape.new_tokens, temperature=0.0)

    def step() -> None:
        out = generate()
        if out.shape[1] != shape.prompt + shape.new_tokens:  # (no end-of-text token stops it early)
            raise RuntimeError(f"{config.name} generated {out.shape[1] - shape.prompt} tokens, not "
                               f"{shape.new_tokens}")  # fmt: skip
        extra["generated"] = [t for row in out[:, shape.prompt :].tolist() for t in row]

    return Step(step, extra=extra)


def compiled(model: nn.Module, opts: dict) -> Callable[..., object]:
    """``model`` under ``torch.compile`` in ``opts["compile_mode"]`` (reduce-overhead: CUDA graphs) with
    ``--compile``, else the model itself."""
    return torch.compile(model, mode=opts.get("compile_mode", "default")) if opts["compile"] else model


def build(shape: Shape, config: Config, device: torch.device) -> nn.Module:
    """The model ``config`` times: the peer (transformers + PEFT, or transformers alone) or ours."""
    with device:  # parameters are made (and initialised) where they will live
        if config.impl == "hf":
            return build_hf(shape, device).eval()
        return build_peer(shape, device) if config.impl == "peft" else build_ours(shape, config, device)


def run_config(shape: Shape, config: Config, opts: dict) -> dict:
    """Time one configuration in this process; return its measurements."""
    device = torch.device(opts["device"])
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    base_mb = peak_memory_mb(device)
    model = build(shape, config, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    built_mb = peak_memory_mb(device)
    reset_peak_memory(device)  # from here: the peak of the steps (VmHWM / CUDA's statistics), not of building
    made = make_step(model, shape, config, opts, device)
    step, opt, extra = made.fn, made.optimizer, made.extra
    generating = config.task == "generate"
    B, T = (config.adapters or 1, shape.new_tokens) if generating else (shape.batch, shape.seq_len)
    bf16 = opts["dtype"] == "bf16"

    times, device_times = time_steps(step, opts["warmup"], opts["steps"], device)
    # read before the profiles below, whose own bookkeeping (a trace of every operation) would count too
    steps_peak, whole_peak = steps_peak_mb(device), max(peak_memory_mb(device), built_mb)
    extra.update(count_launches(step, device, shares=bool(opts.get("profile"))))
    if config.task == "train" and device.type == "cpu":  # one more step, its tensors counted (untimed)
        held = [*model.parameters(), *model.buffers()] + [  # everything the run holds, used in a step or not
            t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)
        ]
        extra["train_tensor_peak_mb"] = sum(tensor_peak(step, held)) / 2**20
    elif config.task == "train":
        extra["train_tensor_peak_mb"] = steps_peak  # CUDA's peak is of tensors already
    if config.task == "train":
        extra["final_loss"] = made.losses[-1].item()
    step_s = statistics.median(times)
    tokens_per_s = B * T / step_s
    fpt = flops_per_token(shape, config)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" and bf16 else None
    return {
        "status": "ok",
        "step_ms": 1e3 * step_s,
        "step_ms_all": [round(1e3 * t, 2) for t in times],
        "device_ms": None if device_times is None else 1e3 * statistics.median(device_times),
        "tokens_per_s": tokens_per_s,
        "peak_mem_mb": whole_peak,
        "train_peak_mem_mb": steps_peak,
        "mem_before_model_mb": base_mb,
        "trainable_params": sum(p.numel() for p in trainable) if config.task == "train" else 0,
        "total_params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "flops_per_token": fpt,
        "mfu": fpt * tokens_per_s / peak if peak else None,
        **extra,
    }


def run_in_subprocess(shape: Shape, config: Config, opts: dict) -> dict:
    """Run one configuration in a fresh Python process and parse its JSON reply."""
    if config.impl != "ours" and not peer_installed():
        return {
            "status": "skipped",
            "reason": "transformers or peft is not installed (install the `bench` extra)",
        }
    return run_worker({"shape": asdict(shape), "config": asdict(config), "opts": opts})


def peer_installed() -> bool:
    """Whether transformers and peft, the peer's libraries, are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("transformers", "peft"))


def run_worker(job: dict) -> dict:
    """Run a worker's job (one configuration, or :func:`paired_times`) in a fresh Python process; its reply."""
    env = dict(os.environ)
    if job["opts"]["threads"]:
        env["OMP_NUM_THREADS"] = str(job["opts"]["threads"])
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()
        return {"status": "error", "reason": tail[-1] if tail else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# measurements kept per round (``<key>_rounds``) for ratios within a round, and merged as medians
ROUND_KEYS = ("step_ms", "device_ms", "kernel_ms", "peak_mem_mb", "train_peak_mem_mb", "train_tensor_peak_mb",
              "mfu")  # fmt: skip


def merge_rounds(runs: list[dict]) -> dict:
    """Several fresh-process runs of one configuration -> one record (medians over the runs).

    ``step_ms_rounds`` and ``peak_mem_mb_rounds`` keep each round's value (``None`` where that round's
    process failed), so that ratios can be taken within a round (see :func:`summarise`).
    """
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for key in (*ROUND_KEYS, "mem_before_model_mb"):
        if all(r.get(key) is not None for r in ok):  # (not measured: device times on a CPU, older results)
            out[key] = statistics.median(r[key] for r in ok)
    out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in ok)
    for key in ROUND_KEYS:
        out[f"{key}_rounds"] = [round(r[key], 4) if r["status"] == "ok" and r.get(key) is not None else None
                                for r in runs]  # fmt: skip
    return out


# -------------------------------------------------------------------------------------------------------
# Command line


# the flags each worker process needs, also recorded in the report's settings
WORKER_OPTIONS = ("device", "dtype", "compile", "compile_mode", "threads", "steps", "warmup", "profile",
                  "loss")  # fmt: skip


# the run's size and length: by default, and with --quick (which refuses them given)
RUN_DEFAULTS = {"sizes": "small", "steps": 10, "warmup": 3, "rounds": 1}
QUICK = {"sizes": ",".join(QUICK_SIZES), "steps": 3, "warmup": 1, "rounds": 1}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = CommandLineParser(
        prog="benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sizes",
        default=None,
        help=f"comma-separated, from {', '.join(SIZES)} (base: --base; default: small)",
    )
    p.add_argument("--base", default=None, help="a model folder to time as the size 'base' (its own weights)")
    p.add_argument("--base_batch", type=int, default=4, help="sequences per step for the size 'base'")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="bf16 = autocast (cuda default)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--compile_mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs, for the launch-bound "
                   "small shapes on a GPU; default: default)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default: 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3)")
    p.add_argument("--rounds", type=int, default=None,
                   help="fresh processes per configuration, interleaved (default: 1)")  # fmt: skip
    p.add_argument("--configs", default=None, help="comma-separated subset of the configurations")
    p.add_argument("--gradient_checkpointing", action="store_true", help="also time LoRA q+v checkpointed")
    p.add_argument("--skip_peer", action="store_true", help="do not run transformers + PEFT")
    p.add_argument(
        "--loss",
        default="full",
        choices=["full", "chunked"],
        help="our models' training loss: from the whole logits (as the peer), or chunked (as train_lora.py)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="report the profiled step's top operators by self (CUDA: device) time, and the share of matrix "
        "products",
    )
    p.add_argument(
        "--paired",
        type=int,
        default=0,
        help="also time the inference configurations side by side in one process, this many passes, each "
        "giving every model's latency over the base's moments apart (0: off)",
    )
    p.add_argument("--out", default="runs/benchmark", help="folder for results.{json,md,png}")
    p.add_argument("--quick", action="store_true",
                   help="tiny models (GPT-2's and Llama's layout), 3 steps after 1, one round, 1 thread (unless "
                   "--threads): seconds")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    settings = QUICK if args.quick else RUN_DEFAULTS
    if args.quick and (given := [k for k in QUICK if getattr(args, k) is not None]):
        p.error(f"--quick sets --{given[0]} itself ({QUICK[given[0]]}): drop one of them")
    for key, value in settings.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick and args.threads is None:  # a tiny model: thread start-up and contention would dominate
        args.threads = 1
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if args.base is not None:
        if args.base_batch < 1:
            p.error(f"--base_batch must be >= 1, got {args.base_batch}")
        arch = resolve_base(args.base).architecture  # a bad folder: one line, exit 2
        family = "llama" if arch.positions == "rotary" else "gpt2"
        SIZES["base"] = Shape(arch.d_model, arch.num_layers, arch.num_heads, min(128, arch.max_seq_len),
                              args.base_batch, arch.vocab_size, str(Path(args.base).resolve()), family,
                              arch.num_kv_heads, arch.d_ff, arch.rope_theta)  # fmt: skip
    elif "base" in args.sizes:
        p.error("--sizes base needs --base DIR")
    bad = [s for s in args.sizes if s not in SIZES]
    if bad or not args.sizes:
        p.error(f"unknown --sizes {bad}: choose among {', '.join(SIZES)}")
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.paired < 0:
        p.error(f"--paired must be >= 0, got {args.paired}")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        p.error("--warmup must be >= 0 and --threads >= 1")
    names = [c.name for c in (*CONFIGS, *EXTRA_CONFIGS)]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()] if args.configs else None
    if args.configs is not None and (not args.configs or set(args.configs) - set(names)):
        p.error(f"unknown --configs {args.configs}: choose among {', '.join(names)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    if args.compile_mode is not None and not args.compile:
        p.error("--compile_mode has no effect without --compile: add --compile, or drop it")
    args.compile_mode = args.compile_mode or "default"
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run every configuration of every size; write results.{json,md,png}; return the results."""
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        shape = Shape(**job["shape"])
        if "paired" in job:
            named = {c.name: c for c in (*CONFIGS, *EXTRA_CONFIGS)}
            configs = [named[n] for n in job["paired"]]
            print(json.dumps(paired_times(shape, configs, job["opts"], job["passes"])))
            return {}
        config = Config(**{**job["config"], "targets": tuple(job["config"]["targets"])})
        print(json.dumps(run_config(shape, config, job["opts"])))
        return {}
    opts = {k: getattr(args, k) for k in WORKER_OPTIONS}
    configs = [c for c in CONFIGS if not (args.skip_peer and c.impl != "ours")]
    if args.gradient_checkpointing:
        configs.insert(3, CHECKPOINTED)
    if args.configs:
        configs = [c for c in (*CONFIGS, *EXTRA_CONFIGS) if c.name in args.configs]
    info = machine_info(args.device)
    results: dict[str, dict[str, dict]] = {}
    paired: dict[str, dict] = {}  # size -> paired_times' record (--paired)
    for size in args.sizes:
        # side by side first: on a machine lent for minutes (a GPU), a time limit then cuts rounds, not this
        side = [c.name for c in configs if c.impl == "ours" or peer_installed()]
        if args.paired and len(side) > 1:
            job = {"shape": asdict(SIZES[size]), "paired": side, "passes": args.paired, "opts": opts}
            paired[size] = run_worker(job)
            print(f"[{size} paired] {paired[size]}", flush=True)
            result = write_report(Path(args.out), info, args, argv, results, paired)
        runs: dict[str, list[dict]] = {c.name: [] for c in configs}
        for rnd in range(args.rounds):
            # every other round in reverse order, so no configuration always runs first or last
            for config in configs if rnd % 2 == 0 else configs[::-1]:
                r = run_in_subprocess(SIZES[size], config, opts)
                runs[config.name].append(r)
                shown = f"{r['step_ms']:.1f} ms, {r['peak_mem_mb']:.0f} MiB" if r["status"] == "ok" else r
                print(f"[{size} round {rnd + 1}/{args.rounds}] {config.name}: {shown}", flush=True)
                results[size] = {name: merge_rounds(rs) for name, rs in runs.items() if rs}
                # written after every run, so a run cut off by a time limit keeps what it measured
                result = write_report(Path(args.out), info, args, argv, results, paired)
    print(f"\nwrote {args.out}/results.{{json,md,png}}\n\n" + markdown(result))
    return result


def ok_paired(record: dict | None) -> dict | None:
    """:func:`paired_times`' record, or ``None`` where there is none or its worker failed."""
    return None if record is None or record.get("status") == "error" else record


def write_report(
    out: Path, info: dict, args: argparse.Namespace, argv: Sequence[str] | None, results: dict, paired: dict
) -> dict:
    """Assemble the result record and write ``results.json``, ``results.md`` and ``results.png``."""
    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    threads = next((r["threads"] for rows in results.values() for r in rows.values() if "threads" in r), None)
    opts = {k: getattr(args, k) for k in WORKER_OPTIONS}
    argv = list(sys.argv[1:] if argv is None else argv)
    result = {
        "machine": info,
        "settings": {**opts, "rounds": args.rounds, "threads_used": threads, "argv": argv},
        "shapes": {s: asdict(SIZES[s]) for s in results},
        "results": results,
        "summary": {
            s: summarise(results.get(s, {}), ok_paired(paired.get(s)))
            for s in args.sizes
            if s in results or s in paired
        },
        "paired": paired,
        "flops_note": FLOPS_NOTE,
    }
    out.mkdir(parents=True, exist_ok=True)
    # whole files or none: a run killed mid-write (a GPU session's time limit) keeps the last report
    atomic_write_bytes(out / "results.json", (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(out / "results.md", markdown(result).encode())
    if results:  # (nothing to draw while only the side-by-side passes have run)
        plot(result, out / "results.png")
    return result


if __name__ == "__main__":
    raise SystemExit(guarded("benchmark.py", lambda: (main(), 0)[1], "--debug" in sys.argv))
