"""Generate text from a base model and from one or more adapters on it, side by side.

The project's language models are byte-level: token id = byte value (ids above 255 are skipped when
decoding; invalid UTF-8 shows as U+FFFD). Every variant starts from the same seed, so differences come
from the adapters.

    python scripts/generate.py --base runs/bases/english-d256-h4-l2-s128-steps800-seed0 --prompt "The "
    python scripts/generate.py --base runs/bases/english-d256-h4-l2-s128-steps800-seed0 --adapter runs/code-lora-r8 --prompt "def " --top_k 40
    python scripts/generate.py --base runs/bases/caesar-d256-h4-l2-s128-steps300-seed0 --adapter runs/multitask-rot13 \\
        --adapter runs/multitask-atbash --prompt "h" --max_new_tokens 1 --temperature 0 --no_base
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/generate.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lora.lora_transformer import LoRATransformer


def encode(text: str, vocab_size: int) -> list[int]:
    """UTF-8 bytes of ``text`` as token ids; the model's vocabulary must cover all 256 byte values."""
    if vocab_size < 256:
        raise ValueError(f"byte-level prompts need vocab_size >= 256, the model has {vocab_size}")
    ids = list(text.encode("utf-8"))
    if not ids:
        raise ValueError("--prompt must not be empty")
    return ids


def decode(ids: Sequence[int]) -> str:
    """Token ids -> text: bytes 0..255 decoded as UTF-8 with replacement; other ids dropped."""
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def sample(
    model: LoRATransformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> str:
    """The text generated after ``prompt`` (the prompt itself not included)."""
    g = torch.Generator(device=model.wte.weight.device).manual_seed(seed)
    idx = torch.tensor([prompt], device=model.wte.weight.device)  # (1, T)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=g)
    return decode(out[0, len(prompt) :].tolist())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="model folder (config.json + model.safetensors)")
    p.add_argument("--adapter", action="append", default=[], help="adapter folder; repeat for several")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_base", action="store_true", help="show the adapters only")
    p.add_argument("--force", action="store_true", help="load adapters trained on other base weights")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``[(label, generated text)]`` for the base and each adapter."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {args.top_k}")
    if args.no_base and not args.adapter:
        raise ValueError("--no_base needs at least one --adapter")
    model = LoRATransformer.from_pretrained(args.base, lora_r=0, num_classes=None).eval()
    prompt = encode(args.prompt, model.config.vocab_size)
    gen = (args.max_new_tokens, args.temperature, args.top_k, args.seed)
    rows = [] if args.no_base else [("base", sample(model, prompt, *gen))]
    for i, folder in enumerate(args.adapter):
        model.load_adapter(folder, f"adapter{i}", force=args.force)
        if model.cls_head is not None:
            raise ValueError(f"{folder}: a classification adapter cannot generate text")
        rows.append((f"adapter {folder}", sample(model, prompt, *gen)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = run(args)
    except (ValueError, RuntimeError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    for label, text in rows:
        print(f"=== {label} ===\n{args.prompt}{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
