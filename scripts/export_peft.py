"""Export an adapter trained on a Hugging Face folder (GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3) as a
PEFT LoRA adapter folder.

The result (``adapter_config.json`` + ``adapter_model.safetensors``) loads with
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)`` and computes the same logits;
the modules take the family's names (``q_proj`` ... ``down_proj``; GPT-2's ``c_attn`` and Phi-3's
``qkv_proj`` and ``gate_up_proj`` fused as ``lora/peft_format.py`` describes). ``--adapter`` may be this
project's adapter folder or a PEFT one. An adapter with a classification head cannot be exported.

    python scripts/export_peft.py --base path/to/SmolLM2-135M --adapter runs/my-text --out my-text-peft
    python scripts/export_peft.py --base path/to/gpt2 --adapter runs/my-text --out my-text-peft --base_model_name_or_path gpt2 --overwrite
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/export_peft.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch is imported: one line, exit 130
        from lora.errors import exit_on_signals

        exit_on_signals()

from lora.config import CommandLineParser
from lora.errors import guarded
from lora.formats import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lora.lora_transformer import LoRATransformer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = CommandLineParser(prog="export_peft.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--base",
        required=True,
        help="Hugging Face model folder the adapter was trained on (gpt2, llama, ..., phi3)",
    )
    p.add_argument("--adapter", required=True, help="adapter folder (this project's or PEFT's)")
    p.add_argument("--out", required=True, help="folder for the PEFT adapter")
    p.add_argument(
        "--base_model_name_or_path",
        help="what adapter_config.json names as the base, e.g. HuggingFaceTB/SmolLM2-135M (default: --base as given)",
    )
    p.add_argument("--force", action="store_true", help="export an adapter trained on other base weights")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    """Check, convert and write; returns the folder written."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} is not empty; pass --overwrite to write into it")
    model = LoRATransformer.from_pretrained(args.base, lora_r=0)
    model.load_adapter(args.adapter, force=args.force)
    return model.export_peft(out, base_model_name_or_path=args.base_model_name_or_path or str(args.base))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        out = run(args)
        print(f"wrote {out}/{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}; load with "
              f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(args.base)!r}), {str(out)!r})")  # fmt: skip
        return 0

    return guarded("export_peft.py", body, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
