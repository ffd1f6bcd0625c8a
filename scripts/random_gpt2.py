"""Write a GPT-2-shaped folder with RANDOM weights, as transformers saves one, and a tokenizer trained here.

For trying the GPT-2 path, and for measuring speed and memory at a real model's shape, on a machine that
has no GPT-2 checkpoint: nothing is downloaded. The weights are transformers' random initialisation, so
what the model writes is noise; ``config.json`` says so (``"weights": "random ..."``). The tokenizer is a
byte-level BPE trained on the standard library's documentation and source (about 1.7 MB of text), padded
with reserved tokens to the model's 50,257. Needs transformers and tokenizers (``pip install -e ".[dev]"``).

    python scripts/random_gpt2.py --size gpt2 --out runs/bases/random-gpt2
    python lora/train_lora.py --base_checkpoint runs/bases/random-gpt2 --task text --train_file my.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/random_gpt2.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch is imported: one line, exit 130
        from lora.errors import exit_on_signals

        exit_on_signals()

import torch

from lora.config import CommandLineParser
from lora.data import english_text, python_source
from lora.errors import guarded
from lora.files import atomic_folder
from lora.quantize import import_torchao_quietly
from lora.tokenizer import END_OF_TEXT, train_byte_bpe

# the published shapes (n_layer, n_embd, n_head); all have 50,257 tokens and 1,024 positions (tiny: a test's)
SIZES = {"distilgpt2": (6, 768, 12), "gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16), "tiny": (2, 64, 2)}
VOCAB_SIZE, POSITIONS = 50257, 1024


def write(size: str, out: Path, seed: int) -> dict:
    """Write the folder; return what ``config.json`` says of it."""
    import_torchao_quietly()  # transformers imports it when installed (the [quant] extra)
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_embd, n_head = SIZES[size]
    train, _ = python_source()
    tokenizer = train_byte_bpe([english_text().decode(), train.decode()], VOCAB_SIZE)
    eos = tokenizer.token_to_id(END_OF_TEXT)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=POSITIONS, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=eos, eos_token_id=eos)  # fmt: skip
    model = GPT2LMHeadModel(config)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save(str(tmp / "tokenizer.json"))
        settings = json.loads((tmp / "config.json").read_text())
        settings["weights"] = (
            f"random (transformers' initialisation, seed {seed}) by scripts/random_gpt2.py: noise"
        )
        (tmp / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
    params = sum(p.numel() for p in model.parameters())
    learned = sum(not t.startswith("<|reserved_") for t in tokenizer.get_vocab())
    return {"size": size, "params": params, "tokenizer_tokens": learned, "folder": str(out)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = CommandLineParser(prog="random_gpt2.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="gpt2", choices=list(SIZES), help="the published shape to copy")
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        out = Path(args.out)
        if out.exists():
            raise ValueError(f"--out {out} exists already; pick a new folder")
        facts = write(args.size, out, args.seed)
        print(f"wrote {facts['folder']}: {facts['size']} shape, {facts['params']:,} parameters (RANDOM weights), "
              f"tokenizer of {facts['tokenizer_tokens']:,} learned tokens (padded to {VOCAB_SIZE:,})")  # fmt: skip
        return 0

    return guarded("random_gpt2.py", body, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
