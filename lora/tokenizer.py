"""Text <-> token ids: bytes for the bases made here, a model folder's own tokenizer for an imported one (any family).

* :class:`ByteTokenizer`: token id = UTF-8 byte value (vocabulary 256), the built-in tasks' tokenizer.
* :class:`HFTokenizer`: a base folder's ``tokenizer.json`` (or GPT-2's ``vocab.json`` + ``merges.txt``),
  read with the ``tokenizers`` library, an optional extra (``pip install -e ".[hf]"``), with the folder's
  special tokens (:mod:`lora.special_tokens`: BOS, whether it starts each text, the EOS ids).

:func:`load_tokenizer` picks the one a base folder calls for; a run folder keeps a copy of the tokenizer it
used (``tokenizer.json``, and the files its special tokens came from: :meth:`HFTokenizer.run_files`), so
generation encodes, stops and decodes with the same one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora.errors import ConfigError, first_line
from lora.gpt2 import is_hf_folder
from lora.special_tokens import NO_SPECIAL_TOKENS, SpecialTokens, read_special_tokens

__all__ = ["TOKENIZER_NAME", "ByteTokenizer", "HFTokenizer", "Tokenizer", "fits_embeddings", "load_tokenizer",
           "tokenizer_files", "train_byte_bpe"]  # fmt: skip

TOKENIZER_NAME = "tokenizer.json"
BPE_FILES = ("vocab.json", "merges.txt")
# the largest vocabulary read as bytes when a model has no tokenizer (the bases made here have 256 ids)
MAX_BYTE_VOCAB = 512
END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token
_BREAK = re.compile(r"\n(?=\S)")  # a newline that a non-space character follows
CHUNK_CHARS = 1 << 20  # characters encoded at a time: the library's per-token objects stay small
VOCAB_PADDING = 64  # a model's vocabulary may be its tokenizer's rounded up to a multiple of this,
VOCAB_RESERVE = 1  # or up to this many percent larger (tokens reserved); a larger gap is another tokenizer


def _pieces(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """``text`` in pieces of about ``size`` characters, each cut after a newline that a non-space
    character follows: byte-level BPE never merges across such a point (the newline is a token of its own
    and the next word starts a new one), so the pieces encode to the whole text's tokens."""
    out, start = [], 0
    while len(text) - start > size:
        found = _BREAK.search(
            text, start + size - 1
        )  # the first such newline ending at start + size or later
        cut = found.end() if found else len(text)
        out.append(text[start:cut])
        start = cut
    return [*out, text[start:]]


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, no special tokens; decoding skips other ids and shows invalid UTF-8 as
    U+FFFD."""

    name = "byte"
    vocab_size = 256
    special_tokens = NO_SPECIAL_TOKENS

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_chunks(self, text: str) -> list[list[int]]:
        return [self.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (GPT-2's byte-level BPE, or whatever ``tokenizer.json`` describes) and its
    folder's ``special_tokens``."""

    name = "tokenizer.json"

    def __init__(
        self, tokenizer: object, source: Path, special_tokens: SpecialTokens = NO_SPECIAL_TOKENS
    ) -> None:
        self.tokenizer, self.source, self.special_tokens = tokenizer, source, special_tokens
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """``text``'s ids; with ``add_bos`` (a document, an example or a prompt), BOS first where the
        tokenizer adds one. The post-processor of ``tokenizer.json`` is not run: BOS comes once, from here."""
        prefix = self.special_tokens.prefix if add_bos else []
        return prefix + self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_chunks(self, text: str) -> list[list[int]]:
        """A long text's ids, a piece at a time (see :func:`_pieces`): the same ids as :meth:`encode`, with
        bounded memory for the library's per-token offsets and strings."""
        return [e.ids for e in self.tokenizer.encode_batch(_pieces(text), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        """The tokenizer as one ``tokenizer.json`` text (what a run folder keeps)."""
        return self.tokenizer.to_str()

    def run_files(self) -> dict[str, bytes]:
        """What a run folder keeps to read text as this run did: ``tokenizer.json`` and the files of its
        special tokens (``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json``)."""
        return {TOKENIZER_NAME: self.to_json().encode("utf-8"), **dict(self.special_tokens.files)}


Tokenizer = ByteTokenizer | HFTokenizer


def tokenizer_files(folder: str | Path) -> list[Path]:
    """The tokenizer files in ``folder``: ``[tokenizer.json]``, ``[vocab.json, merges.txt]`` or ``[]``."""
    folder = Path(folder)
    if (folder / TOKENIZER_NAME).is_file():
        return [folder / TOKENIZER_NAME]
    if all((folder / name).is_file() for name in BPE_FILES):
        return [folder / name for name in BPE_FILES]
    return []


def fits_embeddings(tokens: int, embeddings: int) -> bool:
    """Whether a tokenizer of ``tokens`` ids can be a model's of ``embeddings``: never an id beyond the
    embeddings, and no more embeddings than its vocabulary rounded up to a multiple of :data:`VOCAB_PADDING`
    or :data:`VOCAB_RESERVE` percent reserved for tokens to be added (Qwen2.5's 151,665 tokens have 151,936
    embeddings, Phi-3's 32,011 have 32,064): a larger gap is another model's tokenizer."""
    rounded = -(-tokens // VOCAB_PADDING) * VOCAB_PADDING
    return tokens <= embeddings <= max(rounded, tokens + embeddings * VOCAB_RESERVE // 100)


def _tokenizers_library() -> object:
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            'reading a model folder\'s own tokenizer needs the tokenizers package: pip install -e ".[hf]"'
        ) from None
    return tokenizers


def load_tokenizer(
    folder: str | Path | None,
    vocab_size: int,
    hf_model: bool | None = None,
    files: Sequence[Path] | None = None,
    model_config: Mapping[str, Any] | None = None,
) -> Tokenizer:
    """The tokenizer of a model folder whose model has ``vocab_size`` ids.

    ``folder`` ``None`` or without tokenizer files: bytes (a model of this project's with 256 to
    :data:`MAX_BYTE_VOCAB` ids; a Hugging Face folder, or a larger vocabulary, needs its own tokenizer).
    A tokenizer with more ids than the model has embeddings is refused, or with far fewer
    (:func:`fits_embeddings`), as are special tokens not in its vocabulary or not below the embeddings
    (:func:`~lora.special_tokens.read_special_tokens`, from the files beside the tokenizer). ``hf_model``:
    whether the folder holds a Hugging Face model, and ``files`` its tokenizer files, where the caller knows
    them already (``None``: look at its ``config.json``; :func:`tokenizer_files`), and ``model_config`` its
    ``config.json`` where the caller has read it (``None``: read here).
    """
    if files is None:
        files = [] if folder is None else tokenizer_files(folder)
    if not files:
        if folder is not None and (is_hf_folder(folder) if hf_model is None else hf_model):
            raise ConfigError(f"{folder}: no tokenizer beside the model ({TOKENIZER_NAME}, or "
                              f"{' + '.join(BPE_FILES)}); a GPT-2 checkpoint needs its own")  # fmt: skip
        if not ByteTokenizer.vocab_size <= vocab_size <= MAX_BYTE_VOCAB:
            raise ConfigError(f"{folder}: no tokenizer beside the model, and its vocabulary of {vocab_size} is "
                              f"not byte-level (256 to {MAX_BYTE_VOCAB} ids): put its {TOKENIZER_NAME} beside it")  # fmt: skip
        return ByteTokenizer()
    lib = _tokenizers_library()
    try:
        if files[0].name == TOKENIZER_NAME:
            tok = lib.Tokenizer.from_file(str(files[0]))
        else:  # GPT-2's original pair: byte-level BPE
            tok = lib.Tokenizer(lib.models.BPE.from_file(*(str(f) for f in files)))
            tok.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = lib.decoders.ByteLevel()
            if tok.token_to_id(END_OF_TEXT) is not None:  # one token, never split as text
                tok.add_special_tokens([END_OF_TEXT])
    except Exception as e:  # the library's own errors: not JSON, not a tokenizer, bad merges
        raise ConfigError(f"{files[0]}: not a readable tokenizer ({first_line(e)})") from None
    tokenizer = HFTokenizer(tok, files[0])
    n = tokenizer.vocab_size
    if not fits_embeddings(n, vocab_size):
        raise ConfigError(f"{files[0]}: the tokenizer has {n} tokens but the model {vocab_size} embeddings: "
                          f"it is not this model's tokenizer")  # fmt: skip
    tokenizer.special_tokens = read_special_tokens(files[0].parent, tok, vocab_size, model_config)
    return tokenizer


def train_byte_bpe(texts: Sequence[str], vocab_size: int) -> object:
    """A GPT-2-style byte-level BPE (``tokenizers.Tokenizer``) trained on ``texts``, ``<|endoftext|>`` its
    last id, padded with ``<|reserved_i|>`` tokens to exactly ``vocab_size`` ids when the text has fewer
    merges to learn: for models made here (tests, ``scripts/random_gpt2.py``), never downloaded."""
    lib = _tokenizers_library()
    tok = lib.Tokenizer(lib.models.BPE())
    tok.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = lib.decoders.ByteLevel()
    trainer = lib.trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                      initial_alphabet=lib.pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(list(texts), trainer)
    spare = vocab_size - 1 - tok.get_vocab_size()
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(spare)] + [END_OF_TEXT])
    return tok
