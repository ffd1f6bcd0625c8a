"""The chat and instruct tasks: answers-only targets counted by hand (bytes) and against transformers' assistant
mask (a tiny Llama-family folder with a ChatML template), batches padded to their longest row and grouped by
length, the dropped-conversations line, packing equal to rows of their own (loss and gradients), the instruct
task through the command line, the refusals, and an exact resume."""

import json
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import tokenizers
import torch
from conftest import assert_close_scaled, make_llama_folder
from safetensors.torch import load_file

from lora.chat_data import Message
from lora.chat_task import (
    ChatRows,
    LengthGroupedLoader,
    encode_split,
    exact_match_by_kind,
    instruction_kind,
    instructions,
    load_chat_task,
    pack,
)
from lora.chat_template import load_chat_template
from lora.config import TrainConfig
from lora.data import IGNORE
from lora.lora_transformer import LoRATransformer
from lora.tokenizer import ByteTokenizer, HFTokenizer
from lora.train_lora import main
from lora.trainer import batch_loss

pytestmark = pytest.mark.usefixtures("one_thread")

CHATML = (
    "{%- for message in messages %}\n"
    "    {%- if message['role'] == 'assistant' %}\n"
    "        {{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{- '\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{% endif %}\n"
)
TWO_TURNS = [Message("user", "Who jumps?"), Message("assistant", "The quick brown fox."),
             Message("user", "Over what?"), Message("assistant", "The lazy dog.")]  # fmt: skip


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"task": "instruct", "seq_len": 96, **kw})


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    """A random byte-level base long enough for a conversation in the built-in template (max_seq_len 96)."""
    folder = tmp_path_factory.mktemp("chatbase") / "base"
    torch.manual_seed(0)
    LoRATransformer(256, d_model=32, num_heads=2, num_layers=1, max_seq_len=96, lora_r=0).save_pretrained(
        folder
    )
    return folder


def write_chat(path, conversations):
    path.write_text("".join(json.dumps({"messages": [m.as_dict() for m in c]}) + "\n" for c in conversations))
    return path


def qa(i: int, long: bool = False) -> list[Message]:
    question = f"Question {i}: " + ("why " * 30 if long else "what?")
    return [Message("user", question), Message("assistant", f"Answer {i}.")]


# ---------------------------------------------------------------------------------------------------------
# targets


def test_targets_on_bytes_are_the_answers_and_their_end_counted_by_hand():
    template = load_chat_template(None)
    two = [Message("user", "a"), Message("assistant", "bc"), Message("user", "d"), Message("assistant", "e")]
    rows, kept = encode_split([two], template, ByteTokenizer(), cfg())
    text = "<|user|>\na<|end|>\n<|assistant|>\nbc<|end|>\n<|user|>\nd<|end|>\n<|assistant|>\ne<|end|>\n"
    assert kept == [0] and int(rows.sizes[0]) == len(text) - 1
    assert bytes(rows.x[0, : len(text) - 1].tolist()).decode() == text[:-1]
    y = rows.y[0]
    scored = bytes(y[y != IGNORE].tolist()).decode()
    assert scored == "bc<|end|>" + "e<|end|>"  # 9 + 8 scored bytes: the answers and their end-of-turn
    assert (y != IGNORE).sum() == 17 and (y[len(text) - 1 :] == IGNORE).all()  # the padding takes no loss
    everything, _ = encode_split([two], template, ByteTokenizer(), cfg(train_on_prompt=True))
    assert (everything.y[0] != IGNORE).sum() == len(text) - 1  # every token but the first (never predicted)


def test_targets_on_a_chatml_folder_are_transformers_assistant_mask(tmp_path):
    import transformers

    folder = make_llama_folder(tmp_path / "base", "qwen2", vocab_size=302)
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHATML,
        "eos_token": "<|im_end|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    out = hf.apply_chat_template([m.as_dict() for m in TWO_TURNS], tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)  # fmt: skip
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    ours = HFTokenizer(tok, folder / "tokenizer.json")
    rows, _ = encode_split([TWO_TURNS], load_chat_template(folder), ours, cfg(task="chat", seq_len=128))
    n = int(rows.sizes[0])
    assert rows.x[0, :n].tolist() == ids[:-1] and n == len(ids) - 1  # token for token, no BOS added
    assert [int(t) != IGNORE for t in rows.y[0, :n]] == [bool(m) for m in mask[1:]]
    end = hf.convert_tokens_to_ids("<|im_end|>")
    assert sum(mask) == len(hf.encode("The quick brown fox.")) + len(hf.encode("The lazy dog.")) + 2
    assert [int(t) for t in rows.y[0, :n] if t == end] == [end, end]  # both turns' end scored


# ---------------------------------------------------------------------------------------------------------
# batches


def rows_of(sizes):
    n, width = len(sizes), max(sizes)
    x = torch.zeros(n, width, dtype=torch.uint8)
    y = torch.full((n, width), IGNORE, dtype=torch.int16)
    for i, s in enumerate(sizes):
        x[i, :s], y[i, :s] = i % 200 + 1, 7
    return ChatRows(x, y, sizes=torch.tensor(sizes))


def test_batches_are_padded_to_their_longest_row_and_grouped_by_length():
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, 60, (300,), generator=g).tolist()
    data = rows_of(sizes)
    loader = LengthGroupedLoader(data, 4, seed=3)
    batches = list(loader.batches(epoch=1))
    assert len(batches) == len(loader) == 75
    for b in batches:
        real = (b["y"] != IGNORE).sum(dim=1)
        assert b["x"].shape[1] == int(real.max())  # cut to the batch's longest row, not seq_len
    firsts = torch.cat([b["x"][:, 0] for b in batches]).tolist()
    assert sorted(firsts) == sorted(x % 200 + 1 for x in range(300))  # every row once an epoch
    again = list(LengthGroupedLoader(data, 4, seed=3).batches(epoch=1, start=10))
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(again, batches[10:], strict=True))  # resumable
    other = [b["x"].shape for b in LengthGroupedLoader(data, 4, seed=3).batches(epoch=2)]
    assert other != [b["x"].shape for b in batches]  # another epoch, another order
    pad, total = loader.padding(epoch=1)
    assert total == sum(b["x"].numel() for b in batches) and pad == total - sum(sizes)
    random_pad = sum(max(sizes[i] for i in idx) * 4 - sum(sizes[i] for i in idx)
                     for idx in torch.randperm(300, generator=g).view(75, 4).tolist())  # fmt: skip
    assert pad < random_pad / 4  # grouping by length cuts the padding


def test_pack_is_best_fit_longest_first():
    # 8 | 6 | 5 | 3 into 5's bin (free 3, the best fit) | 2 into 6's (free 2) | 1: no room left, a new bin
    assert pack([5, 3, 8, 2, 6, 1], 8) == [[2], [4, 3], [0, 1], [5]]


# ---------------------------------------------------------------------------------------------------------
# packing


def rotary_model(tmp_path):
    folder = make_llama_folder(tmp_path / "llama", "llama", max_position_embeddings=256)
    return LoRATransformer.from_pretrained(folder, lora_r=4, lora_targets=("q", "k", "v", "o"))


def learned_model(tmp_path):
    torch.manual_seed(0)
    return LoRATransformer(256, d_model=32, num_heads=2, num_layers=2, max_seq_len=128, lora_r=4, dropout=0.0,
                           lora_targets=("q", "v"))  # fmt: skip


@pytest.mark.parametrize("make", [rotary_model, learned_model], ids=["rotary", "learned positions"])
@pytest.mark.parametrize("chunked", [False, True], ids=["logits", "chunked loss"])
def test_packed_rows_give_the_loss_and_gradients_of_rows_of_their_own(tmp_path, make, chunked):
    model = make(tmp_path)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: gradients reach A and B
            p.data.normal_(0, 0.1)
    vocab = model.config.vocab_size
    conversations = [[Message("user", "u" * k), Message("assistant", "a" * (k + 2))] for k in (3, 9, 5, 2)]
    template = load_chat_template(None)
    encode = lambda text: [ord(c) % vocab for c in text]  # noqa: E731 - a plain text -> ids function
    config = cfg(task="chat", seq_len=128)
    alone, _ = encode_split(conversations, template, encode, config)
    packed, _ = encode_split(conversations, template, encode, config, packed=True)
    assert len(alone) == 4 and len(packed) < 4  # several conversations share a row
    assert int(packed.sizes.sum()) == int(alone.sizes.sum())

    def loss_and_grads(rows):
        model.zero_grad()
        batch = rows.batch(torch.arange(len(rows)))
        total, n, _ = batch_loss(model, batch, torch.device("cpu"), chunked=chunked)
        total.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        return total.detach(), int(n), grads

    want, n, want_grads = loss_and_grads(alone)
    got, m, got_grads = loss_and_grads(packed)
    assert m == n > 0
    assert_close_scaled(got, want, 1e-5)
    for k in want_grads:
        assert_close_scaled(got_grads[k], want_grads[k], 1e-5, msg=k)
    assert any(g.abs().max() > 0 for g in want_grads.values())
    # without the segment ids the same rows would attend across conversations: another loss
    leaky = packed.batch(torch.arange(len(packed)))
    del leaky["segment_ids"]
    assert abs(batch_loss(model, leaky, torch.device("cpu"))[0].item() - want.item()) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# the command line


def run_flags(tmp_path, base, *more):
    return ["--base_checkpoint", str(base), "--output_dir", str(tmp_path / "runs"), "--device", "cpu",
            "--batch_size", "8", "--max_steps", "6", "--eval_every", "3", "--eval_batches", "2", *more]  # fmt: skip


def test_instruct_trains_through_the_command_line(tmp_path, chat_base, capsys):
    flags = run_flags(tmp_path, chat_base, "--task", "instruct", "--num_examples", "64", "--seq_len", "80",
                      "--run_name", "ins", "--lora_targets", "q,k,v,o")  # fmt: skip
    assert main(flags) == 0
    err = capsys.readouterr().err
    assert "padding: " in err and "% of the tokens; chat template: built-in" in err
    folder = tmp_path / "runs" / "ins"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["metric_name"] == "exact_match" and metrics["chat_template"] == "built-in"
    assert 0 <= metrics["padding_percent"] < 50 and metrics["steps"] == 6
    assert 0 <= metrics["generated_exact_match"] <= 1 and "base_generated_exact_match" in metrics
    kinds = metrics["generated_exact_match_by_kind"]  # the same answers, kind by kind
    assert set(kinds) == {"reverse", "uppercase", "larger", "last_letter"} and "  by kind: reverse " in err
    assert all(0 <= v <= 1 for v in kinds.values())
    assert (folder / "chat_template.jinja").read_text() == load_chat_template(None).text
    samples = (folder / "samples.txt").read_text()
    assert "--- expected: " in samples and "--- base: " in samples and "--- adapted: " in samples


def test_instructions_are_held_out_and_answerable():
    val = instructions(50, 1)
    train = instructions(500, 0, exclude={c[0].content for c in val})
    assert not {c[0].content for c in train} & {c[0].content for c in val}
    assert instructions(5, 0) == train[:5]  # the seed decides
    answers = {c[0].content: c[1].content for c in train}
    assert all(len(a) >= 1 for a in answers.values())
    assert answers.get("Reverse the word 'cat'.", "tac") == "tac"


def test_exact_match_by_kind_counted_by_hand():
    convs = [[Message("user", "Reverse the word 'cat'."), Message("assistant", "tac")],
             [Message("user", "Uppercase 'dog'."), Message("assistant", "DOG")],
             [Message("user", "Uppercase 'ox'."), Message("assistant", "OX")],
             [Message("user", "Which is larger, 12 or 40?"), Message("assistant", "40")]]  # fmt: skip
    task = SimpleNamespace(name="instruct", val_conversations=convs)
    answers = [("tac", True), ("DOG", True), ("OX", False), ("41", True)]  # OX right but never stopped
    assert exact_match_by_kind(answers, task) == {"reverse": 1.0, "uppercase": 0.5, "larger": 0.0}
    assert [instruction_kind(c[0].content) for c in instructions(40, 0)].count(None) == 0
    assert instruction_kind("Tell me a joke.") is None
    assert exact_match_by_kind(answers, SimpleNamespace(name="chat", val_conversations=convs)) == {}


def test_a_partial_evaluation_reads_a_fair_sample_of_the_held_out_set():
    """The held-out rows are in the seed's random order, not shortest first: the first eval_batches batches,
    all an evaluation during training reads, hold every kind of instruction, in about their shares."""
    task = load_chat_task(cfg(num_examples=2000, batch_size=16), ByteTokenizer(), load_chat_template(None))
    first = task.val.x[:32]  # the first 2 batches of 16
    prompts = [bytes(row.tolist()).decode("utf-8", "replace") for row in first]
    kinds = {k: sum(k in p for p in prompts) for k in ("Reverse", "Uppercase", "larger", "last letter")}
    assert all(n >= 3 for n in kinds.values()), kinds  # 8 of each expected
    sizes = task.val.sizes.tolist()
    assert sizes != sorted(sizes) and sorted(sizes) != sizes[::-1]


def test_chat_file_packed_run_reports_dropped_conversations(tmp_path, chat_base, capsys):
    data = write_chat(tmp_path / "chat.jsonl", [qa(i, long=i % 5 == 0) for i in range(40)])
    flags = run_flags(tmp_path, chat_base, "--task", "chat", "--train_file", str(data), "--seq_len", "64",
                      "--packing", "--val_fraction", "0.25")  # fmt: skip
    assert main(flags) == 0
    err = capsys.readouterr().err
    # 8 long ones, of which those in the 30 training conversations are dropped
    lines = [line for line in err.splitlines() if line.startswith("dropped ")]
    assert len(lines) == 1 and lines[0].endswith(
        "of 30 conversations longer than seq_len 64 before their first answer"
    )
    dropped = int(lines[0].split()[1])
    assert 1 <= dropped <= 8
    metrics = json.loads(next((tmp_path / "runs").glob("chat-*/metrics.json")).read_text())
    assert metrics["dropped_conversations"] == dropped and metrics["packing"] is True
    assert metrics["metric_name"] == "bits_per_byte"


def no_runs(tmp_path):
    return not (tmp_path / "runs").exists() or not [
        p for p in (tmp_path / "runs").iterdir() if p.name != "bases"
    ]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--task", "rot13", "--chat_template", "t.jinja"], "chat_template has no effect on task rot13"),
        (["--task", "text", "--train_file", "x.txt", "--packing"], "packing has no effect on task text"),
        (
            ["--task", "jsonl", "--train_file", "x.jsonl", "--train_on_prompt"],
            "train_on_prompt has no effect",
        ),
        (
            ["--task", "instruct", "--chat_template", "missing.jinja"],
            "chat template not found: missing.jinja",
        ),
        (["--task", "instruct", "--chat_template", "BAD"], "failed to render: TemplateError: no"),
        (["--task", "chat", "--train_file", "BADROW"], "line 2: not a chat row"),
        (
            ["--task", "chat", "--train_file", "LONG"],
            "every training conversation (3) is longer than seq_len",
        ),
    ],
)
def test_bad_chat_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, chat_base, capsys, extra, needle):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ raise_exception('no') }}")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    long = write_chat(tmp_path / "long.jsonl", [qa(i, long=True) for i in range(4)])
    swap = {"BAD": str(bad), "BADROW": str(rows), "LONG": str(long)}
    extra = [swap.get(e, e) for e in extra]
    flags = run_flags(tmp_path, chat_base, *extra, *([] if "rot13" in extra else ["--seq_len", "40"]))
    assert main(flags) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: ") and needle in lines[-1], err
    assert sum("error" in line for line in lines) == 1
    assert no_runs(tmp_path)


HARNESS = r"""
import os, signal, sys
import lora.train_lora as tl
die = os.environ.get("TEST_DIE_WRITING")
if die:
    fsync = os.fsync
    def _fsync(fd):
        if f"checkpoint-{int(die):07d}" in os.readlink(f"/proc/self/fd/{fd}"):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        fsync(fd)
    os.fsync = _fsync
sys.exit(tl.main(sys.argv[1:]))
"""


def start(argv, log, **env):
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), **env}
    return subprocess.Popen([sys.executable, "-c", HARNESS, *argv], cwd=root, env=environ,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))  # fmt: skip


def test_a_killed_chat_run_resumes_exactly(tmp_path, chat_base):
    data = write_chat(tmp_path / "chat.jsonl", [qa(i) for i in range(60)])
    common = ["--task", "chat", "--train_file", str(data), "--seq_len", "64", "--epochs", "3", "--max_steps",
              "12", "--save_every", "1", "--lora_dropout", "0.1"]  # fmt: skip
    log = tmp_path / "log"
    ref = start([*run_flags(tmp_path, chat_base, *common), "--run_name", "ref"], log)
    assert ref.wait(timeout=300) == 0, log.read_text()[-2000:]
    killed = start([*run_flags(tmp_path, chat_base, *common), "--run_name", "k"], log, TEST_DIE_WRITING="7")
    assert killed.wait(timeout=300) == -signal.SIGKILL, log.read_text()[-2000:]
    folder = tmp_path / "runs" / "k"
    assert not (folder / "metrics.json").exists()
    again = start(["--resume", str(folder), "--device", "cpu"], log)
    assert again.wait(timeout=300) == 0, log.read_text()[-2000:]
    got, want = (load_file(str(f / "adapter_model.safetensors")) for f in (folder, tmp_path / "runs" / "ref"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    h, r = (json.loads((f / "history.json").read_text()) for f in (folder, tmp_path / "runs" / "ref"))
    assert h["train_loss"] == r["train_loss"] and h["val_loss"] == r["val_loss"] and len(r["step"]) == 12
