"""Chat and instruction fine-tuning as a task: conversations -> padded (or packed) rows with the answers-only
targets, batches grouped by length, and the answers generated back for evaluation.

- ``chat``: your conversations (``train_file``, optional ``val_file``, else ``val_fraction`` of them held out
  with the seed) in any format :mod:`lora.chat_data` reads. Metric: bits per token (per byte on a byte-level
  base) of the scored tokens.
- ``instruct``: short instructions about words and numbers made here (:func:`instructions`), one right answer
  each, the held-out ones never seen in training. Metric: exact match of the answer and its end-of-turn.

**Rows.** Each conversation is rendered by the chat template and tokenized (:func:`~lora.chat_template.encode_chat`
with ``max_tokens = seq_len + 1``): ``x = ids[:-1]``, ``y = ids[1:]`` with ``y = -100`` where the token is not
scored (the prompt and the template's scaffolding; ``train_on_prompt`` scores them too). No BOS is added: the
ids are the rendered text tokenized without special tokens, as transformers' ``apply_chat_template(tokenize=True)``
gives them, so a template that renders ``bos_token`` itself (Llama 3, Mistral) has it once and one that does not
(ChatML) has none. A conversation cut
before its first answer is dropped and counted. Rows are stored right-padded to ``seq_len`` with their true
``sizes``; a batch is cut to its longest row (:class:`ChatRows`), its padding takes no loss (``y = -100``) and,
the model being causal, changes no real token's logits.

**Length grouping** (:class:`LengthGroupedLoader`): an epoch's order is the seed's permutation, cut into
buckets of ``GROUP`` global batches, each sorted by length and cut into batches; the batches are then shuffled.
Rows of like length share a batch (little padding) while the batches' order stays random; the order is a
function of ``(seed, epoch)`` alone, so a resumed run reads the same batches.

**Packing** (:func:`pack`): conversations laid end to end in rows of at most ``seq_len`` tokens (best fit,
longest first), with ``segment_ids`` numbering them along each row; the model then keeps each one to itself
(a block-diagonal causal mask, positions from each one's start: :func:`~lora.decoder.packed_attention`), so
its loss and gradients are those of the conversations in rows of their own.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lora.chat_data import Conversation, Message, read_chat_file
from lora.chat_template import ChatTemplate, encode_chat
from lora.config import TrainConfig
from lora.data import IGNORE, BatchLoader, Task, TaskData
from lora.errors import DataError
from lora.tokenizer import ByteTokenizer, HFTokenizer

__all__ = [
    "GROUP",
    "PROMPTS",
    "ChatRows",
    "ChatTask",
    "LengthGroupedLoader",
    "answer",
    "chat_samples",
    "exact_match",
    "exact_match_by_kind",
    "generated_answers",
    "instruction_kind",
    "instructions",
    "load_chat_task",
    "pack",
]

GROUP = 16  # global batches per length-sorted bucket
GENERATION_EVAL = 100  # held-out conversations answered by generation at the end of a run


@dataclass
class ChatRows(TaskData):
    """Rows of conversations: ``x`` (N, T) right-padded ids, ``y`` (N, T) targets (``-100`` not scored, padding
    included), ``sizes`` (N,) each row's real tokens, ``segments`` (N, T) the conversation each token belongs to
    when rows are packed (``None``: one conversation a row). A batch is cut to its longest row."""

    sizes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    segments: torch.Tensor | None = None

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        width = max(int(self.sizes[index].max()), 1) if len(index) else 1
        out = {"x": self.x[index, :width].long(), "y": self.y[index, :width].long()}
        if self.segments is not None:
            out["segment_ids"] = self.segments[index, :width].long()
        return out


@dataclass
class ChatTask(Task):
    """A chat task: its :class:`ChatRows`, the template, the held-out conversations (answered by generation at
    the end), and what tokenizing it dropped."""

    template: ChatTemplate | None = None
    val_conversations: list[Conversation] = field(default_factory=list)
    dropped: int = 0
    total: int = 0


class LengthGroupedLoader(BatchLoader):
    """A :class:`BatchLoader` whose training batches hold rows of like length (see the module docstring); an
    evaluation loader is a plain one (its rows in a fixed random order: a partial evaluation is a fair sample)."""

    def _groups(self, epoch: int) -> list[torch.Tensor]:
        """Epoch ``epoch``'s global batches (row indices, ``batch_size x world_size`` each), in order."""
        width = self.batch_size * self.world_size
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.data), generator=g)[: len(self) * width]  # the last partial batch out
        sizes = self.data.sizes
        groups: list[torch.Tensor] = []
        for bucket in order.split(width * GROUP):
            bucket = bucket[torch.argsort(sizes[bucket], descending=True, stable=True)]
            groups += list(bucket.split(width))
        return [groups[i] for i in torch.randperm(len(groups), generator=g).tolist()]

    def batches(
        self, epoch: int = 0, start: int = 0, limit: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        if not self.shuffle:
            yield from super().batches(epoch, start, limit)
            return
        bs = self.batch_size
        for rows in self._groups(epoch)[start:]:
            yield self.data.batch(rows[self.rank * bs : (self.rank + 1) * bs])

    def padding(self, epoch: int = 0) -> tuple[int, int]:
        """``(padding, total)`` tokens of epoch ``epoch``'s batches over every process (each padded to its
        longest row)."""
        pad = total = 0
        bs = self.batch_size
        for rows in self._groups(epoch):
            for shard in rows.split(bs):
                sizes = self.data.sizes[shard]
                total += int(sizes.max()) * len(shard)
                pad += int(sizes.max()) * len(shard) - int(sizes.sum())
        return pad, total


# ---------------------------------------------------------------------------------------------------------
# Conversations -> rows


def _pairs(
    conversations: Sequence[Conversation], template: ChatTemplate, tokenizer: Any, cfg: TrainConfig
) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """Each kept conversation's ``(x, y)`` (``y`` -100 where not scored) and the indices of those kept."""
    pairs, kept = [], []
    for i, conversation in enumerate(conversations):
        tokens = encode_chat(
            conversation, template, tokenizer, cfg.train_on_prompt, max_tokens=cfg.seq_len + 1
        )
        if tokens is None:
            continue
        ids = tokens.ids
        y = [t if s else IGNORE for t, s in zip(ids[1:], tokens.scored[1:], strict=True)]
        pairs.append((ids[:-1], y))
        kept.append(i)
    return pairs, kept


def _rows(
    rows: list[list[tuple[list[int], list[int]]]], seq_len: int, dtype: torch.dtype, packed: bool
) -> ChatRows:
    """Rows of one or more ``(x, y)`` each, right-padded to ``seq_len``."""
    n = len(rows)
    x = torch.zeros(n, seq_len, dtype=dtype)
    y = torch.full((n, seq_len), IGNORE, dtype=torch.int16 if dtype == torch.uint8 else torch.int32)
    sizes = torch.zeros(n, dtype=torch.long)
    segments = torch.zeros(n, seq_len, dtype=torch.int16) if packed else None
    for r, parts in enumerate(rows):
        at = 0
        for k, (px, py) in enumerate(parts):
            x[r, at : at + len(px)] = torch.tensor(px, dtype=dtype)
            y[r, at : at + len(py)] = torch.tensor(py, dtype=y.dtype)
            if segments is not None:
                segments[r, at : at + len(px)] = k
            at += len(px)
        sizes[r] = at
        if segments is not None:  # the padding is a segment of its own
            segments[r, at:] = len(parts)
    return ChatRows(x, y, sizes=sizes, segments=segments)


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Items of ``lengths`` (each <= ``capacity``) in bins of ``capacity``: best fit, longest first (ties in
    index order). Returns each bin's item indices, in the order they were put in."""
    bins: list[list[int]] = []
    room: dict[int, list[int]] = {}  # free space -> the bins with that much
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[i]
        fit = next((r for r in range(size, capacity + 1) if room.get(r)), None)
        if fit is None:
            b = len(bins)
            bins.append([])
            free = capacity
        else:
            b = room[fit].pop(0)
            free = fit
        bins[b].append(i)
        room.setdefault(free - size, []).append(b)
    return bins


def encode_split(
    conversations: Sequence[Conversation], template: ChatTemplate, tokenizer: Any, cfg: TrainConfig,
    packed: bool = False,
) -> tuple[ChatRows, list[int]]:  # fmt: skip
    """A split's rows (one conversation each, or packed) and the indices of the conversations kept."""
    pairs, kept = _pairs(conversations, template, tokenizer, cfg)
    dtype = torch.uint8 if isinstance(tokenizer, ByteTokenizer) else torch.int32
    if packed:
        groups = [[pairs[i] for i in b] for b in pack([len(x) for x, _ in pairs], cfg.seq_len)]
    else:
        groups = [[p] for p in pairs]
    return _rows(groups, cfg.seq_len, dtype, packed), kept


def _shuffled(rows: ChatRows, seed: int) -> ChatRows:
    """The rows in the seed's random order. An evaluation during training reads only the first
    ``eval_batches`` batches, which must be a fair sample of the held-out set: sorted by length (as they once
    were, to save padding) they were its shortest conversations, all of one or two kinds of instruction."""
    order = torch.randperm(len(rows.sizes), generator=torch.Generator().manual_seed(seed))
    segments = None if rows.segments is None else rows.segments[order]
    return ChatRows(rows.x[order], rows.y[order], sizes=rows.sizes[order], segments=segments)


# ---------------------------------------------------------------------------------------------------------
# The built-in instructions

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(low, high)))


# the kinds of instruction and how each is asked
PROMPTS = {"reverse": "Reverse the word '{}'.", "uppercase": "Uppercase '{}'.",
           "larger": "Which is larger, {} or {}?", "last_letter": "What is the last letter of '{}'?"}  # fmt: skip


def _instruction(rng: random.Random) -> tuple[str, str]:
    """One instruction and its answer, of one of four kinds."""
    kind = rng.randrange(4)
    if kind == 0:
        w = _word(rng, 3, 4)
        return PROMPTS["reverse"].format(w), w[::-1]
    if kind == 1:
        w = _word(rng, 3, 5)
        return PROMPTS["uppercase"].format(w), w.upper()
    if kind == 2:
        a, b = rng.sample(range(10, 100), 2)
        return PROMPTS["larger"].format(a, b), str(max(a, b))
    w = _word(rng, 3, 6)
    return PROMPTS["last_letter"].format(w), w[-1]


def instruction_kind(prompt: str) -> str | None:
    """The kind (a key of :data:`PROMPTS`) of a built-in instruction, else ``None``."""
    return next((k for k, form in PROMPTS.items() if prompt.startswith(form.split("{}")[0])), None)


def instructions(n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[Conversation]:
    """``n`` one-exchange conversations ``[user: instruction, assistant: answer]`` drawn with ``seed``: reverse a
    word, uppercase a word, the larger of two numbers, a word's last letter; none whose instruction is in
    ``exclude``."""
    rng = random.Random(seed)
    out: list[Conversation] = []
    while len(out) < n:
        prompt, reply = _instruction(rng)
        if prompt not in exclude:
            out.append([Message("user", prompt), Message("assistant", reply)])
    return out


# ---------------------------------------------------------------------------------------------------------
# The task


def _split_conversations(cfg: TrainConfig) -> tuple[list[Conversation], list[Conversation], str]:
    """(train, val, description) of the task's conversations."""
    if cfg.task == "instruct":
        n_val = max(50, cfg.num_examples // 10)
        val = instructions(n_val, cfg.seed + 1_000_003)
        seen = {c[0].content for c in val}
        train = instructions(
            cfg.num_examples, cfg.seed, exclude=seen
        )  # held-out instructions never trained on
        return train, val, "built-in instructions: reverse, uppercase, larger number, last letter"
    train = read_chat_file(cfg.train_file).conversations
    if cfg.val_file:
        val = read_chat_file(cfg.val_file).conversations
    else:
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        n_val = max(1, round(len(train) * cfg.val_fraction))
        if n_val >= len(train):
            raise DataError(f"{cfg.train_file}: {len(train)} conversation(s), too few to hold out "
                            f"val_fraction {cfg.val_fraction} and train on the rest; pass --val_file")  # fmt: skip
        val = [train[i] for i in order[:n_val]]
        train = [train[i] for i in order[n_val:]]
    return train, val, f"your conversations: {cfg.train_file}"


def load_chat_task(
    cfg: TrainConfig, tokenizer: ByteTokenizer | HFTokenizer, template: ChatTemplate
) -> ChatTask:
    """The chat or instruct task of ``cfg``, rendered by ``template`` and tokenized by ``tokenizer``. Every
    conversation of a split cut before its first answer: :class:`DataError`."""
    train, val, description = _split_conversations(cfg)
    train_rows, kept = encode_split(train, template, tokenizer, cfg, cfg.packing)
    val_rows, val_kept = encode_split(val, template, tokenizer, cfg)
    for split, rows, convs in (("training", kept, train), ("validation", val_kept, val)):
        if not rows:
            raise DataError(f"every {split} conversation ({len(convs)}) is longer than seq_len {cfg.seq_len} "
                            f"before its first answer; raise --seq_len")  # fmt: skip
    byte = isinstance(tokenizer, ByteTokenizer)
    instruct = cfg.task == "instruct"
    metric = "exact_match" if instruct else ("bits_per_byte" if byte else "bits_per_token")
    task = ChatTask(cfg.task, train_rows, _shuffled(val_rows, cfg.seed), metric, instruct, description=description,
                    template=template, val_conversations=[val[i] for i in val_kept],
                    dropped=len(train) - len(kept), total=len(train))  # fmt: skip
    accum = cfg.batch_size * cfg.grad_accum_steps
    if len(task.train) < accum:
        raise DataError(f"the training data of task {cfg.task} has {len(task.train)} rows, fewer than one batch "
                        f"(batch_size {cfg.batch_size} x grad_accum_steps {cfg.grad_accum_steps})")  # fmt: skip
    return task


# ---------------------------------------------------------------------------------------------------------
# Answers by generation


@torch.no_grad()
def answer(model: Any, conversation: Conversation, template: ChatTemplate, tokenizer: ByteTokenizer | HFTokenizer,
           max_new_tokens: int, device: torch.device) -> tuple[str, bool]:  # fmt: skip
    """The model's greedy answer to ``conversation`` less its last (assistant) turn, with the key/value cache:
    ``(text, stopped)``, the text cut at the template's end-of-turn, ``stopped`` whether it got there. The
    end-of-turn may be several tokens (``<|end|>`` is 7 bytes): the generated text is cut at its first one."""
    prompt = tokenizer.encode(template.render(conversation[:-1], add_generation_prompt=True))
    prompt = prompt[-(model.max_seq_len - 1) :]
    new = max(1, min(max_new_tokens, model.max_seq_len - len(prompt)))
    stop = template.end_of_turn
    single = tokenizer.encode(stop) if stop else []
    eos = list(tokenizer.special_tokens.eos_ids) + (single if len(single) == 1 else [])
    out = model.generate(
        torch.tensor([prompt], device=device), new, temperature=0.0, eos_token_id=eos or None
    )
    generated = out[0, len(prompt) :].tolist()
    text = tokenizer.decode(generated)
    at = text.find(stop) if stop else -1
    if at >= 0:
        return text[:at], True
    # stopped at an EOS the text does not show
    return text, len(tokenizer.special_tokens.until_eos(generated)) < len(generated)


def _budget(task: ChatTask, tokenizer: ByteTokenizer | HFTokenizer) -> int:
    """New tokens enough for the longest held-out answer and its end-of-turn, and a few more."""
    longest = max((len(tokenizer.encode(c[-1].content)) for c in task.val_conversations), default=16)
    return longest + len(tokenizer.encode(task.template.end_of_turn)) + 8


def generated_answers(model: Any, task: ChatTask, tokenizer: ByteTokenizer | HFTokenizer, device: torch.device,
                      limit: int = GENERATION_EVAL) -> list[tuple[str, bool]]:  # fmt: skip
    """The greedy answers (:func:`answer`) to the first ``limit`` held-out conversations."""
    budget = _budget(task, tokenizer)
    return [
        answer(model, c, task.template, tokenizer, budget, device) for c in task.val_conversations[:limit]
    ]


def _right(answer: tuple[str, bool], conversation: Conversation) -> bool:
    """Whether a generated ``(text, stopped)`` is the conversation's last answer (whitespace at the ends aside)
    and stopped at the end-of-turn."""
    text, stopped = answer
    return stopped and text.strip() == conversation[-1].content.strip()


def exact_match(answers: Sequence[tuple[str, bool]], task: ChatTask) -> float:
    """The share of ``answers`` that are right (:func:`_right`)."""
    right = sum(_right(a, c) for a, c in zip(answers, task.val_conversations, strict=False))
    return right / max(len(answers), 1)


def exact_match_by_kind(answers: Sequence[tuple[str, bool]], task: ChatTask) -> dict[str, float]:
    """:func:`exact_match` of the built-in instructions' answers, kind by kind (the kinds asked, in
    :data:`PROMPTS`' order); empty for conversations that are not built-in instructions."""
    tally: dict[str, list[bool]] = {}
    for a, c in zip(answers, task.val_conversations, strict=False):
        kind = instruction_kind(c[0].content) if task.name == "instruct" else None
        if kind is not None:
            tally.setdefault(kind, []).append(_right(a, c))
    return {k: sum(tally[k]) / len(tally[k]) for k in PROMPTS if k in tally}


def chat_samples(base: Sequence[tuple[str, bool]], adapted: Sequence[tuple[str, bool]], task: ChatTask,
                 count: int = 12) -> str:  # fmt: skip
    """samples.txt of a chat task: the first ``count`` held-out prompts, each with the expected answer, the
    frozen base's and the adapted model's (:func:`generated_answers`)."""
    lines = [f"# {task.description}", f"# chat template: {task.template.source}",
             "# held-out prompts answered greedily by the frozen base and by base + adapter", ""]  # fmt: skip
    for c, (b, b_stop), (a, a_stop) in list(zip(task.val_conversations, base, adapted, strict=False))[:count]:
        prompt = " / ".join(f"{m.role}: {m.content}" for m in c[:-1])
        lines += [f"=== {prompt}", f"--- expected: {c[-1].content}",
                  f"--- base: {b!r}" + ("" if b_stop else "  (no end-of-turn)"),
                  f"--- adapted: {a!r}" + ("" if a_stop else "  (no end-of-turn)"), ""]  # fmt: skip
    return "\n".join(lines) + "\n"
