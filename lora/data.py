"""Built-in tasks and user data, all local: nothing is downloaded.

The built-in bases are byte-level (vocabulary 256: token id = byte value), so one base architecture
serves every task. On an imported base (a GPT-2 or Llama-family folder) the text tasks are tokenized with
the folder's own tokenizer (:mod:`lora.tokenizer`) and language modelling is scored in bits per token.
Documents are separated by the tokenizer's EOS token written in the text (GPT-2's ``<|endoftext|>``,
Llama's ``</s>``, ...), and each document, and each JSONL example, starts with its BOS where the
tokenizer adds one (Llama, Mistral, Gemma; not GPT-2 or Qwen), exactly once.

- ``rot13`` / ``atbash``: letter ciphers of random 8-letter words, read and written letter by letter
  (``h u e r l y l y o b ...``: each plain letter is followed by its cipher). Their base is pretrained on
  the Caesar cipher (each letter + 1), so the frozen base scores ~0% exact match and LoRA must adapt it.
- ``code``: language modelling of Python source (the standard library's own ``*.py`` files); its base is
  pretrained on English prose (the standard library's ``pydoc_data`` documentation text).
- ``text``: your UTF-8 text file (``train_file``), on the English base.
- ``jsonl``: classification of ``{"text": ..., "label": ...}`` lines, on the English base.
"""

from __future__ import annotations

import json
import math
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lora.config import CIPHER_WIDTH, TASKS, TrainConfig
from lora.errors import DataError, quote
from lora.files import MAX_DATA_BYTES, check_regular_file, data_file_errors, read_text_file
from lora.special_tokens import SpecialTokens
from lora.tokenizer import ByteTokenizer, Tokenizer

__all__ = [
    "IGNORE",
    "VOCAB_SIZE",
    "BatchLoader",
    "Task",
    "TaskData",
    "base_task_of",
    "cipher_prompt",
    "is_cipher_prompt",
    "load_task",
]

VOCAB_SIZE = 256
N_LETTERS = (CIPHER_WIDTH + 1) // 2  # 8: a word and its cipher, interleaved, less the last letter
IGNORE = -100  # target id that takes no loss (cross-entropy's ignore_index)


@dataclass
class TaskData:
    """Tensors of one split.

    Language modelling: ``x`` (N, T) inputs, ``y`` (N, T) next-token targets with ``-100`` where the loss
    is not taken. Classification: ``x`` (N, T) right-padded inputs, ``lengths`` (N,), ``y`` (N,) labels.
    """

    x: torch.Tensor
    y: torch.Tensor
    lengths: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"x": self.x[index].long(), "y": self.y[index].long()}
        if self.lengths is not None:
            out["lengths"] = self.lengths[index]
        return out


@dataclass
class Task:
    """A task's splits and how it is scored."""

    name: str
    train: TaskData
    val: TaskData
    metric_name: str  # exact_match | bits_per_byte | bits_per_token | accuracy
    higher_is_better: bool
    num_classes: int | None = None
    labels: list | None = None
    description: str = ""

    @property
    def is_classification(self) -> bool:
        return self.num_classes is not None


def base_task_of(task: str) -> str:
    """The task a task's default base is pretrained on."""
    return TASKS[task]


class BatchLoader:
    """Batches of a :class:`TaskData` in an order fixed by ``(seed, epoch)``, so a run can resume mid-epoch.

    Iterating gives epoch 0's batches; :meth:`batches` any epoch's, from any batch on. Training loaders
    shuffle and drop the last partial batch; evaluation loaders keep the order and all rows.

    With ``world_size`` processes (data parallel), a global batch is ``batch_size x world_size`` rows of
    the same order a single process with that batch would take, and process ``rank`` reads its slice:
    rows ``[rank * batch_size, (rank + 1) * batch_size)`` of each global batch. An evaluation loader gives
    process ``rank`` the batches ``rank, rank + world_size, ...``.
    """

    def __init__(self, data: TaskData, batch_size: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.data, self.batch_size, self.shuffle, self.seed = data, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        n = len(self.data)
        if self.shuffle:  # global batches, each one step of every process
            return n // (self.batch_size * self.world_size)
        return len(range(self.rank, math.ceil(n / self.batch_size), self.world_size))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.batches()

    def batches(
        self, epoch: int = 0, start: int = 0, limit: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batch ``start``, ``start + 1``, ... of epoch ``epoch``: ``{"x", "y"[, "lengths"]}``; an evaluation
        loader stops before global batch ``limit``. A global batch is ``batch_size x world_size`` rows, in
        evaluation as in training: ``limit`` global batches are the rows one process with ``world_size`` times
        the batch reads (its first ``limit x batch_size x world_size``), whatever the number of processes."""
        n, bs = len(self.data), self.batch_size
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            width = bs * self.world_size
            for b in range(start, len(self)):
                first = b * width + self.rank * bs
                yield self.data.batch(order[first : first + bs])
            return
        blocks = math.ceil(n / bs)  # of ``bs`` rows each, dealt to the processes in turn
        last = blocks if limit is None else min(limit * self.world_size, blocks)
        for b in range(self.rank + start * self.world_size, last, self.world_size):
            yield self.data.batch(torch.arange(b * bs, min((b + 1) * bs, n)))


# ---------------------------------------------------------------------------------------------------------
# Algorithmic tasks: letter ciphers

CIPHERS = {"caesar": "each letter + 1", "rot13": "each letter + 13", "atbash": "a<->z, b<->y, ..."}


def encipher(kind: str, letters: torch.Tensor) -> torch.Tensor:
    """Letters as 0..25 -> their cipher: ``caesar`` (+1), ``rot13`` (+13) or ``atbash`` (25 - x)."""
    return {"caesar": (letters + 1) % 26, "rot13": (letters + 13) % 26, "atbash": 25 - letters}[kind]


def cipher_text(kind: str, word: str) -> str:
    """``word`` (letters a-z) as the cipher task ``kind`` writes it: each letter followed by its cipher,
    ``cipher_text("rot13", "hello") == "huerlylyob"``."""
    if kind not in CIPHERS:
        raise ValueError(f"no cipher {quote(kind)}: one of {', '.join(CIPHERS)}")
    if not word or any(not "a" <= c <= "z" for c in word):
        raise ValueError(f"a cipher task's text is made of the letters a-z, got {quote(word)}")
    plain = torch.tensor([ord(c) - ord("a") for c in word])
    pairs = zip(plain.tolist(), encipher(kind, plain).tolist(), strict=True)
    return "".join(chr(ord("a") + p) + chr(ord("a") + c) for p, c in pairs)


def cipher_prompt(kind: str, word: str) -> str:
    """What a model of the cipher task ``kind`` reads to write the cipher of ``word``'s last letter: its
    :func:`cipher_text` less that last cipher letter, which is the answer. ``cipher_prompt("rot13", "hello")
    == "huerlylyo"``, answered by ``b``; a training row's input ``x`` is the ``cipher_prompt`` of its 8 plain
    letters. ``word`` itself is no such prompt: ``hello`` reads as the pairs h e, l l and a plain o."""
    return cipher_text(kind, word)[:-1]


def is_cipher_prompt(kind: str, text: str) -> bool:
    """Whether ``text`` is in the format of the cipher task ``kind`` (:func:`cipher_prompt` of its plain
    letters): letters interleaved with their cipher, ending on a plain letter."""
    plain = text[::2]
    return bool(text) and all("a" <= c <= "z" for c in text) and cipher_prompt(kind, plain) == text


def _cipher_task(kind: str, n: int, seed: int) -> TaskData:
    """``n`` words of 8 letters, interleaved with their cipher: ``h i e f l m l m o p ...`` (caesar).

    The sequence is ``p1 c1 p2 c2 ... p8 c8``; x = all but the last byte (n, 15), y = the next bytes with the
    loss taken only on the cipher letters (each predicted while reading its plain letter).
    """
    g = torch.Generator().manual_seed(seed)
    plain = torch.randint(0, 26, (n, N_LETTERS), generator=g)
    seq = torch.stack([plain, encipher(kind, plain)], dim=2).view(n, 2 * N_LETTERS) + ord("a")  # (n, 16)
    y = seq[:, 1:].clone()
    y[:, 1::2] = IGNORE  # the next plain letter is random: not scored
    return TaskData(seq[:, :-1].to(torch.uint8), y.to(torch.int16))


def cipher_task(kind: str, num_examples: int, seed: int) -> Task:
    n_val = max(512, num_examples // 10)
    return Task(
        name=kind,
        train=_cipher_task(kind, num_examples, seed),
        val=_cipher_task(kind, n_val, seed + 1_000_003),
        metric_name="exact_match",
        higher_is_better=True,
        description=f"{kind} cipher of 8-letter words ({CIPHERS[kind]})",
    )


# ---------------------------------------------------------------------------------------------------------
# Language modelling


def token_ids(data: bytes, tokenizer: Tokenizer) -> torch.Tensor:
    """UTF-8 text as a 1-D tensor of ids: the bytes themselves (``uint8``) or the tokenizer's (``int32``),
    each document starting with BOS where the tokenizer adds one (:func:`documents_with_bos`)."""
    if isinstance(tokenizer, ByteTokenizer):
        return (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.zeros(0, dtype=torch.uint8)
        )
    ids = torch.cat([torch.tensor(ids, dtype=torch.int32) for ids in tokenizer.encode_chunks(data.decode("utf-8"))]
                    or [torch.zeros(0, dtype=torch.int32)])  # fmt: skip
    return documents_with_bos(ids, tokenizer.special_tokens)


def documents_with_bos(ids: torch.Tensor, special: SpecialTokens) -> torch.Tensor:
    """The 1-D ``ids`` of a text whose documents the EOS token separates, with BOS put at the start of each
    document where ``special`` adds one (``add_bos``) and the document does not start with it already: the
    ids a tokenizer adding BOS gives each document, joined by EOS. Unchanged where no BOS is added."""
    if not special.add_bos or ids.numel() == 0:
        return ids
    after_eos = (ids[:-1] == special.eos_id).nonzero()[:, 0] + 1 if special.eos_id is not None else []
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.as_tensor(after_eos, dtype=torch.long)])
    starts = starts[ids[starts] != special.bos_id]  # (a document that begins with BOS keeps its one)
    bos = torch.full((len(starts),), special.bos_id, dtype=ids.dtype)
    out = torch.empty(len(ids) + len(starts), dtype=ids.dtype)
    at = starts + torch.arange(len(starts))  # where each BOS lands once the ones before it are in
    keep = torch.ones(len(out), dtype=torch.bool)
    keep[at] = False
    out[at], out[keep] = bos, ids
    return out


def _chunks(ids: torch.Tensor, seq_len: int) -> TaskData:
    """Non-overlapping windows of the 1-D ``ids``: x = ids[i T : (i + 1) T], y = the same shifted by one."""
    n = max(0, (len(ids) - 1) // seq_len)
    target = torch.int16 if ids.dtype == torch.uint8 else torch.int32  # y holds -100 where no loss is taken
    if n == 0:  # too little text for one window: an empty split, reported by the caller with its file
        return TaskData(torch.zeros(0, seq_len, dtype=ids.dtype), torch.zeros(0, seq_len, dtype=target))
    t = ids[: n * seq_len + 1]
    x = t[:-1].reshape(n, seq_len)
    y = t[1:].reshape(n, seq_len).to(target)
    return TaskData(x, y)


def english_text() -> bytes:
    """The standard library's documentation topics (pydoc_data): ~0.5 MB of English prose."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def python_source(limit: int = 1_200_000) -> tuple[bytes, bytes]:
    """(train, val) bytes of the standard library's top-level ``*.py`` files; every 10th file is val."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, val = bytearray(), bytearray()
    for i, f in enumerate(files):
        target = val if i % 10 == 5 else train
        if len(target) < (limit // 10 if target is val else limit):
            target += f.read_bytes() + b"\n"
    return bytes(train), bytes(val)


def _split(data: bytes, fraction: float) -> tuple[bytes, bytes]:
    """The last ``fraction`` of UTF-8 text held out, cut at a character's first byte (never inside one)."""
    cut = int(len(data) * (1 - fraction))
    while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:  # a continuation byte: 10xxxxxx
        cut -= 1
    return data[:cut], data[cut:]


def lm_task(name: str, train: bytes, val: bytes, seq_len: int, description: str,
            tokenizer: Tokenizer | None = None) -> Task:  # fmt: skip
    """Language modelling on ``train`` / ``val`` text, in bits per byte (bytes) or per token (a tokenizer)."""
    tokenizer = tokenizer or ByteTokenizer()
    metric = "bits_per_byte" if isinstance(tokenizer, ByteTokenizer) else "bits_per_token"
    return Task(name, _chunks(token_ids(train, tokenizer), seq_len), _chunks(token_ids(val, tokenizer), seq_len),
                metric, False, description=description)  # fmt: skip


def check_data_files(cfg: TrainConfig) -> None:
    """Refuse a ``train_file`` or ``val_file`` that is missing, a folder, oversized or not a regular file,
    without opening it (:class:`DataError`): what a run checks before anything else is read."""
    for path in (cfg.train_file, cfg.val_file):
        if path:
            data_file_errors(lambda p=path: check_regular_file(p, MAX_DATA_BYTES, "data file"), Path(path))


# ---------------------------------------------------------------------------------------------------------
# Classification


def read_jsonl(path: str | Path) -> list[tuple[str, object]]:
    """``(text, label)`` pairs; every malformed line raises :class:`DataError` with its number."""
    rows: list[tuple[str, object]] = []
    for i, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {i}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(
                f'{path} line {i}: nested too deeply; expected an object with "text" and "label"'
            ) from None
        if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
            raise DataError(f'{path} line {i}: expected an object with "text" and "label"')
        text, label = obj["text"], obj["label"]
        if not isinstance(text, str):
            raise DataError(f'{path} line {i}: "text" must be a string, got {type(text).__name__}')
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise DataError(f'{path} line {i}: "label" must be an integer or a string, got {quote(label)}')
        if rows and type(label) is not type(rows[0][1]):
            raise DataError(
                f"{path} line {i}: label {quote(label)} is not of the same type as the first label"
            )
        rows.append((text, label))
    return rows


def _encode_rows(
    rows: list[tuple[str, object]], labels: list, seq_len: int, tokenizer: Tokenizer
) -> TaskData:
    """Each text's first ``seq_len`` ids, BOS first where the tokenizer adds one, right-padded (an empty
    text reads as one space)."""
    dtype = torch.uint8 if isinstance(tokenizer, ByteTokenizer) else torch.int32
    x = torch.zeros(len(rows), seq_len, dtype=dtype)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    y = torch.tensor([labels.index(label) for _, label in rows], dtype=torch.long)
    for i, (text, _) in enumerate(rows):
        ids = tokenizer.encode(text)[:seq_len] or tokenizer.encode(" ")
        ids = (tokenizer.special_tokens.prefix + ids)[:seq_len]
        x[i, : len(ids)] = torch.tensor(ids, dtype=dtype)
        lengths[i] = len(ids)
    return TaskData(x, y, lengths)


def jsonl_task(cfg: TrainConfig, tokenizer: Tokenizer) -> Task:
    train = read_jsonl(cfg.train_file)
    if cfg.val_file:
        val = read_jsonl(cfg.val_file)
    else:
        random.Random(cfg.seed).shuffle(train)
        n_val = max(1, round(len(train) * cfg.val_fraction))
        train, val = train[n_val:], train[:n_val]
    labels = sorted({label for _, label in train})
    unseen = sorted({label for _, label in val} - set(labels), key=str)
    if unseen:
        raise DataError(f"validation labels {unseen} never occur in the training data")
    if len(labels) < 2:
        raise DataError(f"{cfg.train_file}: classification needs at least 2 distinct labels, found {labels}")

    def encode(rows: list[tuple[str, object]]) -> TaskData:
        return _encode_rows(rows, labels, cfg.seq_len, tokenizer)

    return Task("jsonl", encode(train), encode(val),
                "accuracy", True, num_classes=len(labels), labels=labels,
                description=f"classify {cfg.train_file} into {len(labels)} labels")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------


def load_task(cfg: TrainConfig, name: str | None = None, tokenizer: Tokenizer | None = None) -> Task:
    """Build the task ``name`` (default ``cfg.task``; ``caesar`` and ``english`` are the base tasks), its
    text tokenized with ``tokenizer`` (default: bytes)."""
    name = name or cfg.task
    tokenizer = tokenizer or ByteTokenizer()
    unit = "bytes" if isinstance(tokenizer, ByteTokenizer) else "tokens"
    if name in CIPHERS and not isinstance(tokenizer, ByteTokenizer):
        raise DataError(f"task {name} is byte-level (letter by letter) and needs a byte-level base such as "
                        "--base_checkpoint auto; on a base with its own tokenizer use --task text, jsonl or code")  # fmt: skip
    if name in CIPHERS:
        task = cipher_task(name, cfg.num_examples, cfg.seed)
    elif name == "english":
        train, val = _split(english_text(), 0.05)
        task = lm_task(name, train, val, cfg.seq_len, "English prose: the standard library's pydoc topics",
                       tokenizer)  # fmt: skip
    elif name == "code":
        train, val = python_source()
        task = lm_task(name, train, val, cfg.seq_len, "Python source: the standard library's own *.py files",
                       tokenizer)  # fmt: skip
    elif name == "text":
        train_text = read_text_file(cfg.train_file).encode("utf-8")
        if cfg.val_file:
            val_text = read_text_file(cfg.val_file).encode("utf-8")
        else:
            train_text, val_text = _split(train_text, cfg.val_fraction)
        task = lm_task(name, train_text, val_text, cfg.seq_len, f"your text: {cfg.train_file}", tokenizer)
        for split, data, path in (
            ("training", task.train, cfg.train_file),
            ("validation", task.val, cfg.val_file),
        ):
            if len(data) == 0:
                need = cfg.seq_len + 1
                raise DataError(f"{path or cfg.train_file}: too little {split} text for one sequence of "
                                f"{need} {unit} (seq_len {cfg.seq_len})")  # fmt: skip
    elif name == "jsonl":
        task = jsonl_task(cfg, tokenizer)
    else:
        raise DataError(f"unknown task {quote(name)}")
    accum = f" x grad_accum_steps {cfg.grad_accum_steps}" if cfg.grad_accum_steps > 1 else ""
    if len(task.train) < cfg.batch_size * cfg.grad_accum_steps:  # (one update reads that many)
        raise DataError(
            f"the training data of task {name} has {len(task.train)} sequences, fewer than one batch "
            f"(batch_size {cfg.batch_size}{accum})"
        )
    return task
