"""Merge an adapter into its base and write a plain model folder (no LoRA tensors).

Before writing, the merged model's logits are compared with base + adapter (unmerged) on a random batch;
the largest absolute difference is reported and the merge is refused if it exceeds ``--tolerance`` times
``max(1, max |logit|)`` (float32 rounding grows with the size of the logits; the default tolerance is the
weights' dtype's, :data:`TOLERANCES`: a bf16 weight keeps 8 significant bits, so its merged logits move more).

``--format lora`` (the default) writes this project's model folder, which loads with
``LoRATransformer.from_pretrained(out, lora_r=0)``; the tokenizer of a base with its own (a Hugging Face
folder) is copied beside it. ``--format hf`` writes a Hugging Face folder that
``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads (``lora/hf_export.py``): the base's family
(gpt2, llama, mistral, qwen2, qwen3, gemma, phi3) with its names, its ``config.json`` and tokenizer files,
safetensors in shards above ``--max_shard_size``, the base's dtype (a bf16 base exports bf16 weights, merged in
float32); a base of this project's format is written as the family its layout is (GPT-2's: gpt2). The check
then reads the written folder back (this project's importer) before it is put in place; ``--out`` must be new
or empty. The adapter is this project's (a run folder holds one) or a PEFT LoRA folder.
An adapter trained on a 4-bit (nf4) copy of the base is merged into the full-precision base (as QLoRA's
merges are), which the command says.

    python scripts/merge_adapter.py --base runs/bases/english-d256-h4-l2-s128-steps800-seed0 --adapter runs/code-lora-r8 --out runs/code-merged
    python scripts/merge_adapter.py --base runs/bases/caesar-d256-h4-l2-s128-steps300-seed0 --adapter runs/rot13-lora-r8 --out rot13-merged --tolerance 1e-4
    python scripts/merge_adapter.py --format hf --base ~/models/SmolLM2-135M --adapter runs/smol-lora-r8 --out smol-merged-hf --max_shard_size 2GB
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
from lora.files import atomic_write_bytes, read_json
from lora.formats import ADAPTER_CONFIG_NAME, CONFIG_NAME, WEIGHTS_NAME
from lora.hf_export import DEFAULT_MAX_SHARD_SIZE, check_target, export_hf, parse_size
from lora.lora_transformer import LoRATransformer
from lora.tokenizer import tokenizer_files

# the default --tolerance for the base weights' dtype (float32's: about 80 of its rounding steps)
TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@torch.no_grad()
def max_logit_difference(
    model: LoRATransformer,
    batch: int = 4,
    seq_len: int = 64,
    seed: int = 0,
    merged: LoRATransformer | None = None,
) -> tuple[float, float]:
    """``(max |merged(x) - unmerged(x)|, max |unmerged(x)|)`` over a random ``(batch, seq_len)`` batch;
    ``merged`` is ``model.merged_model()`` unless given (the model a written folder holds)."""
    g = torch.Generator().manual_seed(seed)
    T = min(seq_len, model.config.max_seq_len)
    idx = torch.randint(0, model.config.vocab_size, (batch, T), generator=g).to(model.wte.weight.device)
    model.eval()
    unmerged = model(idx).float()
    merged = model.merged_model() if merged is None else merged.to(model.wte.weight.device).eval()
    return (merged(idx).float() - unmerged).abs().max().item(), unmerged.abs().max().item()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = CommandLineParser(prog="merge_adapter.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="model folder (config.json + model.safetensors)")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest logit difference accepted, relative to max(1, max |logit|) (default: 1e-5 for float32 "
        "weights, 1e-2 for float16, 5e-2 for bfloat16)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random check batch")
    p.add_argument("--force", action="store_true", help="merge an adapter trained on other base weights")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a model already in --out (--format lora)"
    )
    p.add_argument(
        "--format",
        choices=("lora", "hf"),
        default="lora",
        help="lora: this project's model folder; hf: a Hugging Face folder of the base's family",
    )
    p.add_argument(
        "--max_shard_size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="--format hf: the largest safetensors file, e.g. 2GB or 500MB; more go into shards",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[float, float, Path]:
    """Check and write; returns ``(largest logit difference, largest |logit|, out folder)``."""
    out = Path(args.out)
    if args.format == "hf":
        if args.overwrite:
            raise ValueError("--overwrite is for --format lora: a Hugging Face export is written only into a new "
                             "or empty folder")  # fmt: skip
        check_target(out)
        parse_size(args.max_shard_size)
    elif not args.overwrite and ((out / CONFIG_NAME).exists() or (out / WEIGHTS_NAME).exists()):
        raise ValueError(f"{out} already holds a model; pass --overwrite to replace it")
    if args.tolerance is not None and not 0 < args.tolerance < math.inf:
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
    if args.tolerance is None:
        args.tolerance = TOLERANCES.get(model.wte.weight.dtype, 1e-5)
    if args.format == "hf":
        return (*export_checked(model, args), out)
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


def export_checked(model: LoRATransformer, args: argparse.Namespace) -> tuple[float, float]:
    """``model`` exported as a Hugging Face folder at ``args.out``; the written folder, read back, must give the
    unmerged model's logits within the tolerance before it is put in place. Returns the check's numbers."""
    found: list[float] = []

    def check(folder: Path) -> None:
        written = LoRATransformer.from_pretrained(folder, lora_r=0)
        diff, largest = max_logit_difference(model, seed=args.seed, merged=written)
        if not diff <= args.tolerance * max(1.0, largest):
            raise ValueError(f"the exported model's logits differ from base + adapter by {diff:.3e} > tolerance "
                             f"{args.tolerance:g} x {max(1.0, largest):.3g}")  # fmt: skip
        found.extend((diff, largest))

    export_hf(args.out, model.config, model.merged_state_dict, model.base_source, args.max_shard_size, check)
    return found[0], found[1]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        diff, largest, out = run(args)
        limit = args.tolerance * max(1.0, largest)
        print(
            f"max |merged - unmerged| logits on a random batch: {diff:.3e} "
            f"(max |logit| {largest:.3g}; accepted up to {args.tolerance:g} x {max(1.0, largest):.3g} = {limit:.2e})"
        )
        if args.format == "lora":
            size = (out / WEIGHTS_NAME).stat().st_size
            print(f"wrote {out}/{CONFIG_NAME} and {WEIGHTS_NAME} ({size / 1e6:.2f} MB, no LoRA tensors)")
            return 0
        config = read_json(out / CONFIG_NAME)
        weights = sorted(p.name for p in out.glob("*.safetensors"))
        size = sum((out / w).stat().st_size for w in weights)
        others = sorted(
            {p.name for p in out.iterdir()} - {*weights, CONFIG_NAME, f"{WEIGHTS_NAME}.index.json"}
        )
        print(f"wrote {out}: a Hugging Face {config['model_type']} folder, {config['dtype']}, {len(weights)} "
              f"safetensors file(s) of {size / 1e6:.2f} MB in all; copied from the base: {', '.join(others) or 'no tokenizer files'}")  # fmt: skip
        quantized = read_json(Path(args.adapter) / ADAPTER_CONFIG_NAME).get("base_quantization")
        if quantized:
            print(f"note: the adapter was trained with this base stored as {quantized}; it is merged into the "
                  "full-precision weights, as QLoRA merges are")  # fmt: skip
        return 0

    return guarded("merge_adapter.py", body, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
