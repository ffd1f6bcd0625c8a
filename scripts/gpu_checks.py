"""The checks and timings that need a GPU, in one call (the project's GPU time is scarce): run it there.

1. **No host-device synchronisation inside a training step**: the real ``LoRATrainer`` step runs under
   ``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronising call; only the reads
   every ``--log_every`` steps (and evaluations) are let through.
2. **The real trainer's speed**: tokens/s of ``LoRATrainer`` (LoRA q+v, with a float32 and with a bfloat16
   base) and of ``Trainer`` (full fine-tuning) at the GPT-2-small shape (768 wide, 12 layers, 12 heads,
   vocabulary 50,257), timed with CUDA events over the steps between reads, eager and compiled.
3. **Correctness on the device**: the model's logits and LoRA gradients against a float64 CPU reference,
   for plain LoRA and for DoRA with a PiSSA start (the variants' own paths); under bf16 autocast, the loss
   and LoRA gradients with the base stored in bfloat16 against the float32 base's (equal, bit for bit);
   and with torchao installed, a 4-bit NF4 base on the device against the same 4-bit base on the CPU.

4. With ``--benchmark``, ``scripts/benchmark.py`` in fresh processes, ``--bench_rounds`` rounds of
   ``--bench_steps`` steps: full fine-tuning, LoRA q+v (float32 and bfloat16 base), transformers + PEFT
   and inference at the issue's shape (GPT-2 small, sequence 1,024, batch 8; bf16; also side by side in
   one process, ``--paired 30``), and the variants (nf4 base, checkpointed or not, DoRA) at the
   benchmark's ``gpt2`` shape with the chunked loss; their target ratios join the table.

Prints a short table last and writes ``gpu_checks.json`` (and the benchmarks' folders) into ``--out``. On a
CPU (``--device cpu``, e.g. to try the script) the sync check is skipped and the sizes should be small.

    python scripts/gpu_checks.py --out $OUT                       # on the GPU machine: the whole set
    python scripts/gpu_checks.py --cuda_graphs --out $OUT         # and compiled with CUDA graphs too
    python scripts/gpu_checks.py --cuda_graphs --benchmark --out $OUT   # and the benchmark's targets
    python scripts/gpu_checks.py --device cpu --size tiny --steps 4 --out /tmp/gpu_checks   # a dry run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Sequence
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
from lora.lora_transformer import LoRATransformer
from lora.trainer import LoRATrainer, Trainer

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


def time_trainer(size: str, lora: bool, device: str, steps: int, compile: bool, sync_check: bool,
                 compile_mode: str = "default", storage: str | None = None) -> dict:  # fmt: skip
    """Train ``steps`` steps after a warm-up; tokens/s over the steps between the first and last read.
    ``storage`` ("bf16"): the frozen base stored so (``quantize_base``), as ``train_lora.py`` does on a GPU."""
    _, _, _, vocab, seq, batch = SIZES[size]
    model = build(size, lora, device)
    if storage is not None:
        model.configure_lora_training()
        model.quantize_base(storage)
    data = random_data(vocab, seq, batch * (steps + 8))
    kind = LoRATrainer if lora else Trainer
    if not lora:
        model.requires_grad_(True)
    log_every = max(steps // 2, 1)
    trainer = kind(model, BatchLoader(data, batch, seed=0), BatchLoader(data, batch, shuffle=False),
                   device=device, max_steps=steps + log_every, eval_every=10**6, log_every=log_every,
                   compile=compile, compile_mode=compile_mode, quiet=True)  # fmt: skip
    trainer.evaluate = lambda max_batches=None: {"val_loss": 0.0, "metric": 0.0}  # timing the steps only
    reads: list[float] = []
    flush = trainer._flush

    def timed_flush(pending, bar):  # the reads are the only place the host may wait for the device
        if sync_check:
            torch.cuda.set_sync_debug_mode(0)
        out = flush(pending, bar)
        if device != "cpu":
            torch.cuda.synchronize()
        reads.append(time.perf_counter())
        if sync_check:
            torch.cuda.set_sync_debug_mode("error")
        return out

    trainer._flush = timed_flush
    if sync_check:
        torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train()
    finally:
        if sync_check:
            torch.cuda.set_sync_debug_mode(0)
    # reads[0] ends the warm-up (compilation included); the rest are timed
    seconds = reads[-1] - reads[0]
    tokens = batch * seq * (len(reads) - 1) * log_every
    peak = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else None
    return {"tokens_per_s": tokens / seconds, "step_ms": 1e3 * seconds / ((len(reads) - 1) * log_every),
            "peak_mem_mb": peak, "sync_free": sync_check or None,
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
        model.configure_lora_training()
        if storage:
            model.quantize_base(storage)
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


# (name, size on a GPU, size in a dry run, benchmark arguments): the shape, then the variants (a dry
# run takes the small size for them: the tiny size's 64 x 64 weights tile no 16,384-weight NF4 block)
BENCHMARKS = (
    ("bench_speed", "gpt2_1024x8", "tiny",
     ["--configs", "full,lora_qv,lora_qv_bf16,peft_qv,infer_base,infer_lora_unmerged,infer_lora_merged",
      "--paired", "30"]),
    ("bench_variants", "gpt2", "small",
     ["--loss", "chunked", "--configs", "lora_qv,lora_qv_nf4,lora_qv_ckpt,lora_qv_nf4_ckpt,lora_qv_dora"]),
)  # fmt: skip
BENCH_KEYS = ("lora_qv_step_vs_full", "lora_qv_tokens_vs_peft", "unmerged_vs_base_latency", "merged_vs_base_latency",
              "lora_qv_mem_vs_full", "bf16_base_step_vs_fp32", "bf16_base_mem_vs_fp32", "dora_step_vs_lora",
              "nf4_tensor_mem_vs_fp32", "nf4_ckpt_tensor_mem_vs_fp32")  # fmt: skip


def run_benchmarks(args: argparse.Namespace, out: Path) -> dict:
    """``scripts/benchmark.py`` for :data:`BENCHMARKS`, each in its own process; ``{name: summary}`` of the
    target ratios (or ``{"error": last line}``)."""
    script = Path(__file__).resolve().parent / "benchmark.py"
    summaries = {}
    for name, gpu_size, dry_size, extra in BENCHMARKS:
        size = dry_size if args.size == "tiny" else gpu_size
        cmd = [sys.executable, str(script), "--sizes", size, "--device", args.device, "--steps",
               str(args.bench_steps), "--warmup", str(max(args.bench_steps // 3, 1)), "--rounds",
               str(args.bench_rounds), "--out", str(out / name), *extra]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()[-1]
            summaries[name] = {"error": tail}
            continue
        summary = json.loads((out / name / "results.json").read_text())["summary"][size]
        keys = [*BENCH_KEYS, *(f"{k}_paired" for k in BENCH_KEYS)]  # (with --paired: within passes too)
        summaries[name] = {k: summary[k] for k in keys if summary.get(k) is not None}
        print(f"{name} ({size}): {summaries[name]}", flush=True)
    return summaries


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = CommandLineParser(prog="gpu_checks.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the point of it) or cpu (a dry run)")
    p.add_argument("--size", default="gpt2", choices=list(SIZES))
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--no_compile", action="store_true", help="skip the compiled runs")
    p.add_argument("--cuda_graphs", action="store_true",
                   help="also time both compiled with mode reduce-overhead (CUDA graphs)")  # fmt: skip
    p.add_argument(
        "--benchmark", action="store_true", help="also run scripts/benchmark.py's target configurations"
    )
    p.add_argument(
        "--bench_rounds", type=int, default=3, help="benchmark rounds (fresh processes) per configuration"
    )
    p.add_argument("--bench_steps", type=int, default=30, help="timed benchmark steps per configuration")
    p.add_argument("--out", default="runs/gpu_checks", help="folder for gpu_checks.json")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if args.device != "cpu" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device (try --device cpu for a dry run)")
        if args.steps < 2:
            raise ValueError(f"--steps must be >= 2, got {args.steps}")
        if args.bench_rounds < 1 or args.bench_steps < 1:
            raise ValueError("--bench_rounds and --bench_steps must be >= 1")
        on_gpu = args.device != "cpu"
        checks = {"lora": check_gradients(args.size, args.device),
                  "dora_pissa": check_gradients(args.size, args.device, use_dora=True, lora_init="pissa")}  # fmt: skip
        checks["bf16_base"] = check_bf16_base(args.size, args.device)
        if importlib.util.find_spec("torchao") is None:
            checks["nf4"] = "skipped: torchao is not installed"
        else:
            checks["nf4"] = check_gradients(args.size, args.device, quantize=True, use_dora=True)
        result: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
                        "size": args.size, "checks": checks, "runs": {}}  # fmt: skip
        modes = [(False, "default")] + ([] if args.no_compile else [(True, "default")])
        modes += [(True, "reduce-overhead")] if args.cuda_graphs and not args.no_compile else []
        # (name, LoRA or full fine-tuning, how the frozen base is stored)
        kinds = (("lora_qv", True, None), ("full", False, None), ("lora_qv_bf16", True, "bf16"))
        for compiled, mode in modes:
            suffix = ("_compiled" if compiled else "") + ("_cudagraphs" if mode == "reduce-overhead" else "")
            for kind, lora, storage in kinds:
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats()
                result["runs"][kind + suffix] = time_trainer(args.size, lora, args.device, args.steps, compiled,
                                                             sync_check=on_gpu and not compiled, compile_mode=mode,
                                                             storage=storage)  # fmt: skip
                print(f"{kind + suffix}: {result['runs'][kind + suffix]}", flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_checks.json").write_text(json.dumps(result, indent=2) + "\n")  # kept if a time limit cuts
        if args.benchmark:  # what follows (the benchmark writes its results after every configuration)
            result["benchmarks"] = run_benchmarks(args, out)
            (out / "gpu_checks.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"\n{result['device']}, torch {result['torch']}, size {args.size}")
        for name, check in result["checks"].items():
            print(f"check {name}: {check}")
        print(f"{'run':<26} {'tokens/s':>12} {'step ms':>9} {'peak MiB':>9} {'sync-free':>9}")
        for name, r in result["runs"].items():
            peak = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
            print(
                f"{name:<26} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>9.1f} {peak:>9} {r['sync_free']!s:>9}"
            )
        for name, summary in result.get("benchmarks", {}).items():
            shown = ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
            )
            print(f"{name}: {shown}")
        return 0

    return guarded("gpu_checks.py", body, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
