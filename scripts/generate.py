"""Generate text from a base model and from one or more adapters on it, side by side.

Text is read and written with the tokenizer the run used (the adapter folder's ``tokenizer.json``), else
the base folder's own, else bytes (the built-in bases: token id = byte value; invalid UTF-8 shows as
U+FFFD). With a folder's own tokenizer the prompt starts with its BOS where the tokenizer adds one, and
generation stops at its EOS (any of ``generation_config.json``'s ``eos_token_id``), read from the same folder
as the tokenizer: a run folder keeps those files. Every variant starts from the same seed, so differences
come from the adapters. With ``--batched`` the base and every adapter answer in one batch, each row with its own
adapter (``model.generate(..., adapter_names=[...])``, ``lora/multi_adapter.py``): greedy, the same text as one at
a time; sampled, the rows draw from one random stream, so their text differs from the one-at-a-time runs'.

An adapter continues text in the format it was trained on. The cipher tasks (rot13, atbash) read and write
each letter followed by its cipher (``lora/data.py``), so a prompt is letters interleaved with their cipher
that ends on a plain letter, and the answer is that letter's cipher: to encipher the o of hello with the main
job's adapter, ``--prompt huerlylyo --max_new_tokens 1`` (ROT13 answers b; the Caesar base p). A plain word is
no such prompt: ``hello`` reads as the pairs h e and l l, then o. ``--help`` lists a prompt for each task, and
an adapter of a cipher task given a prompt in another format is run with a one-line warning.

    python scripts/generate.py --base runs/bases/caesar-d256-h4-l2-s128-steps300-seed0 --adapter runs/rot13-lora-r8 \\
        --prompt huerlylyo --max_new_tokens 1 --temperature 0
    python scripts/generate.py --base runs/bases/caesar-d256-h4-l2-s128-steps300-seed0 --adapter runs/multitask-rot13 \\
        --adapter runs/multitask-atbash --prompt h --max_new_tokens 1 --temperature 0 --no_base
    python scripts/generate.py --base runs/bases/caesar-d256-h4-l2-s128-steps300-seed0 --adapter runs/multitask-rot13 \\
        --adapter runs/multitask-atbash --prompt h --max_new_tokens 1 --temperature 0 --batched
    python scripts/generate.py --base runs/bases/english-d256-h4-l2-s128-steps800-seed0 --prompt "The "
    python scripts/generate.py --base runs/bases/english-d256-h4-l2-s128-steps800-seed0 --adapter runs/code-lora-r8 --prompt "def " --top_k 40
    python scripts/generate.py --base path/to/gpt2 --adapter runs/my-text-run --prompt "Once upon a time"
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/generate.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch is imported: one line, exit 130
        from lora.errors import exit_on_signals

        exit_on_signals()

import torch

from lora.config import GENERATED_TASKS, TASKS, CommandLineParser
from lora.data import base_task_of, cipher_prompt, cipher_text, is_cipher_prompt
from lora.errors import guarded, quote
from lora.lora_transformer import LoRATransformer
from lora.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, tokenizer_files

MIN_TEMPERATURE = 1e-4
EXAMPLE_WORD = "hello"  # the word the prompts of the cipher tasks encipher
# the other tasks' prompts, in words (the cipher tasks' are made from their data format: task_prompts)
PROMPTS = {
    "code": '--prompt "def " (Python source; on the English base)',
    "text": "the start of a text like your train_file",
    "jsonl": "none: a classifier, which generate.py refuses",
    "chat": "use scripts/chat.py: it puts the conversation through the run's chat template",
    "instruct": "use scripts/chat.py, as for chat",
}


def task_prompts() -> str:
    """What ``--help`` says about prompts: one that works for each built-in task, the cipher tasks' made by
    their own data format (:func:`lora.data.cipher_prompt`)."""
    lines = ["prompts that work, task by task (an adapter continues text in the format it was trained on):"]
    for task in TASKS:
        if task not in GENERATED_TASKS:
            lines.append(f"  {task:<9} {PROMPTS[task]}")
            continue
        base = base_task_of(task)
        answer, base_answer = cipher_text(task, EXAMPLE_WORD)[-1], cipher_text(base, EXAMPLE_WORD)[-1]
        lines += [f"  {task:<9} --prompt {cipher_prompt(task, EXAMPLE_WORD)} --max_new_tokens 1 --temperature 0",
                  f"  {'':<9} ({EXAMPLE_WORD}: each letter, then its cipher, up to the {EXAMPLE_WORD[-1]}; the adapter "
                  f"answers {answer}, the {base} base {base_answer})"]  # fmt: skip
    lines.append(f"  (a plain word is no cipher prompt: {EXAMPLE_WORD} reads as the pairs "
                 f"{'-'.join(EXAMPLE_WORD[:2])} and {'-'.join(EXAMPLE_WORD[2:4])}, then {EXAMPLE_WORD[4:]})")  # fmt: skip
    return "\n".join(lines)


def check_prompt(prompt: str, task: object, folder: str) -> str | None:
    """A one-line warning when the adapter in ``folder``, trained on ``task``, is a cipher task's and
    ``prompt`` is not in its format; else ``None``."""
    if task not in GENERATED_TASKS or is_cipher_prompt(str(task), prompt):
        return None
    return (f"the adapter {folder} was trained on {task}: each letter followed by its cipher, ending on a "
            f"plain letter; {quote(prompt)} is not in that format (e.g. --prompt "
            f"{cipher_prompt(str(task), EXAMPLE_WORD)} --max_new_tokens 1 for {EXAMPLE_WORD}'s last letter)")  # fmt: skip


def encode(text: str, tokenizer: Tokenizer) -> list[int]:
    """``text`` as token ids, BOS first where the tokenizer adds one; text that is not valid UTF-8, or no
    token at all, is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 reach Python as lone surrogates
        raise ValueError(f"--prompt is not valid UTF-8 text (position {e.start})") from None
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("--prompt must not be empty")
    return tokenizer.special_tokens.prefix + ids


def pick_tokenizer(base: str, adapters: Sequence[str], vocab_size: int) -> Tokenizer:
    """The first adapter folder's recorded ``tokenizer.json``, else the base folder's tokenizer, else bytes
    (which need a model of 256 ids)."""
    folder = next((a for a in adapters if tokenizer_files(a)), base)
    return load_tokenizer(folder, vocab_size)


def sample(
    model: LoRATransformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    out: list[int] | None = None,
    tokenizer: Tokenizer | None = None,
) -> str:
    """The text generated after ``prompt`` (the prompt itself not included), up to the tokenizer's EOS.

    Tokens are appended to ``out`` as they come, one ``generate`` step at a time (the same tokens as one
    call for all of them), so that an interrupted run still has what it generated so far; an EOS token
    (one of the tokenizer's ``eos_ids``) is the last one appended, and not part of the text.
    """
    out = [] if out is None else out
    tokenizer = tokenizer or ByteTokenizer()
    eos = set(tokenizer.special_tokens.eos_ids)
    g = torch.Generator(device=model.wte.weight.device).manual_seed(seed)
    idx = torch.tensor([prompt], device=model.wte.weight.device)  # (1, T)
    for _ in range(max_new_tokens):
        idx = model.generate(idx, 1, temperature=temperature, top_k=top_k, generator=g)
        out.append(int(idx[0, -1]))
        if out[-1] in eos:
            break
    return text_of(out, tokenizer)


def sample_batched(
    model: LoRATransformer,
    prompt: list[int],
    rows: list[tuple[str, list[int]]],
    names: list[str],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    tokenizer: Tokenizer,
) -> None:
    """``prompt`` answered by every adapter of ``names`` (``"base"``: none) in one batch, row ``i`` with adapter
    ``names[i]``; each step's tokens are appended to ``rows[i][1]`` as they come (a finished row's EOS repeats:
    :func:`text_of` ends there)."""
    device = model.wte.weight.device
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt] * len(names), device=device)  # (rows, T)
    eos = list(tokenizer.special_tokens.eos_ids) or None
    for step in model.stream(idx, max_new_tokens, temperature, top_k, g, eos, adapter_names=names):
        for (_, ids), token in zip(rows, step.tolist(), strict=True):
            ids.append(token)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = CommandLineParser(prog="generate.py", description=__doc__.split("\n\n")[0], epilog=task_prompts(),
                          formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--base", required=True, help="model folder (config.json + model.safetensors)")
    p.add_argument("--adapter", action="append", default=[], help="adapter folder; repeat for several")
    p.add_argument(
        "--prompt", required=True, help="UTF-8 text to continue, in the adapter's format (see below)"
    )
    p.add_argument(
        "--max_new_tokens", type=int, default=64, help="at most the model's context less the prompt"
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens (>= 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    p.add_argument("--no_base", action="store_true", help="show the adapters only")
    p.add_argument("--batched", action="store_true",
                   help="answer with the base and every adapter in one batch, a row each (lora/multi_adapter.py)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="load adapters trained on other base weights")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse options that make no sense, naming them (before any model is loaded)."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if 0 < args.temperature < MIN_TEMPERATURE:  # logits / 1e-45 overflow to inf
        raise ValueError(
            f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {args.temperature:g}"
        )
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {args.top_k}")
    if args.top_k is not None and args.temperature == 0:
        raise ValueError("--top_k has no effect with --temperature 0 (greedy decoding takes the likeliest "
                         "token): drop one of them")  # fmt: skip
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.no_base and not args.adapter:
        raise ValueError("--no_base needs at least one --adapter")


def run(
    args: argparse.Namespace,
    rows: list[tuple[str, list[int]]] | None = None,
    used: list[Tokenizer] | None = None,
) -> list[tuple[str, str]]:
    """``[(label, generated text)]`` for the base and each adapter; ``rows`` receives the tokens as they
    are generated, ``used`` the tokenizer."""
    check_args(args)
    rows = [] if rows is None else rows
    model = LoRATransformer.from_pretrained(args.base, lora_r=0, num_classes=None).eval()
    tokenizer = pick_tokenizer(args.base, args.adapter, model.config.vocab_size)
    if used is not None:
        used.append(tokenizer)
    prompt = encode(args.prompt, tokenizer)
    room = model.max_seq_len - len(prompt)
    if room < 1:
        raise ValueError(f"--prompt is {len(prompt)} tokens, the model's whole context is {model.max_seq_len}: "
                         "shorten it")  # fmt: skip
    if args.max_new_tokens > room:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens} and the {len(prompt)}-token prompt exceed the "
                         f"model's context of {model.max_seq_len} tokens: at most {max(room, 0)}")  # fmt: skip
    gen = (args.max_new_tokens, args.temperature, args.top_k, args.seed)
    variants = [] if args.no_base else [("base", None)]
    variants += [(f"adapter {folder}", folder) for folder in args.adapter]
    names = []
    for i, (label, folder) in enumerate(variants):
        if folder is not None:
            model.load_adapter(folder, f"adapter{i}", force=args.force)
            if model.cls_head is not None:
                raise ValueError(f"{folder}: a classification adapter cannot generate text")
            warning = check_prompt(args.prompt, model.adapters.get(f"adapter{i}").extra.get("task"), folder)
            if warning is not None:
                warnings.warn(warning, stacklevel=1)
        names.append("base" if folder is None else f"adapter{i}")
        if not args.batched:
            rows.append((label, []))
            sample(model, prompt, *gen, out=rows[-1][1], tokenizer=tokenizer)
    if args.batched:
        rows += [(label, []) for label, _ in variants]
        sample_batched(model, prompt, rows, names, *gen, tokenizer=tokenizer)
    return [(label, text_of(ids, tokenizer)) for label, ids in rows]


def text_of(ids: list[int], tokenizer: Tokenizer) -> str:
    """The text of generated ``ids``, up to the EOS where generation stopped."""
    return tokenizer.decode(tokenizer.special_tokens.until_eos(ids))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[tuple[str, list[int]]] = []
    used: list[Tokenizer] = []

    def body() -> int:
        try:
            texts = run(args, rows, used)
        except KeyboardInterrupt:  # what was generated so far is kept
            for label, ids in rows:
                print(f"=== {label} ===\n{args.prompt}{text_of(ids, used[0])}\n")
            print(
                f"generate.py: interrupted after {sum(len(ids) for _, ids in rows)} tokens", file=sys.stderr
            )
            return 130
        for label, text in texts:
            print(f"=== {label} ===\n{args.prompt}{text}\n")
        return 0

    # Ctrl-C and SIGTERM raise KeyboardInterrupt: body keeps what was generated
    previous = {s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return guarded("generate.py", body, args.debug)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    raise SystemExit(main())
