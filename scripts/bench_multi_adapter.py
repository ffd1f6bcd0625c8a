"""Tokens per second of one mixed batch over several adapters against the same rows generated one adapter at a time.

A model of the given shape (random weights, nothing downloaded) gets ``--adapters`` random LoRA adapters (q, k, v, o
and the MLP, rank ``--lora_r``), parked as an adapter set keeps them. Each of the ``--adapters`` prompts (random
tokens, ``--prompt_len`` long) is answered greedily with ``--new_tokens`` tokens, with the key/value cache:

* mixed: one ``model.generate(idx, n, adapter_names=[...])`` over the batch, row ``i`` with adapter ``i``
  (``lora/multi_adapter.py``);
* separate: for each adapter in turn, ``set_adapter`` and ``model.generate`` of its row alone.

Both make ``adapters x new_tokens`` tokens; each is timed ``--repeats`` times after a warm-up and the fastest
kept. The greedy tokens of both are checked equal.

    python scripts/bench_multi_adapter.py                                  # small shape, CPU, seconds
    python scripts/bench_multi_adapter.py --d_model 1024 --num_layers 8 --device cuda --new_tokens 64
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/bench_multi_adapter.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from lora.config import CommandLineParser
from lora.errors import guarded
from lora.lora_transformer import LoRATransformer


def make_model(args: argparse.Namespace) -> tuple[LoRATransformer, list[str]]:
    """The model and the names of its ``args.adapters`` random adapters (all parked but the last, active)."""
    torch.manual_seed(args.seed)
    model = LoRATransformer(vocab_size=args.vocab_size, d_model=args.d_model, num_heads=args.num_heads,
                            num_layers=args.num_layers, max_seq_len=args.prompt_len + args.new_tokens,
                            dropout=0.0, lora_r=args.lora_r, lora_targets=("q", "k", "v", "o"),
                            adapt_feedforward=True)  # fmt: skip
    names = [f"adapter{i}" for i in range(args.adapters)]
    for name in names:
        with torch.no_grad():
            for _, layer in model.lora_layers():
                nn.init.normal_(layer.lora_B, std=0.05)
        model.adapters.parked[name] = model.adapters.capture()
    model.set_adapter(names[-1])
    return model.to(args.device).eval(), names


def _timed(fn: object, device: str, repeats: int) -> tuple[float, object]:
    """The fastest of ``repeats`` timed calls of ``fn`` (after one untimed), and its result."""
    fn()
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench(args: argparse.Namespace) -> dict:
    """``{"mixed_tokens_per_s", "separate_tokens_per_s", "ratio", "tokens_equal"}``: see the module docstring."""
    model, names = make_model(args)
    g = torch.Generator().manual_seed(args.seed + 1)
    idx = torch.randint(0, args.vocab_size, (len(names), args.prompt_len), generator=g).to(args.device)
    n = args.new_tokens

    def mixed() -> torch.Tensor:
        return model.generate(idx, n, temperature=0, adapter_names=names)

    def separate() -> torch.Tensor:
        rows = []
        for i, name in enumerate(names):
            model.set_adapter(name)
            rows.append(model.generate(idx[i : i + 1], n, temperature=0))
        return torch.cat(rows)

    t_mixed, out_mixed = _timed(mixed, args.device, args.repeats)
    t_separate, out_separate = _timed(separate, args.device, args.repeats)
    tokens = len(names) * n
    return {"mixed_tokens_per_s": tokens / t_mixed, "separate_tokens_per_s": tokens / t_separate,
            "ratio": t_separate / t_mixed, "tokens_equal": bool(torch.equal(out_mixed, out_separate))}  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = CommandLineParser(prog="bench_multi_adapter.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=4, help="adapters, one prompt (row) each")
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each; the fastest is kept")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)
    for key in ("adapters", "d_model", "num_heads", "num_layers", "vocab_size", "lora_r", "prompt_len",
                "new_tokens", "repeats"):  # fmt: skip
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        r = bench(args)
        print(f"{args.adapters} adapters x {args.new_tokens} new tokens (prompt {args.prompt_len}, d_model "
              f"{args.d_model}, {args.num_layers} layers, r {args.lora_r}, {args.device})")  # fmt: skip
        print(f"mixed batch:   {r['mixed_tokens_per_s']:10.1f} tokens/s")
        print(f"separate runs: {r['separate_tokens_per_s']:10.1f} tokens/s")
        print(f"ratio (mixed / separate): {r['ratio']:.2f}x; greedy tokens equal: {r['tokens_equal']}")
        return 0 if r["tokens_equal"] else 1

    return guarded("bench_multi_adapter.py", body, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
