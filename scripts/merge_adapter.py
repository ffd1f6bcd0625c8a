"""Merge an adapter into its base and write a plain model folder (no LoRA tensors).

Before writing, the merged model's logits are compared with base + adapter (unmerged) on a random batch;
the largest absolute difference is reported and the merge is refused if it exceeds ``--tolerance`` times
``max(1, max |logit|)`` (float32 rounding grows with the size of the logits).
The result loads with ``LoRATransformer.from_pretrained(out, lora_r=0)``; the tokenizer of a base with
its own (a GPT-2 folder) is copied beside it.

    python scripts/merge_adapter.py --base runs/bases/english-d256-h4-l2-s128-steps800-seed0 --adapter runs/code-lora-r8 --out runs/code-merged
    python scripts/merge_adapter.py --base runs/bases/caesar-d256-h4-l2-s128-steps300-seed0 --adapter runs/rot13-lora-r8 --out rot13-merged --tolerance 1e-4
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/merge_adapter.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch is imported: one line, exit 130
        from lora.errors import exit_on_signals

        exit_on_signals()

import torch

from lora.config import CommandLineParser
from lora.errors import guarded
from lora.files import atomic_write_bytes
from lora.formats import CONFIG_NAME, WEIGHTS_NAME
from lora.lora_transformer import LoRATransformer
from lora.tokenizer import tokenizer_files


@torch.no_grad()
def max_logit_difference(
    model: LoRATransformer, batch: int = 4, seq_len: int = 64, seed: int = 0
) -> tuple[float, float]:
    """``(max |merged(x) - unmerged(x)|, max |unmerged(x)|)`` over a random ``(batch, seq_len)`` batch."""
    g = torch.Generator().manual_seed(seed)
    T = min(seq_len, model.config.max_seq_len)
    idx = torch.randint(0, model.config.vocab_size, (batch, T), generator=g).to(model.wte.weight.device)
    model.eval()
    unmerged = model(idx).float()
    merged = model.merged_model()(idx).float()
    return (merged - unmerged).abs().max().item(), unmerged.abs().max().item()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = CommandLineParser(prog="merge_adapter.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="model folder (config.json + model.safetensors)")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-5,
        help="largest logit difference accepted, relative to max(1, max |logit|)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random check batch")
    p.add_argument("--force", action="store_true", help="merge an adapter trained on other base weights")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[float, float, Path]:
    """Check and write; returns ``(largest logit difference, largest |logit|, out folder)``."""
    out = Path(args.out)
    if not args.overwrite and ((out / CONFIG_NAME).exists() or (out / WEIGHTS_NAME).exists()):
        raise ValueError(f"{out} already holds a model; pass --overwrite to replace it")
    if not 0 < args.tolerance < math.inf:
        raise ValueError(f"--tolerance must be a finite number > 0, got {args.tolerance}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    for flag, source in (("--base", args.base), ("--adapter", args.adapter)):
        if out.resolve() == Path(source).resolve():
            raise ValueError(
                f"--out {out} is the {flag} folder: the merged model would replace it; name another"
            )
    model = LoRATransformer.from_pretrained(args.base, lora_r=0)
    model.load_adapter(args.adapter, force=args.force)
    diff, largest = max_logit_difference(model, seed=args.seed)
    if not diff <= args.tolerance * max(1.0, largest):
        raise ValueError(
            f"merged logits differ from unmerged by {diff:.3e} > tolerance {args.tolerance:g} x {max(1.0, largest):.3g}"
        )
    model.merge_and_export(
        out,
        extra={"adapter": str(args.adapter), "max_logit_difference": diff, "max_abs_logit": largest},
    )
    # the merged model reads text as its base did: the run's recorded tokenizer, else the base folder's
    source = tokenizer_files(args.adapter) or tokenizer_files(args.base)
    for f in source:
        atomic_write_bytes(out / f.name, f.read_bytes())
    return diff, largest, out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        diff, largest, out = run(args)
        size = (out / WEIGHTS_NAME).stat().st_size
        limit = args.tolerance * max(1.0, largest)
        print(
            f"max |merged - unmerged| logits on a random batch: {diff:.3e} "
            f"(max |logit| {largest:.3g}; accepted up to {args.tolerance:g} x {max(1.0, largest):.3g} = {limit:.2e})"
        )
        print(f"wrote {out}/{CONFIG_NAME} and {WEIGHTS_NAME} ({size / 1e6:.2f} MB, no LoRA tensors)")
        return 0

    return guarded("merge_adapter.py", body, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
