"""Peak memory loading a bfloat16 base folder, and training LoRA on it, at the shape of SmolLM2-135M.

Writes a Llama folder of that shape (hidden 576, 30 layers, 9 heads, 3 key/value heads, MLP 1,536,
vocabulary 49,152, tied embeddings, 2,048 positions) with RANDOM weights in bfloat16 (transformers'
initialisation: nothing is downloaded; the numbers are about memory, not text), then runs each case in a
fresh process, which imports torch and lora, notes its resident set (the baseline), runs the case and
reports its peak resident set (``ru_maxrss``) and the peak less the baseline:

* ``load``: ``LoRATransformer.from_pretrained`` (LoRA r 8 on q and v): the file mapped, the base kept in
  bfloat16, the adapter float32;
* ``load+train``: the same, then ``--steps`` LoRA steps (batch 2 x 128 tokens, bf16 autocast, AdamW; a CPU
  without bfloat16 instructions takes minutes a step);
* ``widened``: ``from_pretrained(..., base_dtype=torch.float32)``, the float32 path (``--quantize_base none``,
  full fine-tuning);
* ``before``: loading as ``from_pretrained`` did before the file was mapped into the model: the model built
  with its random float32 weights, the file's tensors copied over them (in bfloat16, the file's dtype);
* ``transformers``: ``AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)``.

    python scripts/load_memory.py                                   # a temporary folder, the table printed
    python scripts/load_memory.py --folder runs/bases/smol-bf16 --out runs/load_memory.json --steps 2

The resident set counts the file's pages the process has read (mapped pages are resident too) and the
interpreter's and libraries' memory (the baseline); other processes on the machine do not change it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/load_memory.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOL = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
        "tie_word_embeddings": True, "rope_theta": 100000.0, "rms_norm_eps": 1e-5}  # fmt: skip
CASES = ("load", "load+train", "widened", "before", "transformers")
LORA = {"lora_r": 8, "lora_targets": "q,v", "dropout": 0.0}


def write_folder(folder: Path) -> Path:
    """A SmolLM2-135M-shaped Llama folder with random weights in bfloat16 (``config.json`` says so)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOL)).to(torch.bfloat16)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["weights"] = "random (scripts/load_memory.py): for measuring memory, not a trained model"
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def rss_mib() -> float:
    """The resident set now, in MiB (Linux ``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_mib() -> float:
    """The process's peak resident set so far, in MiB (``ru_maxrss``: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: str, folder: Path, steps: int) -> dict:
    """One case in this process (see the module docstring); its memory and time."""
    import torch

    from lora.lora_layer import deferred_base_init
    from lora.lora_transformer import LoRATransformer
    from lora.pretrained import read_base_tensors, resolve_base

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with torch.device("meta"):  # the libraries the meta device loads once (sympy: 75 MiB) count as baseline
        LoRATransformer(vocab_size=8, d_model=8, num_heads=2, num_layers=1)
    baseline = rss_mib()
    start = time.perf_counter()
    if case in ("load", "load+train"):
        model = LoRATransformer.from_pretrained(folder, **LORA)
    elif case == "widened":
        model = LoRATransformer.from_pretrained(folder, torch.float32, **LORA)
    elif case == "before":  # the former from_pretrained: the random float32 model, then the file over it
        source = resolve_base(folder)
        with deferred_base_init():
            model = LoRATransformer(**{**source.architecture.to_dict(), **LORA})
        tensors = read_base_tensors(source)
        model.to(next(iter(tensors.values())).dtype)
        own = model.state_dict()
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value)
        del tensors
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    loaded = time.perf_counter() - start
    if case == "load+train":
        model.configure_lora_training()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, SMOL["vocab_size"], (2, 129), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(idx[:, :-1], targets=idx[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    params = sum(p.numel() for p in model.parameters())
    return {"case": case, "baseline_mib": round(baseline, 1), "peak_mib": round(peak_mib(), 1),
            "peak_less_baseline_mib": round(peak_mib() - baseline, 1), "load_s": round(loaded, 2),
            "seconds": round(time.perf_counter() - start, 2), "parameters": params}  # fmt: skip


def measure(folder: Path, steps: int, cases: Sequence[str] = CASES) -> list[dict]:
    """Each case in a fresh ``python scripts/load_memory.py --case ...`` process."""
    rows = []
    for case in cases:
        argv = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--folder", str(folder),
                "--steps", str(steps)]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"case {case} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def table(rows: Sequence[dict], file_bytes: int) -> str:
    """The cases as a markdown table, the weights' file size beside them."""
    lines = [f"weights: model.safetensors, {file_bytes / 2**20:,.1f} MiB (bfloat16, random)", "",
             "| case | peak RSS (MiB) | peak less baseline (MiB) | baseline (MiB) | load (s) |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['case']} | {r['peak_mib']:,.0f} | {r['peak_less_baseline_mib']:,.0f} | "
                     f"{r['baseline_mib']:,.0f} | {r['load_s']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, help="the bf16 folder (written there if missing; default: a temporary one)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the measurements as JSON here")
    parser.add_argument("--steps", type=int, default=1,
                        help="LoRA steps of the load+train case (the peak is the first's: its backward, and "
                        "AdamW's state made in it)")  # fmt: skip
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # (one case, in a fresh process)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.case is not None:
        print(json.dumps(run_case(args.case, args.folder, args.steps)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "smollm2-135m-shape-bf16"
        if not (folder / "model.safetensors").is_file():
            write_folder(folder)
        rows = measure(folder, args.steps)
        file_bytes = (folder / "model.safetensors").stat().st_size
    print(table(rows, file_bytes))
    if args.out is not None:
        report = {"shape": SMOL, "weights": "random, bfloat16", "file_bytes": file_bytes, "steps": args.steps,
                  "batch": [2, 128], "lora": LORA, "cases": rows}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
