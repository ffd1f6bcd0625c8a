"""Per-process peak memory and step time of ``--fsdp`` beside data parallel: 2 torchrun processes on this CPU.

Writes two Llama folders with RANDOM weights (transformers' initialisation, float32, a byte-level BPE trained
here: nothing is downloaded; the numbers are about memory and time, not text): the base, shaped as
SmolLM2-360M reduced to 13 layers (hidden 960, 15 heads, 5 key/value heads, MLP 2,560, vocabulary 49,152,
tied embeddings: 175 M parameters, 700 MB in float32), and a tiny one (2 layers of width 64, vocabulary 512).
Then it trains LoRA (r 8 on q and v, ``--batch`` rows of ``--seq_len`` tokens a process, ``--steps`` steps) with
``lora/train_lora.py`` on 2 processes (``torch.distributed.run``, Gloo), on each base: data parallel, data
parallel with the C allocator's setting that ``--fsdp`` makes on a CPU (glibc gives back every block of
128 KiB or more when it is freed: ``MALLOC_MMAP_THRESHOLD_=131072``), and ``--fsdp``. Each process reports its
peak resident set (``VmHWM``, from its run's start). What the base adds to a process is its peak less that
of the same run on the tiny base (the interpreter, torch, the data, the process group's buffers); the step
time is the median of rank 0's steps after the first.

    python scripts/fsdp_memory.py                                   # temporary folders, the table printed
    python scripts/fsdp_memory.py --folder /tmp/llama-175m --out runs/fsdp_memory.json --steps 6
    python scripts/fsdp_memory.py --folder /tmp/llama-175m --batch 8 --seq_len 128 --steps 4   # more tokens a step

The resident set counts the file's pages a process has mapped and read (data parallel's base is the file
itself, memory-mapped) as well as what it allocated; other processes on the machine do not change it, but
they do change the step times.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python scripts/fsdp_memory.py` from a checkout
    sys.path.insert(0, str(ROOT))

BASE = {"vocab_size": 49152, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 13,
        "num_attention_heads": 15, "num_key_value_heads": 5, "max_position_embeddings": 2048,
        "tie_word_embeddings": True, "rope_theta": 100000.0, "rms_norm_eps": 1e-5}  # fmt: skip
TINY = {**BASE, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
TEXT = ("The quick brown fox jumps over the lazy dog. A tokenizer learns its merges from text like this one.\n"
        "def greet(name):\n    return 'hello ' + name\n") * 400  # fmt: skip

# each process's peak resident set, printed when its run ends
HARNESS = r"""
import os, sys
from pathlib import Path
from lora.train_lora import main
code = main(sys.argv[1:])
peak = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print(f"PEAK rank {os.environ['RANK']} {peak / 1024:.1f}", file=sys.stderr)
sys.exit(code)
"""


def write_folder(folder: Path, shape: dict) -> Path:
    """A Llama folder of ``shape`` with random float32 weights and a BPE trained on :data:`TEXT` (padded with
    reserved tokens to the vocabulary)."""
    import torch
    import transformers

    from lora.tokenizer import train_byte_bpe

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).save_pretrained(folder)
    train_byte_bpe([TEXT], shape["vocab_size"]).save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "config.json").read_text())
    config["weights"] = "random (scripts/fsdp_memory.py): for measuring memory, not a trained model"
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def run(
    work: Path, folder: Path, name: str, fsdp: bool, shape: argparse.Namespace, env: dict[str, str]
) -> dict:
    """One 2-process run (``env`` added to its environment); its processes' peaks (MiB), its step time (s)."""
    argv = ["--task", "text", "--train_file", str(work / "text.txt"), "--base_checkpoint", str(folder),
            "--seq_len", str(shape.seq_len), "--batch_size", str(shape.batch), "--max_steps", str(shape.steps),
            "--eval_every", str(shape.steps),
            "--eval_batches", "1", "--lora_targets", "q,v", "--device", "cpu", "--output_dir", str(work / "runs"),
            "--run_name", name, "--overwrite", *(["--fsdp"] if fsdp else [])]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    done = subprocess.run([*launcher, str(work / "harness.py"), *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"run {name} failed:\n{done.stderr[-3000:]}")
    peaks = {int(rank): float(mib) for rank, mib in re.findall(r"PEAK rank (\d+) ([\d.]+)", done.stderr)}
    history = json.loads((work / "runs" / name / "history.json").read_text())
    elapsed = history["elapsed_s"]
    steps_s = [b - a for a, b in itertools.pairwise(elapsed)]  # (the first step is not timed)
    metrics = json.loads((work / "runs" / name / "metrics.json").read_text())
    return {"run": name, "peak_mib": [peaks[0], peaks[1]],
            "step_s": round(statistics.median(steps_s), 3) if steps_s else None,
            "total_params": metrics["total_params"], "wall_time_s": round(metrics["wall_time_s"], 1)}  # fmt: skip


# (strategy, --fsdp, environment): data parallel as it runs, and with the C allocator's threshold that --fsdp
# sets on a CPU (lora/fsdp.py: blocks of 128 KiB or more given back when freed)
STRATEGIES = (("data parallel", False, {}),
              ("data parallel, glibc threshold 128 KiB", False, {"MALLOC_MMAP_THRESHOLD_": "131072"}),
              ("--fsdp", True, {}))  # fmt: skip


def measure(folder: Path, tiny: Path, work: Path, shape: argparse.Namespace) -> list[dict]:
    """Each strategy on the tiny base then on the base."""
    (work / "harness.py").write_text(HARNESS)
    (work / "text.txt").write_text(TEXT)
    rows = []
    for base, label in ((tiny, "tiny"), (folder, "base")):
        for i, (strategy, fsdp, env) in enumerate(STRATEGIES):
            rows.append(
                {"base": label, "strategy": strategy, **run(work, base, f"{label}-{i}", fsdp, shape, env)}
            )
    for row in rows:  # what the base adds to each process: its peak less the tiny run's of the same strategy
        tiny_row = next(r for r in rows if r["base"] == "tiny" and r["strategy"] == row["strategy"])
        row["base_adds_mib"] = [
            round(a - b, 1) for a, b in zip(row["peak_mib"], tiny_row["peak_mib"], strict=True)
        ]
    return rows


def table(rows: Sequence[dict], file_bytes: int) -> str:
    """The runs as a markdown table, and what the base adds with --fsdp as a share of data parallel's."""
    lines = [f"base: model.safetensors, {file_bytes / 2**20:,.0f} MiB (float32, random); 2 processes (Gloo)", "",
             "| base | strategy | parameters | peak rank 0 / rank 1 (MiB) | the base adds (MiB) | step (s) |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        peaks, adds = r["peak_mib"], r["base_adds_mib"]
        lines.append(f"| {r['base']} | {r['strategy']} | {r['total_params']:,} | "
                     f"{peaks[0]:,.0f} / {peaks[1]:,.0f} | {adds[0]:,.0f} / {adds[1]:,.0f} | {r['step_s']:.2f} |")  # fmt: skip
    big = {r["strategy"]: r for r in rows if r["base"] == "base"}
    fsdp = big.pop("--fsdp")
    lines.append("")
    for strategy, dp in big.items():
        share = max(fsdp["base_adds_mib"]) / max(dp["base_adds_mib"])
        lines.append(f"with --fsdp the base adds {share:.2f}x what it adds under {strategy} (the larger process "
                     f"of each); its step takes {fsdp['step_s'] / dp['step_s']:.2f}x as long")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--folder", type=Path, help="the base folder (written there if missing; default: temporary)"
    )
    parser.add_argument("--out", type=Path, help="write the measurements as JSON here")
    parser.add_argument("--steps", type=int, default=6, help="LoRA steps of each run (default: 6)")
    parser.add_argument("--batch", type=int, default=2, help="rows a process in a step (default: 2)")
    parser.add_argument("--seq_len", type=int, default=64, help="tokens a row (default: 64)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (the first step is not timed), got {args.steps}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = args.folder or work / "llama-175m"
        if not (folder / "model.safetensors").is_file():
            write_folder(folder, BASE)
        tiny = write_folder(work / "llama-tiny", TINY)
        rows = measure(folder, tiny, work, args)
        file_bytes = (folder / "model.safetensors").stat().st_size
    print(table(rows, file_bytes))
    if args.out is not None:
        report = {"shape": BASE, "tiny": TINY, "weights": "random, float32", "file_bytes": file_bytes,
                  "steps": args.steps, "batch": [args.batch, args.seq_len], "processes": 2, "runs": rows}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
