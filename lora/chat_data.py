"""Chat and instruction data: a JSONL file (one object a line) or a JSON list of objects, read as conversations.

Four row formats are understood, each normalised to a list of :class:`Message` (``role`` one of ``system``,
``user``, ``assistant``):

==================  ========================================================================  =============
format              a row                                                                     becomes
==================  ========================================================================  =============
``messages``        ``{"messages": [{"role": "user", "content": "..."}, ...]}``               the same turns
``sharegpt``        ``{"conversations": [{"from": "human", "value": "..."}, ...]}``            ``from`` system,
                    (``from``: ``system``, ``human`` or ``user``, ``gpt`` or ``assistant``)   user, assistant
``prompt``          ``{"prompt": "...", "completion": "..."}``                                user, assistant
``alpaca``          ``{"instruction": "...", "input": "...", "output": "..."}``               user, assistant
==================  ========================================================================  =============

Alpaca's user turn is the instruction alone when ``input`` is missing or empty, else
``instruction + "\\n\\n" + input`` (the instruction first, then its material after a blank line, as Alpaca's
own prompt puts them).

The format is that of the file's first row; every row must be in it. A conversation is an optional system
turn, then user and assistant turns alternating, ending with an assistant turn whose content is not blank.
Anything else (a row in another format, an unknown role, an empty answer, turns that do not alternate,
invalid JSON, content that is not a string) raises :class:`DataError` in one line naming the file and line.
Keys a format does not name (``id``, ``source``, ...) are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lora.errors import DataError, quote
from lora.files import read_text_file

__all__ = ["FORMATS", "ROLES", "ChatData", "Message", "read_chat_file"]

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
# format -> the keys that identify a row of it (checked in this order: a row with "messages" is a messages row)
FORMATS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: ``role`` is ``system``, ``user`` or ``assistant``."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        """``{"role", "content"}``: the message as a chat template sees it."""
        return {"role": self.role, "content": self.content}


Conversation = list[Message]


@dataclass
class ChatData:
    """A chat file's conversations, in file order, with the format they were written in and the line each
    started on (for messages that name it later, e.g. a conversation cut by ``seq_len``)."""

    path: Path
    format: str  # a key of FORMATS
    conversations: list[Conversation]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.conversations)


def detect_format(row: object) -> str | None:
    """The format whose keys ``row`` has (see :data:`FORMATS`), or ``None``."""
    if isinstance(row, dict):
        for name, keys in FORMATS.items():
            if all(k in row for k in keys):
                return name
    return None


def _expected() -> str:
    return "; ".join(f"{name}: " + " + ".join(f'"{k}"' for k in keys) for name, keys in FORMATS.items())


def _text(value: object, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__} {quote(value, 40)}")
    return value


def _turns(row: dict, fmt: str, where: str) -> Conversation:
    """``row`` (a row of format ``fmt``) as messages, unchecked for order."""
    if fmt == "prompt":
        return [Message("user", _text(row["prompt"], '"prompt"', where)),
                Message("assistant", _text(row["completion"], '"completion"', where))]  # fmt: skip
    if fmt == "alpaca":
        instruction = _text(row["instruction"], '"instruction"', where)
        extra = "" if row.get("input") is None else _text(row["input"], '"input"', where)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [Message("user", user), Message("assistant", _text(row["output"], '"output"', where))]
    key, role_key, content_key = ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")  # fmt: skip
    turns = row[key]
    if not isinstance(turns, list):
        raise DataError(f'{where}: "{key}" must be a list of turns, got {type(turns).__name__}')
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DataError(f'{where}: turn {j} of "{key}" must be an object with "{role_key}" and '
                            f'"{content_key}", got {quote(turn, 40)}')  # fmt: skip
        role = turn[role_key]
        names = ROLES if fmt == "messages" else SHAREGPT_ROLES
        if not isinstance(role, str) or role not in names:
            raise DataError(f'{where}: turn {j} has unknown {role_key} {quote(role, 40)}; expected one of '
                            f"{', '.join(names)}")  # fmt: skip
        role = role if fmt == "messages" else SHAREGPT_ROLES[role]
        out.append(Message(role, _text(turn[content_key], f'turn {j}\'s "{content_key}"', where)))
    return out


def check_conversation(turns: Conversation, where: str) -> None:
    """Refuse (:class:`DataError` naming ``where``) a conversation that is not an optional system turn, then
    user and assistant turns alternating, the last an assistant turn with content that is not blank."""
    body = turns[1:] if turns and turns[0].role == "system" else turns
    if not body:
        raise DataError(f"{where}: no user or assistant turn; expected user, assistant, ...")
    for j, m in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if m.role != expected:
            position = j + len(turns) - len(body)
            raise DataError(f"{where}: turn {position} is {m.role} where {expected} was expected; a conversation is "
                            f"an optional system turn, then user and assistant alternating")  # fmt: skip
    if body[-1].role != "assistant":
        raise DataError(
            f"{where}: the conversation ends with a user turn; it must end with an assistant answer"
        )
    for j, m in enumerate(turns):
        if m.role == "assistant" and not m.content.strip():
            raise DataError(f"{where}: turn {j} is an empty answer (assistant content is blank)")


def _jsonl_rows(text: str, path: Path) -> Iterator[tuple[int, object]]:
    """``(line, object)`` of each non-blank line."""
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {i}: invalid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path} line {i}: nested too deeply") from None


def _json_list_rows(text: str, path: Path) -> Iterator[tuple[int, object]]:
    """``(line, object)`` of each element of a JSON list, the line where the element starts (the list is
    read one element at a time, so an error names the line of the element it is in)."""
    decoder, i, n = json.JSONDecoder(), text.index("[") + 1, len(text)

    def skip(j: int) -> int:
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    def fail(j: int, what: str) -> DataError:
        return DataError(f"{path} line {text.count(chr(10), 0, j) + 1}: invalid JSON ({what})")

    i = skip(i)
    if i < n and text[i] == "]":
        i += 1
    else:
        while True:
            try:
                row, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
            except RecursionError:
                raise fail(i, "nested too deeply") from None
            yield text.count("\n", 0, i) + 1, row
            i = skip(end)
            if i < n and text[i] == ",":
                i = skip(i + 1)
            elif i < n and text[i] == "]":
                i += 1
                break
            else:
                raise fail(i, "expected ',' or ']' after an element")
    if skip(i) != n:
        raise fail(skip(i), "extra data after the list")


def read_chat_file(path: str | Path) -> ChatData:
    """The conversations of a chat file: JSONL, or a JSON list when its first character (after blanks) is
    ``[``. The format is the first row's (see the module docstring); every row is checked by
    :func:`check_conversation`. Any problem: :class:`DataError` ``"<path> line <n>: ..."``."""
    path = Path(path)
    text = read_text_file(path)
    rows = _json_list_rows(text, path) if text.lstrip().startswith("[") else _jsonl_rows(text, path)
    fmt, first = None, 0
    conversations, lines = [], []
    for line, row in rows:
        where = f"{path} line {line}"
        found = detect_format(row)
        if found is None:
            got = f"keys {sorted(row)[:8]}" if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{where}: not a chat row (got {got}); expected an object with {_expected()}")
        if fmt is None:
            fmt, first = found, line
        elif found != fmt:
            raise DataError(f"{where}: a {found} row, but the file is in the {fmt} format (line {first}); "
                            f"every row must be in one format")  # fmt: skip
        turns = _turns(row, fmt, where)
        check_conversation(turns, where)
        conversations.append(turns)
        lines.append(line)
    if not conversations:
        raise DataError(f"{path}: no conversations (an empty list)")
    return ChatData(path, fmt, conversations, lines)
