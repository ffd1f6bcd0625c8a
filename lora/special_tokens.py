"""A model folder's special tokens: its BOS and EOS, whether BOS starts each text, where generation stops.

Read from the files beside ``tokenizer.json``, with the priorities transformers gives them:

* **The tokenizer's BOS and EOS strings**: ``bos_token`` / ``eos_token`` of ``tokenizer_config.json`` (a
  string, or ``{"content": ...}``), overridden by ``special_tokens_map.json`` where that file exists and
  ``tokenizer_config.json`` has no ``added_tokens_decoder`` (transformers reads the older file only then).
  Either may be ``null`` (Qwen has no BOS); without a string the model's id below names the token.
* **Whether BOS is added** before each text: ``add_bos_token`` in ``tokenizer_config.json`` where it is
  given (as transformers 4's Llama and Gemma tokenizers honour it: Llama, Mistral, Gemma say ``true``),
  else whether ``tokenizer.json``'s post-processor puts one special token before a text (Llama 3's does;
  GPT-2's and Qwen's add none). The post-processor is never run as well, so BOS is added exactly once.
  (transformers 5 goes by the post-processor alone whenever there is a ``tokenizer.json``; the two agree
  on every folder whose flag and post-processor agree.)
* **Generation's EOS ids**: ``eos_token_id`` of ``generation_config.json`` where that file exists (an id,
  or a list: Llama 3's instruct models stop at any of three), else of ``config.json``, as transformers'
  ``GenerationConfig`` is loaded; where the model names none, the tokenizer's EOS.

A string that is not in the tokenizer's vocabulary, or an id that is not below the model's number of
embeddings, is refused with a one-line :class:`~lora.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora.errors import ConfigError, first_line, quote
from lora.files import read_limited
from lora.gpt2 import is_hf_config

__all__ = ["NO_SPECIAL_TOKENS", "SPECIAL_TOKEN_FILES", "SpecialTokens", "read_special_tokens"]

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CONFIG = "config.json"
SPECIAL_TOKEN_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG)  # what a run folder copies
MAX_FILE_BYTES = 64 << 20  # a tokenizer_config.json lists every added token: a few MB at most


@dataclass(frozen=True)
class SpecialTokens:
    """A tokenizer's special tokens (see the module docstring).

    ``bos`` / ``bos_id``: the BOS token and its id (``None``: there is none); ``add_bos``: whether each text
    (a document, an example, a prompt) starts with it. ``eos`` / ``eos_id``: the tokenizer's EOS, which ends
    a document. ``eos_ids``: the ids generation stops at (any of them; empty: it runs to its length).
    ``files``: ``(name, bytes)`` of the files they were read from, and of a ``generation_config.json``
    holding the ids that ``config.json`` gave: what a run folder keeps, so that it reads them alone.
    """

    bos: str | None = None
    bos_id: int | None = None
    add_bos: bool = False
    eos: str | None = None
    eos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    files: tuple[tuple[str, bytes], ...] = ()

    @property
    def prefix(self) -> list[int]:
        """The ids put before each text: ``[bos_id]`` where BOS is added, else ``[]``."""
        return [self.bos_id] if self.add_bos else []

    def until_eos(self, ids: Sequence[int]) -> list[int]:
        """Generated ``ids`` up to their first EOS (one of ``eos_ids``), which is left out."""
        ids, stop = list(ids), set(self.eos_ids)
        return next((ids[:i] for i, t in enumerate(ids) if t in stop), ids)


NO_SPECIAL_TOKENS = SpecialTokens()


def _read(path: Path) -> tuple[dict, bytes] | None:
    """``(object, bytes)`` of the JSON file ``path``, ``None`` if there is none; unreadable: one line."""
    if not path.is_file():
        return None
    try:
        raw = read_limited(path, MAX_FILE_BYTES, "JSON file")
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise ConfigError(f"{path}: not readable JSON ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj, raw


def _token_string(value: object, key: str, path: Path) -> str | None:
    """A ``*_token`` entry: a string, ``{"content": string}`` (an added token as transformers saves it) or
    ``null``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value or None
    raise ConfigError(f'{path}: {key} must be a string or {{"content": ...}}, got {quote(value)}')


def _ids(value: object, key: str, path: Path, vocab_size: int) -> tuple[int, ...]:
    """An ``*_token_id`` entry (an id, a list of ids or ``null``) as ids below ``vocab_size``."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{path}: {key} must be a token id (an integer >= 0) or a list of them, "
                              f"got {quote(value)}")  # fmt: skip
        if v >= vocab_size:
            raise ConfigError(f"{path}: {key} {v} is beyond the model's {vocab_size} embeddings")
    return tuple(dict.fromkeys(values))  # (in order, once each)


def _post_processor_bos(tokenizer: Any) -> int | None:
    """The one special token ``tokenizer`` (a ``tokenizers.Tokenizer``)'s post-processor puts before a text,
    if it puts exactly one there; else ``None``."""
    with_special = tokenizer.encode("a", add_special_tokens=True)
    lead = 0
    while lead < len(with_special.ids) and with_special.special_tokens_mask[lead]:
        lead += 1
    return with_special.ids[0] if lead == 1 else None


def _id_of(token: str, key: str, path: Path, tokenizer: Any, vocab_size: int) -> int:
    """The id of the special token string ``token`` (``path``'s ``key``), which must be in the vocabulary
    and below the model's ``vocab_size`` embeddings."""
    i = tokenizer.token_to_id(token)
    if i is None:
        raise ConfigError(f"{path}: {key} {quote(token)} is not in the tokenizer's vocabulary")
    if i >= vocab_size:
        raise ConfigError(
            f"{path}: {key} {quote(token)} is id {i}, beyond the model's {vocab_size} embeddings"
        )
    return i


KEYS = ("bos_token", "eos_token")


def _token_strings(folder: Path, files: Mapping[str, dict]) -> dict[str, tuple[str, Path]]:
    """``{key: (string, file)}`` for the BOS and EOS strings the tokenizer's files name: those of
    ``tokenizer_config.json``, overridden by ``special_tokens_map.json``'s where transformers reads it (the
    former has no ``added_tokens_decoder``). ``null`` entries name no token."""
    config = files.get(TOKENIZER_CONFIG, {})
    sources = [(config, folder / TOKENIZER_CONFIG)]
    if SPECIAL_TOKENS_MAP in files and "added_tokens_decoder" not in config:
        sources.append((files[SPECIAL_TOKENS_MAP], folder / SPECIAL_TOKENS_MAP))
    strings = {}
    for values, path in sources:
        for key in KEYS:
            if key in values:
                strings[key] = (_token_string(values[key], key, path), path)
    return {key: value for key, value in strings.items() if value[0] is not None}


def _model_ids(
    folder: Path, files: Mapping[str, dict], vocab_size: int
) -> tuple[dict[str, tuple[int, ...]], bytes]:
    """``({key: ids}, kept)``: the model's BOS and EOS ids, from ``generation_config.json`` where it exists,
    else from a Hugging Face ``config.json`` (as transformers loads its ``GenerationConfig``); ``kept`` is a
    ``generation_config.json`` holding ids that came from ``config.json`` (else empty)."""
    if GENERATION_CONFIG in files:
        values, path = files[GENERATION_CONFIG], folder / GENERATION_CONFIG
    elif is_hf_config(files.get(CONFIG, {})):
        values, path = files[CONFIG], folder / CONFIG
    else:
        return {}, b""
    ids = {key: _ids(values.get(f"{key}_id"), f"{key}_id", path, vocab_size) for key in KEYS}
    named = {f"{key}_id": v[0] if len(v) == 1 else list(v) for key, v in ids.items() if v}
    kept = json.dumps(named, indent=2).encode() + b"\n" if path.name == CONFIG and named else b""
    return ids, kept


def read_special_tokens(
    folder: str | Path, tokenizer: Any, vocab_size: int, model_config: Mapping[str, Any] | None = None
) -> SpecialTokens:
    """The special tokens of the model folder ``folder`` (or a run folder that kept its files), whose
    tokenizer is ``tokenizer`` (a ``tokenizers.Tokenizer``) and whose model has ``vocab_size`` embeddings;
    ``model_config``: the folder's ``config.json`` where the caller has read it already (else read here)."""
    folder = Path(folder)
    names = SPECIAL_TOKEN_FILES if model_config is not None else (*SPECIAL_TOKEN_FILES, CONFIG)
    read = {name: _read(folder / name) for name in names}
    files = {name: found[0] for name, found in read.items() if found is not None}
    if model_config is not None:
        files[CONFIG] = dict(model_config)
    strings = _token_strings(folder, files)
    model_ids, generation = _model_ids(folder, files, vocab_size)

    def token(key: str) -> tuple[str | None, int | None]:
        """The tokenizer's ``key`` (``bos_token`` / ``eos_token``): its string, else the model's first id."""
        if key in strings:
            text, path = strings[key]
            return text, _id_of(text, key, path, tokenizer, vocab_size)
        ids = model_ids.get(key, ())
        return (tokenizer.id_to_token(ids[0]), ids[0]) if ids else (None, None)

    bos, bos_id = token("bos_token")
    eos, eos_id = token("eos_token")
    config_path = folder / TOKENIZER_CONFIG
    flag = files.get(TOKENIZER_CONFIG, {}).get("add_bos_token")
    if flag is None:  # the post-processor's BOS, whichever token it is (one of the tokenizer's, which
        added = _post_processor_bos(tokenizer)  # load_tokenizer has checked against the embeddings)
        add_bos = added is not None
        if add_bos:
            bos, bos_id = tokenizer.id_to_token(added), added
    elif not isinstance(flag, bool):
        raise ConfigError(f"{config_path}: add_bos_token must be true or false, got {quote(flag)}")
    elif flag and bos_id is None:
        raise ConfigError(f"{config_path}: add_bos_token is true but no bos_token is named (here, in "
                          f"{SPECIAL_TOKENS_MAP} or as the model's bos_token_id)")  # fmt: skip
    else:
        add_bos = flag
    eos_ids = model_ids.get("eos_token", ()) or (() if eos_id is None else (eos_id,))
    kept = [(name, found[1]) for name, found in read.items() if found is not None and name != CONFIG]
    if generation:
        kept.append((GENERATION_CONFIG, generation))
    return SpecialTokens(bos, bos_id, add_bos, eos, eos_id, eos_ids, tuple(kept))
