"""Chat templates: a conversation rendered as text the way transformers renders it, and its token ids with the
answers-only loss mask.

**Where a template comes from** (:func:`load_chat_template`, first found wins): a file given by the user
(``--chat_template FILE``); the base folder's ``chat_template.jinja``; the ``chat_template`` of its
``tokenizer_config.json`` (a string, or a list of ``{"name", "template"}`` of which ``"default"`` is taken);
else :data:`DEFAULT_TEMPLATE`, this project's own, for bases that have none (the built-in byte-level bases and
GPT-2)::

    <|system|>\\n{system}<|end|>\\n<|user|>\\n{question}<|end|>\\n<|assistant|>\\n{answer}<|end|>\\n

Its end-of-turn string is ``<|end|>``: an answer ends there. On a byte-level base the markers are plain bytes,
on GPT-2 a few ordinary tokens each; the model learns them like any text.

**Rendering** follows transformers' ``apply_chat_template``: Jinja's ``ImmutableSandboxedEnvironment`` with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` block that
renders its body, a ``tojson`` filter that does not escape HTML (``json.dumps``), the globals
``raise_exception(message)`` and ``strftime_now(format)``, and the variables ``messages`` (``{"role",
"content"}`` dicts), ``add_generation_prompt``, ``tools`` and ``documents`` (``None``) and the tokenizer's
named special tokens (``bos_token``, ``eos_token``, ...) from ``tokenizer_config.json``. The text is then
tokenized whole, without added special tokens, as transformers does: the ids equal
``AutoTokenizer.apply_chat_template(conversation, tokenize=True)`` token for token.

**The answers-only mask** (:func:`encode_chat`): for assistant turn ``k`` the template renders the conversation
up to turn ``k - 1`` with the generation prompt (``P_k``) and up to turn ``k`` (``Q_k``); both must be
beginnings of the whole rendering. The scored characters are ``[len(P_k), len(Q_k.rstrip()))``: the answer
and what the template closes its turn with (``<|im_end|>``, ``<|eot_id|>``, ``</s>``...), without the
whitespace that follows it (the model stops at the end-of-turn token and never predicts that whitespace). A
token is scored when its characters overlap a scored span, so a token that joins a header's space to the
answer's first word (``" Hi"`` after ``[/INST]``) is scored: it is the answer's first token.

Characters map to tokens through the tokenizer's own offsets (``tokenizers``' ``Encoding.offsets``; byte ``i``
of the byte tokenizer lies in the character that holds it): exact, and the ids stay those of the whole text.
Encoding the text piece by piece at the span edges would give other ids wherever BPE merges across an edge
(``" Hi"`` above becomes ``" "`` + ``"Hi"``), so a plain ``encode`` function (text -> ids, no offsets) is used
that way only when the pieces' ids equal the whole text's, and refused otherwise.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

from lora.chat_data import Message
from lora.errors import ConfigError, DataError, first_line
from lora.files import MAX_SETTINGS_BYTES, read_json, read_limited
from lora.tokenizer import ByteTokenizer, HFTokenizer

__all__ = ["BUILT_IN", "DEFAULT_END_OF_TURN", "DEFAULT_TEMPLATE", "ChatTemplate", "ChatTokens", "answer_spans",
           "encode_chat", "load_chat_template"]  # fmt: skip

BUILT_IN = "built-in"  # the source of DEFAULT_TEMPLATE
DEFAULT_END_OF_TURN = "<|end|>"
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
# the named special tokens transformers hands a template (its SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_PROBE = "Answer."  # the answer of the conversation that finds a template's end-of-turn string

MIN_JINJA2 = (3, 1, 6)  # as transformers requires

Encode = Callable[[str], list[int]]


def _jinja() -> object:
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise ConfigError('chat templates need the jinja2 package: pip install -e ".[hf]"') from None
    found = tuple(int(p) if p.isdigit() else 0 for p in jinja2.__version__.split(".")[:3])
    if found < MIN_JINJA2:  # templates come with downloaded models: older sandboxes have known escapes
        raise ConfigError(f"chat templates need jinja2 >= {'.'.join(map(str, MIN_JINJA2))} (older versions have "
                          f"sandbox escapes), found {jinja2.__version__}: pip install -U jinja2")  # fmt: skip
    return jinja2


@functools.lru_cache(maxsize=16)
def _compile(text: str) -> object:
    """``text`` as a Jinja template in the sandbox transformers uses (see the module docstring); a syntax error
    raises ``jinja2.TemplateSyntaxError``."""
    jinja2 = _jinja()

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' marker of assistant text): its body."""

        tags = {"generation"}  # noqa: RUF012 - jinja2's own class attribute

        def parse(self, parser: object) -> object:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(text)


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template, where it came from (a path, or :data:`BUILT_IN`), and the special tokens it sees."""

    text: str
    source: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text; a template that does not compile or refuses to render (its
        ``raise_exception``, an attribute of an undefined value, a type error) raises :class:`ConfigError` naming the source."""
        try:
            template = _compile(self.text)
        except ConfigError:  # jinja2 is missing
            raise
        except Exception as e:  # jinja2.TemplateSyntaxError, and whatever else the parser raises
            line = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
            raise ConfigError(f"chat template {self.source}{line}: {first_line(e)}") from None
        try:
            return template.render(messages=[m.as_dict() for m in messages], add_generation_prompt=add_generation_prompt,
                                   tools=None, documents=None, **self.special_tokens)  # fmt: skip
        except Exception as e:  # raise_exception's TemplateError, a sandbox SecurityError, a TypeError...
            raise ConfigError(f"chat template {self.source} failed to render: {type(e).__name__}: "
                              f"{first_line(e)}") from None  # fmt: skip

    @cached_property
    def end_of_turn(self) -> str:
        """The text the template closes an answer with (``<|end|>``, ``<|im_end|>``, ``<|eot_id|>``...): what
        follows the answer in a one-exchange conversation, without surrounding whitespace; ``""`` if nothing
        does. Rendering it also checks the template (:class:`ConfigError` if it fails)."""
        conversation = [Message("user", "Question?"), Message("assistant", _PROBE)]
        text, spans = answer_spans(conversation, self)
        answer = text[spans[0][0] : spans[0][1]]
        at = answer.find(_PROBE)
        return "" if at < 0 else answer[at + len(_PROBE) :].strip()


def _token_text(value: object) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string, or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_chat_template(folder: str | Path | None, file: str | Path | None = None) -> ChatTemplate:
    """The chat template for a base ``folder`` (``None``: the built-in base), or the one in ``file``: see the
    module docstring for the order. The folder's ``tokenizer_config.json`` gives the special tokens either
    way. A file that cannot be read, or a list of templates without ``"default"``: :class:`ConfigError`."""
    config: dict = {}
    config_path = None if folder is None else Path(folder) / TOKENIZER_CONFIG
    if config_path is not None and config_path.is_file():
        try:
            config = read_json(config_path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    special = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
    jinja_path = None if folder is None else Path(folder) / TEMPLATE_FILE
    if file is None and jinja_path is not None and jinja_path.is_file():
        file = jinja_path
    if file is not None:
        try:
            text = read_limited(file, MAX_SETTINGS_BYTES, "chat template").decode("utf-8")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ConfigError(f"chat template not found: {file}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"chat template {file}: not UTF-8 text") from None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return ChatTemplate(text, str(file), special)
    found = config.get("chat_template")
    if found is None:
        return ChatTemplate(DEFAULT_TEMPLATE, BUILT_IN, special)
    if isinstance(found, list):
        named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
        if not isinstance(named.get("default"), str):
            raise ConfigError(f'{config_path}: "chat_template" lists templates {sorted(map(str, named))} but no '
                              f'"default"; pass one as a file (--chat_template FILE)')  # fmt: skip
        found = named["default"]
    if not isinstance(found, str):
        raise ConfigError(f'{config_path}: "chat_template" must be a string or a list of {{"name", "template"}}, '
                          f"got {type(found).__name__}")  # fmt: skip
    return ChatTemplate(found, str(config_path), special)


def answer_spans(
    conversation: Sequence[Message], template: ChatTemplate
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, for each assistant turn, the characters ``[start, end)`` of its answer
    and end-of-turn (see the module docstring). A template whose rendering of a conversation's beginning is
    not the beginning of the whole rendering (one that renders a turn differently when more follows) cannot
    be masked this way: :class:`ConfigError`."""
    text = template.render(conversation)
    spans = []
    for k, message in enumerate(conversation):
        if message.role != "assistant":
            continue
        prompt = template.render(conversation[:k], add_generation_prompt=True)
        upto = template.render(conversation[: k + 1])
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise ConfigError(f"chat template {template.source}: turn {k} renders differently once the conversation "
                              f"goes on, so its answer cannot be located for the loss mask")  # fmt: skip
        start, end = len(prompt), len(upto.rstrip())
        if end <= start:
            raise ConfigError(f"chat template {template.source}: renders nothing for the answer of turn {k}")
        spans.append((start, end))
    return text, spans


def _offsets(tokenizer: ByteTokenizer | HFTokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``text``'s ids and each token's characters ``[start, end)``."""
    if isinstance(tokenizer, HFTokenizer):
        encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]
    ids = tokenizer.encode(text)
    offsets = [(i, i + 1) for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
    return ids, offsets


def _pieces(
    encode: Encode, text: str, spans: list[tuple[int, int]], source: str
) -> tuple[list[int], list[bool]]:
    """Ids and mask of ``text`` encoded a piece at a time at the spans' edges, refused where the pieces' ids are
    not the whole text's (a token merges across an edge)."""
    edges = sorted({0, len(text), *itertools.chain.from_iterable(spans)})
    ids: list[int] = []
    scored: list[bool] = []
    for a, b in itertools.pairwise(edges):
        piece = encode(text[a:b])
        ids += piece
        scored += [any(s <= a and b <= e for s, e in spans)] * len(piece)
    if ids != list(encode(text)):
        raise ConfigError(f"chat template {source}: the tokenizer merges tokens across the edge of an answer, so "
                          f"encoding piece by piece changes the ids; use a tokenizer that gives offsets")  # fmt: skip
    return ids, scored


@dataclass
class ChatTokens:
    """A conversation as token ids and the loss mask: ``scored[i]`` is True where token ``i`` is a target of
    the loss (predicted from tokens ``0..i-1``): an answer's tokens and its end-of-turn, or every token with
    ``train_on_prompt``. ``text`` is the rendering the ids encode (before any truncation)."""

    ids: list[int]
    scored: list[bool]
    text: str

    def __len__(self) -> int:
        return len(self.ids)


def encode_chat(
    conversation: Sequence[Message],
    template: ChatTemplate,
    tokenizer: ByteTokenizer | HFTokenizer | Encode,
    train_on_prompt: bool = False,
    max_tokens: int | None = None,
) -> ChatTokens | None:
    """The conversation rendered by ``template`` and tokenized whole, with its answers-only mask (see the
    module docstring; ``train_on_prompt``: every token scored).

    ``tokenizer``: the byte tokenizer or a ``tokenizer.json`` one (masked through offsets), or a plain function
    text -> ids (masked by encoding at the edges, refused where a token crosses one). ``max_tokens``: keep the
    first ``max_tokens`` ids; a conversation cut before any scored token after the first (the first token
    cannot be predicted) is dropped: ``None``, for the caller to count. A conversation that renders to no
    tokens: :class:`DataError`.
    """
    if train_on_prompt:
        text = template.render(conversation)
        spans = [(0, len(text))]
    else:
        text, spans = answer_spans(conversation, template)
    if isinstance(tokenizer, (ByteTokenizer, HFTokenizer)):
        ids, offsets = _offsets(tokenizer, text)
        flags = [0] * len(text)
        for a, b in spans:
            flags[a:b] = [1] * (b - a)
        before = [0, *itertools.accumulate(flags)]  # before[c]: scored characters in text[:c]
        # a token of characters [s, e) is scored when one of them is; a token with no characters of its own
        # (offsets s == e) counts as the character at s
        scored = [before[min(max(e, s + 1), len(text))] > before[s] for s, e in offsets]
    else:
        ids, scored = _pieces(tokenizer, text, spans, template.source)
    if not ids:
        raise DataError(f"chat template {template.source} renders the conversation as no tokens")
    if max_tokens is not None:
        ids, scored = ids[:max_tokens], scored[:max_tokens]
        if not any(scored[1:]):
            return None
    return ChatTokens(ids, scored, text)
