"""A GPT-2 folder from disk through the command line: LoRA on your text and JSONL, its tokenizer kept by the
run and used by generate.py, exact resume, and bad folders refused in one line with nothing written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GPT2_TEXT, make_gpt2_folder
from safetensors.torch import load_file, save_file
from test_hostile_input import refused
from test_reliability import adapter_tensors, finish, start

from lora.lora_transformer import LoRATransformer
from lora.tokenizer import load_tokenizer
from lora.train_lora import main
from scripts.generate import main as generate

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["--seq_len", "16", "--batch_size", "8", "--max_steps", "6", "--eval_every", "3", "--eval_batches", "2",
       "--device", "cpu"]  # fmt: skip


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "my.txt"
    path.write_text(GPT2_TEXT)
    return path


def test_lora_on_your_text_from_a_gpt2_folder(gpt2_folder, text, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = [*RUN, "--task", "text", "--train_file", str(text), "--base_checkpoint", str(gpt2_folder),
            "--output_dir", str(runs), "--run_name", "mine"]  # fmt: skip
    assert main(argv) == 0
    folder = runs / "mine"
    tokenizer = load_tokenizer(gpt2_folder, 300)
    kept = load_tokenizer(folder, 300)  # the run keeps the tokenizer it used
    assert kept.tokenizer.to_str() == tokenizer.tokenizer.to_str()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["metric_name"] == "bits_per_token" and metrics["tokenizer"] == "tokenizer.json"
    assert metrics["base_fingerprint"] == LoRATransformer.from_gpt2(gpt2_folder, lora_r=0).base_fingerprint()
    assert json.loads((folder / "adapter_config.json").read_text())["tokenizer"] == "tokenizer.json"

    # samples.txt: what the adapted model samples, decoded with the folder's tokenizer
    model = LoRATransformer.from_gpt2(gpt2_folder, lora_r=0)
    model.load_adapter(folder)
    model.eval()
    ids = tokenizer.encode("The ")
    g = torch.Generator().manual_seed(0)
    out = model.generate(torch.tensor([ids]), 48, temperature=0.8, top_k=40, generator=g)
    samples = (folder / "samples.txt").read_text()
    assert "--- adapted:\n" + tokenizer.decode(out[0].tolist()) + "\n" in samples

    # generate.py reads and writes text with the run's tokenizer
    capsys.readouterr()
    assert generate(["--base", str(gpt2_folder), "--adapter", str(folder), "--prompt", "The quick",
                     "--max_new_tokens", "8", "--temperature", "0", "--no_base"]) == 0  # fmt: skip
    prompt = tokenizer.encode("The quick")
    greedy = model.generate(torch.tensor([prompt]), 8, temperature=0)[0, len(prompt) :].tolist()
    assert capsys.readouterr().out == f"=== adapter {folder} ===\nThe quick{tokenizer.decode(greedy)}\n\n"


def test_jsonl_classification_on_a_gpt2_folder(gpt2_folder, tmp_path):
    data = tmp_path / "reviews.jsonl"
    rows = [{"text": f"the fox is {'quick' if i % 2 else 'lazy'} today", "label": i % 2} for i in range(64)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [*RUN, "--task", "jsonl", "--train_file", str(data), "--base_checkpoint", str(gpt2_folder),
            "--output_dir", str(tmp_path / "runs"), "--run_name", "cls"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "runs" / "cls" / "metrics.json").read_text())
    assert metrics["metric_name"] == "accuracy" and 0 <= metrics["final_metric"] <= 1


def test_killed_run_on_a_gpt2_folder_resumes_exactly(gpt2_folder, text, tmp_path):
    argv = [*RUN, "--task", "text", "--train_file", str(text), "--base_checkpoint", str(gpt2_folder),
            "--output_dir", str(tmp_path / "runs"), "--save_every", "1", "--lora_dropout", "0.1"]  # fmt: skip
    log = tmp_path / "log"
    finish(start([*argv, "--run_name", "ref"], log), log, 0)
    finish(start([*argv, "--run_name", "killed"], log, TEST_DIE_WRITING="4"), log, -9)
    finish(start(["--resume", str(tmp_path / "runs" / "killed")], log), log, 0)
    got, want = (adapter_tensors(tmp_path / "runs" / name) for name in ("killed", "ref"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _edit_config(folder: Path, **change) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def _bigger_tokenizer(folder: Path) -> None:
    make_gpt2_folder(folder.parent / "big", vocab_size=300)
    make_gpt2_folder(folder, vocab_size=280)
    shutil.copy(folder.parent / "big" / "tokenizer.json", folder)


BAD_FOLDERS = {
    "no files": (lambda f: [p.unlink() for p in f.iterdir()], "config.json: file not found"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    "BERT": (lambda f: _edit_config(f, model_type="bert"), "model_type 'bert' is not supported"),
    "Llama": (lambda f: _edit_config(f, model_type="llama"), "missing llama keys ['hidden_size'"),  # (GPT-2's)
    "missing tensor": (lambda f: _edit_tensors(f, lambda t: t.pop("transformer.ln_f.bias")),
                       "missing tensors: ln_f.bias"),
    "unexpected tensor": (lambda f: _edit_tensors(f, lambda t: t.update(stray=torch.zeros(1))),
                          "unexpected tensors: stray"),
    "mis-shaped tensor": (lambda f: _edit_tensors(f, lambda t: t.update({"transformer.h.0.attn.c_attn.weight":
                                                                          torch.zeros(32, 64)})),
                          "wrong shapes: h.0.attn.c_attn.weight (32, 64) (expected (32, 96))"),
    "no tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer beside the model"),
    "bigger tokenizer": (_bigger_tokenizer, "the tokenizer has 300 tokens but the model 280 embeddings"),
    "broken tokenizer": (lambda f: (f / "tokenizer.json").write_text("{"), "not a readable tokenizer"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_bad_gpt2_folder_is_refused_in_one_line_with_nothing_written(
    case, gpt2_folder, text, tmp_path, capsys
):
    folder = tmp_path / "gpt2"
    shutil.copytree(gpt2_folder, folder)
    damage, needle = BAD_FOLDERS[case]
    damage(folder)
    argv = [*RUN, "--task", "text", "--train_file", str(text), "--base_checkpoint", str(folder),
            "--output_dir", str(tmp_path / "runs")]  # fmt: skip
    refused(capsys, argv, needle)
    assert not (tmp_path / "runs").exists()


def test_a_cipher_task_on_a_gpt2_folder_is_refused(gpt2_folder, tmp_path, capsys):
    argv = ["--task", "rot13", "--num_examples", "64", "--base_checkpoint", str(gpt2_folder),
            "--output_dir", str(tmp_path / "runs")]  # fmt: skip
    refused(capsys, argv, "task rot13 is byte-level")
    assert not (tmp_path / "runs").exists()


def test_random_gpt2_writes_a_labelled_folder_that_loads(tmp_path, capsys):
    from scripts.random_gpt2 import main as random_gpt2

    out = tmp_path / "random-gpt2"
    assert random_gpt2(["--size", "tiny", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["weights"].startswith("random")
    model = LoRATransformer.from_gpt2(out, lora_r=0)
    assert (model.config.vocab_size, model.config.max_seq_len, model.config.num_layers) == (50257, 1024, 2)
    tokenizer = load_tokenizer(out, 50257)
    assert tokenizer.decode(tokenizer.encode("def greet(name):")) == "def greet(name):"
    capsys.readouterr()
    assert random_gpt2(["--size", "tiny", "--out", str(out)]) == 2  # never overwrites
    assert "exists already" in capsys.readouterr().err


def test_merging_an_adapter_on_a_gpt2_folder_keeps_its_tokenizer(gpt2_folder, text, tmp_path, capsys):
    from scripts.merge_adapter import main as merge

    runs, out = tmp_path / "runs", tmp_path / "merged"
    argv = [*RUN, "--task", "text", "--train_file", str(text), "--base_checkpoint", str(gpt2_folder),
            "--output_dir", str(runs), "--run_name", "mine", "--max_steps", "2"]  # fmt: skip
    assert main(argv) == 0
    assert merge(["--base", str(gpt2_folder), "--adapter", str(runs / "mine"), "--out", str(out)]) == 0
    assert load_tokenizer(out, 300).tokenizer.to_str() == load_tokenizer(gpt2_folder, 300).tokenizer.to_str()
    capsys.readouterr()
    assert generate(["--base", str(out), "--prompt", "The quick", "--max_new_tokens", "3"]) == 0


def test_a_large_vocabulary_without_a_tokenizer_is_not_read_as_bytes(tmp_path, capsys):
    LoRATransformer(1000, d_model=16, num_heads=2, num_layers=1, max_seq_len=16, lora_r=0).save_pretrained(
        tmp_path / "m"
    )
    assert generate(["--base", str(tmp_path / "m"), "--prompt", "hi"]) == 2
    assert "vocabulary of 1000 is not byte-level" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_gpt2_folder_trains_in_float32(gpt2_folder, text, tmp_path, dtype):
    from transformers import GPT2LMHeadModel

    folder = tmp_path / "half"
    GPT2LMHeadModel.from_pretrained(gpt2_folder).to(dtype).save_pretrained(folder)
    shutil.copy(gpt2_folder / "tokenizer.json", folder)
    argv = [*RUN, "--task", "text", "--train_file", str(text), "--base_checkpoint", str(folder),
            "--output_dir", str(tmp_path / "runs"), "--run_name", "half"]  # fmt: skip
    assert main(argv) == 0
    history = json.loads((tmp_path / "runs" / "half" / "history.json").read_text())
    assert all(loss == loss for loss in history["train_loss"])  # finite: no fp16 AdamW
    assert adapter_tensors(tmp_path / "runs" / "half")["blocks.0.attn.q_proj.lora_A"].dtype == torch.float32
    half = LoRATransformer.from_pretrained(folder, lora_r=0)  # the folder as it is, in half precision
    assert half.wte.weight.dtype == dtype
    half.load_adapter(tmp_path / "runs" / "half")  # the fingerprint is of the values: no --force needed


def test_text_whose_validation_cut_falls_inside_a_character(gpt2_folder, tmp_path):
    line = "Съешь же ещё этих мягких французских булок, да выпей чаю. ".encode()
    n = next(
        n for n in range(40, 80) if (line * n)[int(len(line) * n * 0.9)] & 0xC0 == 0x80
    )  # cut mid-character
    path = tmp_path / "russian.txt"
    path.write_bytes(line * n)
    argv = [*RUN, "--task", "text", "--train_file", str(path), "--base_checkpoint", str(gpt2_folder),
            "--output_dir", str(tmp_path / "runs"), "--run_name", "ru", "--max_steps", "2"]  # fmt: skip
    assert main(argv) == 0


def test_tools_that_read_only_our_adapters_name_a_peft_folder(tmp_path, capsys):
    from scripts.inspect_adapter import main as inspect

    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    assert inspect(["--adapter", str(tmp_path / "peft")]) == 2
    assert "is a Hugging Face PEFT adapter, which this tool does not read" in capsys.readouterr().err
