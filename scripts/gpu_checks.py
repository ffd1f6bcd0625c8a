"""The checks and timings that need a GPU, in one call (the project's GPU time is scarce): run it there.

It runs in stages, most wanted first; ``--stages`` picks some. ``--budget_s`` is the time the script may take,
counted from its start (after Python has imported torch): a stage is not started with under 45 s left (a
compiled trainer run, which cannot be stopped part way, with under 90 s), a benchmark still running 10 s
before the end is killed with its worker (the rounds it finished are kept), and the JSON, rewritten after
every stage, keeps what was measured. Give the device call's ``timeout_s`` about a minute more than the
budget. One check or run that fails is reported with its error, and the rest still run. One call will not
get through every stage at the GPU's shapes: the later stages are for a later call (``--stages``).

1. ``checks``, **correctness on the device**: the model's logits and LoRA gradients against a float64 CPU
   reference, for plain LoRA and for DoRA with a PiSSA start (the variants' own paths); under bf16 autocast,
   the loss and LoRA gradients with the base stored in bfloat16 against the float32 base's (equal, bit for
   bit, with the float32 base run twice as the control); and with torchao installed, a 4-bit NF4 base on
   the device against the same 4-bit base on the CPU.
2. ``trainer``, **the real trainer, and no host-device synchronisation inside a step**: ``LoRATrainer``
   (LoRA q+v, with a float32 and with a bfloat16 base) and ``Trainer`` (full fine-tuning) at the GPT-2-small
   shape (768 wide, 12 layers, 12 heads, vocabulary 50,257, sequence 1,024, batch 8), tokens/s from the
   steps between reads, under ``torch.cuda.set_sync_debug_mode("warn")``: ``syncs`` counts the
   synchronising calls in the steps (the reads every ``log_every`` steps let through); ``sync_free``: none.
3. ``main_job``: ``lora/train_lora.py`` with its defaults on the device, as a user runs it (the base
   pretrained first): exit status, seconds, the frozen base's metric and the adapter's.
4. ``bench_speed``: ``scripts/benchmark.py`` in fresh processes (``--bench_rounds`` rounds of
   ``--bench_steps`` steps) at that shape, bf16: full fine-tuning, LoRA q+v, transformers + PEFT and
   inference (the issue's targets), and the levers of a LoRA q+v step one at a time (q, k, v unfused, a
   bfloat16 base, reading the loss every step, the chunked head); also side by side in one process
   (``--paired 30``), and each configuration's profiled step's share of matrix products (``--profile``).
5. ``bench_llama``: the Llama family at SmolLM2-135M's shape (576 wide, 30 layers, 9 heads, 3 key/value heads,
   gated MLP 1,536, vocabulary 49,152; random weights), sequence 1,024, batch 8 (``smollm2_1024x8``), bf16, the
   chunked loss: full fine-tuning, LoRA q+v against transformers' ``LlamaForCausalLM`` + PEFT on
   ``q_proj``/``v_proj``, inference, and greedy generation with the key/value cache against transformers'
   ``generate`` (64 new tokens after 32; whether the tokens are the same).
6. ``trainer_compiled``: stage 2 under ``--compile`` (its syncs counted from the first read, after the
   compilation).
7. ``bench_compiled``: full, LoRA q+v and the peer at stage 4's shape, every model compiled alike.
8. ``bench_graphs``: the same at the launch-bound ``small`` shape, compiled with CUDA graphs
   (``--compile_mode reduce-overhead``).
9. ``bench_variants``: the nf4 base (checkpointed or not) and DoRA at the benchmark's ``gpt2`` shape, with
   the chunked loss.
10. ``trainer_graphs``: stage 2 compiled with CUDA graphs.

Prints a short table last and writes ``gpu_checks.json`` into ``--out``, the benchmarks' whole reports in it
(``reports``), and the benchmarks' folders (``results.{json,md,png}``) into ``--bench_out`` (default: the
same): the device tool brings back at most 8 files, so on the GPU machine the folders go elsewhere and
come back as one archive. torchao (for the nf4 check) may be missing there: copy an installed one in with
its ``torchao-<version>.dist-info`` beside it, both on ``PYTHONPATH``. Without the metadata, importing
transformers' peers fails (they read torchao's version: ``InvalidVersion: 'unknown'``), and so would every
PEFT row; ``libraries``, recorded and printed first, shows each library's version or its import error.
On a CPU (``--device cpu``, e.g. to try the script) there are no syncs to count and the sizes should be
small.

    python scripts/gpu_checks.py --budget_s 480 --out $OUT --bench_out /tmp/bench; tar czf $OUT/bench.tgz -C /tmp/bench .
    # torchao copied in from a checkout's venv, with its metadata (carry both folders to the GPU machine):
    mkdir -p /tmp/ao && ln -s $PWD/.venv/lib/python3.11/site-packages/torchao{,-0.18.0.dist-info} /tmp/ao/ && export PYTHONPATH=/tmp/ao
    python scripts/gpu_checks.py --stages bench_compiled,bench_graphs --out $OUT   # what an earlier call left
    python scripts/gpu_checks.py --device cpu --size tiny --steps 4 --bench_rounds 1 --bench_steps 2 --out /tmp/gc
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/gpu_checks.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch is imported: one line, exit 130
        from lora.errors import exit_on_signals

        exit_on_signals()

import torch

from lora.config import CommandLineParser
from lora.data import BatchLoader, TaskData
from lora.errors import guarded
from lora.files import atomic_write_bytes
from lora.lora_transformer import LoRATransformer
from lora.trainer import LoRATrainer, Trainer
from lora.versions import library_versions

SIZES = {  # (d_model, layers, heads, vocabulary, sequence, batch)
    "tiny": (128, 2, 2, 256, 64, 4),  # 128 wide: the smallest width whose weights tile NF4's blocks
    "gpt2": (768, 12, 12, 50257, 1024, 8),
}


def random_data(vocab: int, seq: int, rows: int, seed: int = 0) -> TaskData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (rows, seq), generator=g, dtype=torch.int32)
    return TaskData(x, torch.roll(x, -1, dims=1))


def build(size: str, lora: bool, device: str, **variant: object) -> LoRATransformer:
    d, layers, heads, vocab, seq, _ = SIZES[size]
    torch.manual_seed(0)
    return LoRATransformer(vocab, d, heads, layers, max_seq_len=seq, dropout=0.0, lora_r=8 if lora else 0,
                           lora_alpha=16, lora_targets=("q", "v"), **variant).to(device)  # fmt: skip


SYNC_WARNING = (
    "synchronizing CUDA operation"  # what set_sync_debug_mode("warn") says at each synchronising call
)


def time_trainer(size: str, lora: bool, device: str, steps: int, compile: bool, compile_mode: str = "default",
                 storage: str | None = None) -> dict:  # fmt: skip
    """Train ``steps`` steps after a warm-up; tokens/s over the steps between the first and last read.
    ``storage`` ("bf16"): the frozen base stored so (``quantize_base``), as ``train_lora.py`` does on a GPU.

    On CUDA the steps run under ``torch.cuda.set_sync_debug_mode("warn")``, which warns at every call that makes
    the host wait for the device; the reads every ``log_every`` steps are let through. ``syncs`` counts the
    warnings in the steps (a compiled run's from its first read on, its compilation left out), and
    ``sync_free`` is ``syncs == 0``: the issue's "no host-device synchronisation inside a step"."""
    _, _, _, vocab, seq, batch = SIZES[size]
    cuda = device != "cpu"
    model = build(size, lora, device)
    model.prepare_training("lora" if lora else "full", storage or "none")
    log_every = max(steps // 2, 1)
    data = random_data(vocab, seq, batch * (steps + log_every))  # one epoch holds every step
    kind = LoRATrainer if lora else Trainer
    trainer = kind(model, BatchLoader(data, batch, seed=0), BatchLoader(data, batch, shuffle=False),
                   device=device, max_steps=steps + log_every, eval_every=10**6, log_every=log_every,
                   compile=compile, compile_mode=compile_mode, quiet=True)  # fmt: skip
    trainer.evaluate = lambda max_batches=None: {"val_loss": 0.0, "metric": 0.0}  # timing the steps only
    reads: list[tuple[float, int, int]] = []  # (when, the trainer's step, sync warnings so far) at each read
    flush = trainer._flush
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every synchronising call, not only the first from each line

        def timed_flush(pending, bar):  # the reads are the only place the host may wait for the device
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
            out = flush(pending, bar)
            if cuda:
                torch.cuda.synchronize()
            syncs = sum(1 for w in caught if SYNC_WARNING in str(w.message))
            reads.append((time.perf_counter(), trainer.step, syncs))
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            return out

        trainer._flush = timed_flush
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    # reads[0] ends the warm-up (compilation included); the steps after it are timed
    (start, first, synced_first), (end, last, synced) = reads[0], reads[-1]
    seconds, timed = end - start, last - first
    syncs = (synced - synced_first if compile else synced) if cuda else None
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {"tokens_per_s": batch * seq * timed / seconds, "step_ms": 1e3 * seconds / timed, "steps_timed": timed,
            "peak_mem_mb": peak, "syncs": syncs, "sync_free": None if syncs is None else syncs == 0,
            "final_loss": trainer.history["train_loss"][-1]}  # fmt: skip


def check_gradients(size: str, device: str, quantize: bool = False, **variant: object) -> dict:
    """LoRA logits and gradients on ``device`` (float32) against float64 on the CPU (``quantize``: both with
    a 4-bit NF4 base, the reference float32 on the CPU)."""
    _, _, _, vocab, seq, _ = SIZES[size]
    ref = build(size, True, "cpu", **variant)
    ref = ref if quantize else ref.double()
    for _, layer in ref.lora_layers():
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    ours = build(size, True, device, **variant)
    ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    if quantize:
        for model in (ref, ours):
            model.configure_lora_training()
            model.quantize_base("nf4")
    idx = torch.randint(0, vocab, (2, min(seq, 128)), generator=torch.Generator().manual_seed(1))
    out = {}
    for name, model in (("ref", ref), ("ours", ours)):
        model.configure_lora_training()
        logits = model(idx.to(device if name == "ours" else "cpu"))
        logits.float().square().mean().backward()
        grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.requires_grad}
        out[name] = (logits.detach().double().cpu(), grads)
    (a, ga), (b, gb) = out["ref"], out["ours"]
    grad_err = max_rel_err([(ga[k], gb[k]) for k in ga])
    return {"logits_max_abs_err": (a - b).abs().max().item(), "lora_grad_max_rel_err": grad_err}


def max_rel_err(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The largest ``max |x - y| / max |x|`` over the pairs (a reference ``x``, a tensor ``y`` of its shape)."""
    return max(((x - y).abs().max() / x.abs().max().clamp(min=1e-12)).item() for x, y in pairs)


def check_bf16_base(size: str, device: str) -> dict:
    """The loss and LoRA gradients under bf16 autocast on ``device``, the base stored in bfloat16 against the
    float32 base: equal bit for bit (autocast's cast and the stored copy are the same rounding), unless the
    device's kernels do not repeat themselves bit for bit, which the float32 base run twice (``repeat_*``)
    tells apart."""
    _, _, _, vocab, seq, _ = SIZES[size]
    idx = torch.randint(0, vocab, (2, min(seq, 128)), generator=torch.Generator().manual_seed(1)).to(device)
    steps = []
    for storage in (None, None, "bf16"):
        model = build(size, True, device)
        gen = torch.Generator().manual_seed(2)  # the same trained-looking B's in every model
        with torch.no_grad():
            for _, layer in model.lora_layers():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
        model.prepare_training("lora", storage or "none")
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(idx, targets=torch.roll(idx, -1, dims=1))
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        steps.append((loss.detach().cpu(), [g.detach().cpu() for g in grads]))

    def compare(one: tuple, other: tuple) -> tuple[bool, bool, float]:
        (a, ga), (b, gb) = one, other
        pairs = list(zip(ga, gb, strict=True))
        return torch.equal(a, b), all(torch.equal(x, y) for x, y in pairs), max_rel_err(pairs)

    repeat, bf16 = compare(steps[0], steps[1]), compare(steps[0], steps[2])
    return {"loss_equal": bf16[0], "grads_equal": bf16[1], "lora_grad_max_rel_err": bf16[2],
            "repeat_loss_equal": repeat[0], "repeat_grads_equal": repeat[1], "repeat_max_rel_err": repeat[2]}  # fmt: skip


# {stage: (size on a GPU, size in a dry run, benchmark arguments)}: the targets at its shape, eager,
# beside the levers of a LoRA step one at a time (the profiled step's shares too); every model compiled
# alike (ours and the peer); the launch-bound small shape compiled with CUDA graphs; the variants at the
# ``gpt2`` shape (a dry run takes the small size for them: the tiny size's 64 x 64 weights tile no
# 16,384-weight NF4 block)
BENCHMARKS = {
    "bench_speed": ("gpt2_1024x8", "tiny",
                    ["--configs", "full,lora_qv,peft_qv,infer_base,infer_lora_unmerged,infer_lora_merged,"
                     "lora_qv_unfused,lora_qv_bf16,lora_qv_sync,lora_qv_chunked", "--paired", "30", "--profile"]),
    "bench_llama": ("smollm2_1024x8", "tiny_llama",
                    ["--loss", "chunked", "--configs", "full,lora_qv,peft_qv,infer_base,generate,hf_generate"]),
    "bench_compiled": ("gpt2_1024x8", "tiny", ["--compile", "--configs", "full,lora_qv,peft_qv"]),
    "bench_graphs": ("small", "tiny",
                     ["--compile", "--compile_mode", "reduce-overhead", "--configs", "full,lora_qv,peft_qv"]),
    "bench_variants": ("gpt2", "small",
                       ["--loss", "chunked", "--configs", "lora_qv,lora_qv_nf4,lora_qv_ckpt,lora_qv_nf4_ckpt,"
                        "lora_qv_dora"]),
}  # fmt: skip
BENCH_KEYS = ("lora_qv_step_vs_full", "lora_qv_tokens_vs_peft", "lora_qv_mfu", "full_mfu", "unmerged_vs_base_latency",
              "merged_vs_base_latency", "lora_qv_mem_vs_full", "lora_qv_fused_vs_unfused", "bf16_base_step_vs_fp32",
              "bf16_base_mem_vs_fp32", "sync_free_vs_sync", "chunked_vs_full_loss", "chunked_vs_full_loss_mem",
              "dora_step_vs_lora", "nf4_tensor_mem_vs_fp32", "nf4_ckpt_tensor_mem_vs_fp32", "generate_tokens_vs_hf",
              "generate_same_tokens")  # fmt: skip
# the stages in the order they run, most wanted first: a time budget that runs out cuts the last ones
STAGES = ("checks", "trainer", "main_job", "bench_speed", "bench_llama", "trainer_compiled", "bench_compiled",
          "bench_graphs", "bench_variants", "trainer_graphs")  # fmt: skip
MIN_STAGE_S = 45.0  # a stage is not started with less of the budget left (a process's start and one model)
# a compiled trainer run cannot be stopped part way (it runs in this process), and compiling GPT-2 small's
# step may take a minute (not yet measured on the GPU): such a run is not started with less than this left
MIN_COMPILED_RUN_S = 90.0
TABLE_S = 10.0  # of the budget, kept for writing the JSON and printing the table
MAIN_JOB_S = 300.0  # the main job's own limit (a few hundred tiny steps: well under a minute on a GPU)


class Budget:
    """Seconds left of ``--budget_s`` (0: no limit), counted from ``start`` (``time.monotonic()``)."""

    def __init__(self, seconds: float, start: float | None = None) -> None:
        self.seconds, self.start = seconds, time.monotonic() if start is None else start

    def left(self) -> float:
        return math.inf if not self.seconds else self.seconds - (time.monotonic() - self.start)


def run_benchmark(name: str, args: argparse.Namespace, out: Path, budget: Budget) -> dict:
    """``scripts/benchmark.py`` for the stage ``name`` of :data:`BENCHMARKS` in its own process, in a fresh
    ``out/name`` (no earlier call's report is read as this one's), given what is left of the budget (then
    stopped with its workers: the report it writes after every configuration keeps what was measured).

    ``{"summary": the target and lever ratios (with ``failed``: the configurations whose process failed, and
    ``cut_by_budget``), "report": the benchmark's whole results.json}``, or ``{"error": its last line}``."""
    gpu_size, dry_size, extra = BENCHMARKS[name]
    size = dry_size if args.size == "tiny" else gpu_size
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    script = Path(__file__).resolve().parent / "benchmark.py"
    cmd = [sys.executable, str(script), "--sizes", size, "--device", args.device, "--steps", str(args.bench_steps),
           "--warmup", str(max(args.bench_steps // 3, 1)), "--rounds", str(args.bench_rounds),
           "--out", str(folder), *extra]  # fmt: skip
    limit = budget.left() - TABLE_S
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=None if math.isinf(limit) else max(limit, 1.0))
        cut = False
    except subprocess.TimeoutExpired:  # the benchmark and the worker it is waiting for
        with contextlib.suppress(ProcessLookupError):  # (all of them ended meanwhile)
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        cut = True
    path = folder / "results.json"  # written whole or not at all
    if (proc.returncode != 0 and not cut) or not path.exists():
        tail = (stderr.strip() or stdout.strip() or f"exit {proc.returncode}").splitlines()[-1]
        return {"error": "cut by the time budget before a result" if cut else tail}
    report = json.loads(path.read_text())
    ratios = report["summary"].get(size, {})
    keys = [*BENCH_KEYS, *(f"{k}_paired" for k in BENCH_KEYS)]  # (with --paired: within passes too)
    summary = {k: ratios[k] for k in keys if ratios.get(k) is not None}
    rows = report["results"].get(size, {})
    failed = {n: r.get("reason", r["status"]) for n, r in rows.items() if r["status"] != "ok"}
    summary |= ({"failed": failed} if failed else {}) | ({"cut_by_budget": True} if cut else {})
    return {"summary": summary, "report": report}


def run_main_job(args: argparse.Namespace, budget: Budget) -> dict:
    """``lora/train_lora.py`` as a user runs it, its defaults on ``args.device`` (on a GPU: bf16 autocast and a
    bfloat16 base), the base pretrained first, in a folder removed afterwards: its exit status, seconds, and
    the metric before and after."""
    limit = min(budget.left() - TABLE_S, MAIN_JOB_S)
    with tempfile.TemporaryDirectory(prefix="main_job-") as folder:
        cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "lora" / "train_lora.py"), "--device",
               args.device, "--output_dir", folder]  # fmt: skip
        if args.size == "tiny":  # a dry run: a few steps of each
            cmd += ["--base_steps", "8", "--max_steps", "4", "--num_examples", "256"]
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"error": f"stopped after {limit:.0f} s (the time budget, or the main job's own limit)"}
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            return {"error": f"exit {proc.returncode}: {tail}"}
        metrics = json.loads(next(Path(folder).glob("*/metrics.json")).read_text())
    keep = ("metric_name", "base_metric", "final_metric", "steps", "tokens_per_s", "peak_memory_mb", "device")
    return {"seconds": seconds, **{k: metrics.get(k) for k in keep}}


def attempt(fn: Callable[..., dict], *args: object, **kwargs: object) -> dict:
    """``fn(*args, **kwargs)``, or ``{"error": ...}`` with the traceback on stderr: one failing check or run (a
    kernel missing from this torch, a library's version) does not cost the GPU session the rest."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # reported in the table; the traceback is for whoever reads the session's log
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = CommandLineParser(prog="gpu_checks.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the point of it) or cpu (a dry run)")
    p.add_argument("--size", default="gpt2", choices=list(SIZES))
    p.add_argument("--steps", type=int, default=20, help="timed steps per trainer run")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated, run in this order whatever order is given: {', '.join(STAGES)}")  # fmt: skip
    p.add_argument("--budget_s", type=float, default=0.0,
                   help="seconds the script may take from its start (0: no limit): a stage is not started with "
                   f"less than {MIN_STAGE_S:.0f} s left, and a benchmark still running {TABLE_S:.0f} s before the "
                   "end is stopped")  # fmt: skip
    p.add_argument(
        "--bench_rounds", type=int, default=3, help="benchmark rounds (fresh processes) per configuration"
    )
    p.add_argument("--bench_steps", type=int, default=30, help="timed benchmark steps per configuration")
    p.add_argument("--out", default="runs/gpu_checks", help="folder for gpu_checks.json")
    p.add_argument("--bench_out", default=None,
                   help="folder for the benchmarks' own folders (default: --out); their reports are also kept "
                   "whole in gpu_checks.json")  # fmt: skip
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not stages or set(stages) - set(STAGES):
        p.error(f"unknown --stages {stages}: choose among {', '.join(STAGES)}")
    args.stages = [s for s in STAGES if s in stages]
    return args


def run_checks(size: str, device: str) -> dict:
    """The correctness checks on the device, each on its own (:func:`attempt`)."""
    checks = {"lora": attempt(check_gradients, size, device),
              "dora_pissa": attempt(check_gradients, size, device, use_dora=True, lora_init="pissa"),
              "bf16_base": attempt(check_bf16_base, size, device)}  # fmt: skip
    if importlib.util.find_spec("torchao") is None:
        checks["nf4"] = {"error": "skipped: torchao is not installed"}
    else:
        checks["nf4"] = attempt(check_gradients, size, device, quantize=True, use_dora=True)
    return checks


# the trainer's stages: (torch.compile, its mode); each times LoRA q+v (float32 and bfloat16 base) and full
TRAINER_STAGES = {"trainer": (False, "default"), "trainer_compiled": (True, "default"),
                  "trainer_graphs": (True, "reduce-overhead")}  # fmt: skip
# (name, LoRA or full fine-tuning, how the frozen base is stored)
TRAINER_KINDS = (("lora_qv", True, None), ("full", False, None), ("lora_qv_bf16", True, "bf16"))


def run_trainers(stage: str, args: argparse.Namespace, budget: Budget) -> dict:
    """The real trainers of one stage of :data:`TRAINER_STAGES`: ``{run name: measurements or error}``."""
    compiled, mode = TRAINER_STAGES[stage]
    on_gpu = args.device != "cpu"
    suffix = ("_compiled" if compiled else "") + ("_cudagraphs" if mode == "reduce-overhead" else "")
    runs = {}
    for kind, lora, storage in TRAINER_KINDS:
        if budget.left() < (MIN_COMPILED_RUN_S if compiled else MIN_STAGE_S):
            runs[kind + suffix] = {"error": "skipped: out of the time budget"}
            continue
        if on_gpu:  # the last run's model and AdamW (a reference cycle) freed first: the peak is this run's
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        runs[kind + suffix] = attempt(time_trainer, args.size, lora, args.device, args.steps, compiled,
                                      compile_mode=mode, storage=storage)  # fmt: skip
        print(f"{kind + suffix}: {runs[kind + suffix]}", flush=True)
    return runs


def show(value: object) -> str:
    """A check's or a benchmark's record in one line: floats to 3 decimals (small ones in e-notation)."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {show(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.3e}" if value and abs(value) < 1e-3 else f"{value:.3f}"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    budget_start = (
        time.monotonic()
    )  # (torch is imported already: a few seconds before this, on a GPU machine)
    args = parse_args(argv)
    budget = Budget(args.budget_s, budget_start)

    def body() -> int:
        if args.device != "cpu" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device (try --device cpu for a dry run)")
        if args.steps < 2:
            raise ValueError(f"--steps must be >= 2, got {args.steps}")
        if args.bench_rounds < 1 or args.bench_steps < 1 or not 0 <= args.budget_s < math.inf:
            raise ValueError("--bench_rounds and --bench_steps must be >= 1, --budget_s a finite number >= 0 "
                             f"(got {args.bench_rounds}, {args.bench_steps}, {args.budget_s})")  # fmt: skip
        on_gpu = args.device != "cpu"
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
                        "size": args.size, "stages": {}, "checks": {}, "runs": {}, "benchmarks": {}, "reports": {}}  # fmt: skip
        # first, so a peer that fails to import (which costs the benchmark its PEFT rows) shows in the log at once
        result["libraries"] = library_versions(("transformers", "peft", "tokenizers", "torchao"))
        print("libraries: " + show(result["libraries"]), flush=True)
        for stage in args.stages:
            started = time.monotonic()
            if budget.left() < MIN_STAGE_S:
                result["stages"][stage] = "skipped: out of the time budget"
            elif stage == "checks":
                result["checks"] = run_checks(args.size, args.device)
            elif stage in TRAINER_STAGES:
                result["runs"].update(run_trainers(stage, args, budget))
            elif stage == "main_job":
                result["main_job"] = attempt(run_main_job, args, budget)
                print(f"main_job: {result['main_job']}", flush=True)
            else:
                got = attempt(run_benchmark, stage, args, Path(args.bench_out or out), budget)
                result["benchmarks"][stage] = got.get("summary", got)  # (an error as it is)
                if "report" in got:  # the whole report too: the one file to bring back holds everything
                    result["reports"][stage] = got["report"]
                print(f"{stage}: {result['benchmarks'][stage]}", flush=True)
            result["stages"].setdefault(stage, f"{time.monotonic() - started:.0f} s")
            # after every stage, so a time limit that cuts the script keeps what it measured
            atomic_write_bytes(out / "gpu_checks.json", (json.dumps(result, indent=2) + "\n").encode())
        print(f"\n{result['device']}, torch {result['torch']}, size {args.size}")
        print("libraries: " + show(result["libraries"]))
        print("stages: " + ", ".join(f"{k} {v}" for k, v in result["stages"].items()))
        for name, check in result["checks"].items():
            print(f"check {name}: {show(check)}")
        if "main_job" in result:
            print(f"main job: {show(result['main_job'])}")
        print(f"{'run':<34} {'tokens/s':>12} {'step ms':>9} {'peak MiB':>9} {'sync-free':>9}")
        for name, r in result["runs"].items():
            if "error" in r:
                print(f"{name:<34} {r['error']}")
                continue
            peak = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
            print(
                f"{name:<34} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>9.1f} {peak:>9} {r['sync_free']!s:>9}"
            )
        for name, summary in result["benchmarks"].items():
            print(f"{name}: {show(summary)}")
        return 0

    return guarded("gpu_checks.py", body, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
