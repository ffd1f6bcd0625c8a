"""Talk to a model: a base with its adapters, through its chat template, each reply shown as it is generated.

    python scripts/chat.py --adapter runs/chat-lora                        # the base the run names
    python scripts/chat.py --base path/to/base --adapter runs/a --adapter runs/b --temperature 0
    python scripts/chat.py --adapter runs/chat-lora --prompt "What is 2 + 3?" --temperature 0   # once, then exit

At the prompt: a message, or ``/reset`` (forget the conversation), ``/adapter`` (list the adapters, ``*`` the
one in use), ``/adapter NAME`` (answer with another; ``/adapter none``: the base alone), ``/exit`` (or Ctrl-D).
An adapter is named by its folder's name; the first one answers first.

**The template** (``lora/chat_template.py``): ``--chat_template FILE``, else the one a run folder recorded
(``chat_template.jinja`` in the first ``--adapter`` folder that has one), else the base folder's, else the
built-in ``<|user|>\\n...<|end|>\\n<|assistant|>\\n``. The whole conversation is rendered again each turn (with
the generation prompt), tokenized as transformers' ``apply_chat_template`` does, and answered with a fresh
key/value cache. A conversation longer than the model's context is read from its end (a note says so).

**A reply ends** at one of the tokenizer's EOS ids (``generation_config.json``'s) or where its text reaches the
template's end-of-turn string (``<|end|>``, ``<|im_end|>``...; on a byte-level base several tokens), which is not
shown; else after ``--max_new_tokens``. Text is shown as soon as it is final: a token that ends inside a UTF-8
character, or text that may be the start of the end-of-turn string, waits for the next token.

**Ctrl-C** during a reply stops it and keeps what it said so far in the conversation (what the user saw); the
prompt comes back. Ctrl-C at the prompt ends the chat (exit 0). Bad input (a missing folder, an adapter of
another base, a template that does not render) is one line, exit 2.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/chat.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch is imported: one line, exit 130
        from lora.errors import exit_on_signals

        exit_on_signals()

import torch

from lora.chat_data import Message
from lora.chat_template import TEMPLATE_FILE, ChatTemplate, load_chat_template
from lora.config import CommandLineParser
from lora.errors import guarded
from lora.formats import read_adapter_folder
from lora.lora_transformer import LoRATransformer
from lora.tokenizer import Tokenizer, load_tokenizer, tokenizer_files

PROMPT = "> "
HELP = "commands: /reset, /adapter [NAME | none], /exit"
MIN_TEMPERATURE = 1e-4


class ReplyText:
    """The text of a reply's tokens, given out as it becomes final (see the module docstring).

    :meth:`add` takes the next token and returns ``(new text, whether the turn ended)``: the whole reply is
    decoded again each time (a BPE or byte-level piece alone may be half a character), and what is returned is
    the text since the last return, less a trailing incomplete character (U+FFFD) and less a tail that may be
    the beginning of ``end_of_turn``. Once the text holds ``end_of_turn`` the reply ends before it.
    """

    def __init__(self, decode: Callable[[list[int]], str], end_of_turn: str) -> None:
        self.decode, self.end_of_turn = decode, end_of_turn
        self.ids: list[int] = []
        self.text = ""  # the reply so far, up to the end-of-turn string
        self.shown = 0  # characters of it given out

    def add(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        text = self.decode(self.ids)
        eot = self.end_of_turn
        at = text.find(eot) if eot else -1
        if at >= 0:
            self.text = text[:at]
            return self.rest(), True
        self.text = text
        final = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character decodes as U+FFFD
        for k in range(min(len(eot) - 1, final), 0, -1):  # a tail that may become the end-of-turn string
            if text[:final].endswith(eot[:k]):
                final -= k
                break
        return self._upto(final), False

    def rest(self) -> str:
        """All the text not given out yet (the reply is over)."""
        return self._upto(len(self.text))

    def _upto(self, end: int) -> str:
        new = self.text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return new


class Chat:
    """A conversation with ``model``: its history, the adapter in use (``None``: the base) and how to answer."""

    def __init__(
        self,
        model: LoRATransformer,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        adapters: list[str],
        args: argparse.Namespace,
    ) -> None:
        self.model, self.tokenizer, self.template, self.adapters = model, tokenizer, template, adapters
        self.args = args
        self.end_of_turn = template.end_of_turn  # (renders the template once: a broken one is refused here)
        self.stop_ids = set(tokenizer.special_tokens.eos_ids)
        eot_ids = tokenizer.encode(self.end_of_turn) if self.end_of_turn else []
        if len(eot_ids) == 1:  # a special token of its own (<|im_end|>, <|eot_id|>): a stop id too
            self.stop_ids.add(eot_ids[0])
        self.history: list[Message] = []
        self.adapter: str | None = adapters[0] if adapters else None
        self.generator = torch.Generator(device=model.wte.weight.device).manual_seed(args.seed)

    def use(self, name: str | None) -> None:
        """Answer with adapter ``name`` from now on (``None``: the base)."""
        if name is not None:
            self.model.set_adapter(name)
        self.adapter = name

    def reply(self, text: str, write: Callable[[str], None]) -> str:
        """Answer the user's ``text``, giving the reply's text to ``write`` as it comes; the exchange joins the
        history, also when a Ctrl-C (``KeyboardInterrupt``, raised again) stops the reply (unless nothing was
        said yet)."""
        messages = [*self.history, Message("user", text)]
        ids = self.tokenizer.encode(self.template.render(messages, add_generation_prompt=True))
        context = self.model.max_seq_len
        if len(ids) >= context:
            print(f"(the conversation is {len(ids)} tokens, the model's context {context}: it reads the last "
                  f"{context}; /reset starts again)", file=sys.stderr)  # fmt: skip
        device = self.model.wte.weight.device
        out = ReplyText(self.tokenizer.decode, self.end_of_turn)
        a = self.args
        steps = self.model.stream(torch.tensor([ids], device=device), a.max_new_tokens, a.temperature,
                                  a.top_k, self.generator)  # fmt: skip
        with self.model.disable_adapter() if self.adapter is None else nullcontext():
            try:
                for step in steps:
                    token = int(step[0])
                    if token in self.stop_ids:
                        break
                    new, ended = out.add(token)
                    write(new)
                    if ended:
                        break
                write(out.rest())
            finally:
                steps.close()  # the model leaves its generation state now
                if out.text or out.ids:
                    self.history = [*messages, Message("assistant", out.text)]
        return out.text

    def command(self, line: str) -> bool:
        """Carry out a ``/`` command; ``False`` for ``/exit``."""
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if word == "/exit":
            return False
        if word == "/reset":
            self.history = []
            print("(conversation forgotten)")
        elif word == "/adapter" and not rest:
            for name in self.adapters:
                print(("* " if name == self.adapter else "  ") + name)
            print(("* " if self.adapter is None else "  ") + "none (the base alone)")
        elif word == "/adapter":
            if rest == "none":
                self.use(None)
            elif rest in self.adapters:
                self.use(rest)
            else:
                print(f"no adapter named {rest!r}; the adapters are {', '.join(self.adapters) or 'none'}")
                return True
            print(f"(answering with {rest if rest != 'none' else 'the base alone'})")
        else:
            print(HELP)
        return True


def adapter_names(folders: Sequence[str]) -> list[str]:
    """Each adapter folder's name, made unique (``name-2``...) and never ``none`` (the base's)."""
    names: list[str] = []
    for folder in folders:
        base = Path(folder).resolve().name or "adapter"
        name, n = base, 1
        while name in names or name == "none":
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def base_of(args: argparse.Namespace) -> str:
    """``--base``, else the base the first adapter's folder names (its ``base_checkpoint``)."""
    if args.base is not None:
        return args.base
    if not args.adapter:
        raise ValueError("give --base, or an --adapter run folder that names its base")
    folder = read_adapter_folder(args.adapter[0])
    base = folder.extra.get("base_checkpoint")
    if not isinstance(base, str) or not base:
        raise ValueError(
            f"{args.adapter[0]}: the adapter does not name its base (base_checkpoint): pass --base"
        )
    return base


def check_args(args: argparse.Namespace) -> None:
    """Refuse options that make no sense, naming them (before any model is loaded)."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not (
        math.isfinite(args.temperature) and (args.temperature == 0 or args.temperature >= MIN_TEMPERATURE)
    ):
        raise ValueError(f"--temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, "
                         f"got {args.temperature}")  # fmt: skip
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {args.top_k}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt must not be empty")


def load_chat(args: argparse.Namespace) -> Chat:
    """The model with every adapter loaded (the first in use), its tokenizer and its template."""
    check_args(args)
    base = base_of(args)
    model = LoRATransformer.from_pretrained(base, lora_r=0, num_classes=None).eval()
    names = adapter_names(args.adapter)
    for folder, name in zip(args.adapter, names, strict=True):
        model.load_adapter(folder, name, force=args.force)
        if model.cls_head is not None:
            raise ValueError(f"{folder}: a classification adapter cannot chat")
    if names:
        model.set_adapter(names[0])
    folder = next((a for a in args.adapter if tokenizer_files(a)), base)
    tokenizer = load_tokenizer(folder, model.config.vocab_size)
    recorded = next((a for a in args.adapter if (Path(a) / TEMPLATE_FILE).is_file()), None)
    template = load_chat_template(recorded or base, args.chat_template)
    return Chat(model, tokenizer, template, names, args)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = CommandLineParser(prog="chat.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="model folder (default: the one the first --adapter names)")
    p.add_argument("--adapter", action="append", default=[], help="run or adapter folder; repeat for several")
    p.add_argument("--chat_template", default=None, help="a Jinja chat template file (default: see above)")
    p.add_argument("--prompt", default=None, help="answer this message once and exit")
    p.add_argument("--max_new_tokens", type=int, default=256, help="the longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="0 decodes greedily")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens (>= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="load adapters trained on other base weights")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p.parse_args(argv)


def write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def converse(chat: Chat) -> int:
    """The interactive loop (see the module docstring); the exit code."""
    while True:
        try:
            write(PROMPT)  # to stdout (input()'s own prompt goes to stderr on a terminal)
            line = input()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: the chat ends
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                return 0
            continue
        try:
            chat.reply(line, write)
            print()
        except KeyboardInterrupt:  # the reply stops; what it said stays in the history
            print(" [stopped]")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        chat = load_chat(args)
        if args.prompt is not None:
            chat.reply(args.prompt, write)
            print()
            return 0
        return converse(chat)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt
    try:
        return guarded("chat.py", body, args.debug)
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    raise SystemExit(main())
