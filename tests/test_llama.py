"""Llama-layout folders (Llama, Mistral): the same logits and greedy tokens as transformers' own models,
LoRA on every projection exact, a run through the command line, and what is not supported refused by name."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    GPT2_TEXT,
    assert_close_scaled,
    copy_with_config,
    make_llama_folder,
    unmerged_and_merged,
)

from lora.lora_transformer import LoRATransformer
from lora.train_lora import main

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return make_llama_folder(tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.mark.parametrize(
    ("kind", "config"),
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("mistral", {"sliding_window": 48}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("qwen3", {"head_dim": 24}),
        ("gemma", {"head_dim": 24}),
        ("phi3", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),  # (its defaults exceed 300 ids)
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
            },
        ),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ],
    ids=[
        "llama",
        "llama-tied",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "phi3",
        "llama3-scaling",
        "linear-scaling",
    ],
)
def test_logits_and_greedy_tokens_equal_transformers(kind, config, tmp_path):
    folder = make_llama_folder(tmp_path / kind, kind, **config)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = LoRATransformer.from_pretrained(folder, lora_r=0).eval()
    norm = "rmsnorm_plus_one" if kind == "gemma" else "rmsnorm"
    assert (ours.config.norm, ours.config.mlp, ours.config.positions) == (norm, "gated", "rotary")
    tied = bool(config.get("tie_word_embeddings", kind == "gemma"))  # (Gemma ties by default)
    assert (ours.config.num_kv_heads, ours.config.tied_head) == (2, tied)
    assert ours.config.max_seq_len == config.get("sliding_window", 64)  # no sequence exceeds Mistral's window
    assert ours.config.qkv_bias == (kind == "qwen2") and ours.blocks[0].attn.o_proj.bias is None
    assert ours.config.qk_norm == (kind == "qwen3") and ours.config.head_dim == config.get("head_dim", 16)
    assert ours.config.scale_embeddings == (kind == "gemma")
    idx = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_scaled(ours(idx), theirs(idx).logits, 1e-4)
    expected = theirs.generate(idx[:1, :6], max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert ours.generate(idx[:1, :6], 32, temperature=0).tolist() == expected.tolist()  # with the cache


def test_lora_on_every_projection_merges_exactly_and_leaves_the_base(llama_folder, tmp_path):
    model = LoRATransformer.from_pretrained(
        llama_folder, lora_r=4, lora_targets="q,k,v,o", adapt_feedforward=True
    )
    model.eval()
    adapted = sorted({name.rsplit(".", 1)[-1] for name, _ in model.lora_layers()})
    assert adapted == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    k = model.blocks[0].attn.k_proj
    assert (k.lora_A.shape, k.lora_B.shape) == ((4, 64), (32, 4))  # k: 2 key/value heads of 16
    before = model.base_fingerprint()
    torch.manual_seed(1)
    for _, layer in model.lora_layers():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    idx = torch.randint(0, 300, (2, 30))
    unmerged, merged = unmerged_and_merged(model, idx)
    with torch.no_grad(), model.disable_adapter():
        base = model(idx)
    assert_close_scaled(merged, unmerged, 1e-5)
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the adapter does something
    assert model.base_fingerprint() == before
    model.save_adapter(tmp_path / "adapter")
    again = LoRATransformer.from_pretrained(llama_folder, lora_r=0).eval()
    again.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again(idx), unmerged)
    with torch.no_grad():  # the merged model, written as a folder of ours, reads back with its family fields
        model.merge_and_export(tmp_path / "merged")
        saved = json.loads((tmp_path / "merged" / "config.json").read_text())
        assert (saved["norm"], saved["mlp"], saved["positions"], saved["tied_head"]) == (
            "rmsnorm", "gated", "rotary", False)  # fmt: skip
        assert_close_scaled(
            LoRATransformer.from_pretrained(tmp_path / "merged", lora_r=0).eval()(idx), merged, 1e-5
        )


def test_a_llama_folder_trains_through_the_command_line(llama_folder, tmp_path):
    pytest.importorskip("tokenizers")
    text = tmp_path / "my.txt"
    text.write_text(GPT2_TEXT)
    runs = tmp_path / "runs"
    argv = ["--task", "text", "--train_file", str(text), "--base_checkpoint", str(llama_folder), "--seq_len", "16",
            "--batch_size", "8", "--max_steps", "4", "--eval_every", "2", "--eval_batches", "1", "--device", "cpu",
            "--lora_targets", "q,k,v,o", "--adapt_feedforward", "--output_dir", str(runs), "--run_name", "llama"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((runs / "llama" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["final_val_loss"] < metrics["base_val_loss"]
    model = LoRATransformer.from_pretrained(llama_folder, lora_r=0)
    assert metrics["base_fingerprint"] == model.base_fingerprint()
    model.load_adapter(runs / "llama")
    assert len(list(model.lora_layers())) == 2 * 7


def test_a_killed_run_on_a_llama_folder_resumes_exactly(llama_folder, tmp_path):
    from test_reliability import adapter_tensors, finish, start

    text = tmp_path / "my.txt"
    text.write_text(GPT2_TEXT)
    argv = ["--task", "text", "--train_file", str(text), "--base_checkpoint", str(llama_folder), "--seq_len", "16",
            "--batch_size", "8", "--max_steps", "6", "--eval_every", "3", "--eval_batches", "1", "--device", "cpu",
            "--adapt_feedforward", "--lora_dropout", "0.1", "--save_every", "1", "--output_dir", str(tmp_path / "runs")]  # fmt: skip
    log = tmp_path / "log"
    finish(start([*argv, "--run_name", "ref"], log), log, 0)
    finish(start([*argv, "--run_name", "killed"], log, TEST_DIE_WRITING="4"), log, -9)  # kill -9 mid-write
    finish(start(["--resume", str(tmp_path / "runs" / "killed")], log), log, 0)
    got, want = (adapter_tensors(tmp_path / "runs" / name) for name in ("killed", "ref"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rotary scaling 'yarn' is not supported"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "scaling llama3 needs a positive low_freq_factor",
        ),
        ({"attention_bias": True}, "attention_bias True is not supported"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention True is not supported"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor 0.5 is not supported",
        ),
        ({"model_type": "mixtral"}, "model_type 'mixtral' (a mixture-of-experts model) is not supported"),
        ({"model_type": "falcon"}, "supported ones are gpt2, llama, mistral, qwen2, qwen3, gemma, phi3"),
        ({"num_hidden_layers": 3}, "holds 2 layers, but config.json says num_hidden_layers 3"),
    ],
)
def test_what_cannot_be_read_is_refused_by_name(llama_folder, tmp_path, change, message):
    folder = copy_with_config(llama_folder, tmp_path / "bad", **change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        LoRATransformer.from_pretrained(folder)
    assert "\n" not in str(e.value)


def test_from_gpt2_refuses_a_llama_folder(llama_folder):
    # (PEFT both ways for every family: tests/test_peft_families.py)
    with pytest.raises(
        ValueError, match="not a Hugging Face GPT-2 folder \\(model_type 'gpt2'\\): a llama folder"
    ):
        LoRATransformer.from_gpt2(llama_folder)


def test_a_sharded_checkpoint_reads_as_one_and_a_missing_shard_is_named(tmp_path):
    folder = make_llama_folder(tmp_path / "one")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    sharded = tmp_path / "sharded"
    theirs.save_pretrained(sharded, max_shard_size="60KB")  # as the hub's larger checkpoints are
    shutil.copy(folder / "tokenizer.json", sharded)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    a, b = (LoRATransformer.from_pretrained(f, lora_r=0).eval() for f in (folder, sharded))
    assert a.base_fingerprint() == b.base_fingerprint()
    (sharded / shards[1]).unlink()
    with pytest.raises(ValueError, match=f"shard {shards[1]} is missing \\(1 of {len(shards)} shards\\)"):
        LoRATransformer.from_pretrained(sharded)


def test_a_cached_step_costs_one_token_and_a_full_window_slides(llama_folder):
    """Generation computes the prompt once and then one token a step (the rows a block sees); past the
    positions the window slides and each step reads the last max_seq_len tokens, as a fresh forward does."""
    model = LoRATransformer.from_pretrained(llama_folder, lora_r=4).eval()
    rows = []
    model.blocks[0].register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape[:2])))
    prompt = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, 10, temperature=0)
    assert rows == [(2, 6)] + [(2, 1)] * 9
    expected = prompt
    with torch.no_grad():  # the reference: every step a whole forward of the last max_seq_len tokens
        for _ in range(80):  # 6 + 80 > 64 positions: the window slides
            logits = model(expected[:, -model.max_seq_len :])[:, -1]
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected[:, :16])
    assert torch.equal(model.generate(prompt, 80, temperature=0), expected)


def test_keys_a_config_lacks_mean_what_transformers_assumes():
    from lora.llama import llama_config

    base = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 8192}  # fmt: skip
    assert llama_config({**base, "model_type": "qwen3"}, "c").head_dim == 128
    assert llama_config({**base, "model_type": "gemma"}, "c").head_dim == 256
    assert llama_config({**base, "model_type": "mistral"}, "c").max_seq_len == 4096  # its default window
    assert llama_config({**base, "model_type": "qwen2", "sliding_window": 4096}, "c").max_seq_len == 8192
    assert llama_config({**base, "model_type": "phi3"}, "c").layer_norm_eps == 1e-5
    gemma = llama_config({**base, "model_type": "gemma", "hidden_act": "gelu"}, "c")
    assert gemma.activation == "gelu_tanh"  # transformers runs Gemma's "gelu" as the tanh approximation


def test_a_4_bit_base_with_its_own_lm_head_keeps_the_head_in_bfloat16(llama_folder):
    pytest.importorskip("torchao")
    model = LoRATransformer.from_pretrained(llama_folder, lora_r=4).eval()
    idx = torch.randint(0, 300, (2, 20))
    model.configure_lora_training()
    model.quantize_base("bf16")  # (the tiny widths do not tile nf4's blocks: the embeddings' narrowing alone)
    from lora.base_storage import set_embedding_dtype

    with torch.no_grad():
        before = model(idx)
        set_embedding_dtype(model, torch.bfloat16)
        assert model.lm_head.weight.dtype == torch.bfloat16 and model.wte.weight.dtype == torch.bfloat16
        with model.dense_base():
            assert model.lm_head.weight.dtype == torch.float32
        assert model.lm_head.weight.dtype == torch.bfloat16
        assert_close_scaled(model(idx), before, 5e-2)  # the head rounded to bfloat16


# ---------------------------------------------------------------------------------------------------------
# Special tokens: generation stops at EOS, the run folder keeps them, what does not fit is refused


@pytest.mark.parametrize("family", ["llama_folder", "gpt2_folder"])
def test_generation_stops_at_eos_as_transformers_generate_does(family, request):
    folder = request.getfixturevalue(family)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = LoRATransformer.from_pretrained(folder, lora_r=0).eval()
    prompt = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(3))
    free = ours.generate(prompt, 16, temperature=0)[:, 5:]  # no EOS: 16 tokens a row
    first = int(free[0, 5])  # what row 0 produces at step 5: an EOS it meets early
    for eos in (first, [first, int(free[1, 8])]):  # one EOS id, or several (Llama 3's list)
        expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                   do_sample=False, eos_token_id=eos, pad_token_id=first)  # fmt: skip
        got = ours.generate(prompt, 16, temperature=0, eos_token_id=eos)
        assert got.tolist() == expected.tolist()
    stop = free[0].tolist().index(first)  # (<= 5: the token may come earlier too)
    alone = ours.generate(prompt[:1], 16, temperature=0, eos_token_id=first)
    assert alone[0, 5:].tolist() == free[0, : stop + 1].tolist()  # it stops there, the EOS its last token
    rows = ours.generate(prompt, 16, temperature=0, eos_token_id=first)[:, 5:]
    assert rows[0, stop:].eq(first).all() and rows[0, :stop].tolist() == free[0, :stop].tolist()


def _llama_with_special_tokens(folder: Path, **config) -> Path:
    """A tiny Llama folder whose tokenizer has ``<s>`` 297, ``</s>`` 298, ``<|eot|>`` 299 (BOS added by its
    post-processor, as Llama's), with tokenizer_config.json, special_tokens_map.json and generation_config.json
    (EOS any of ``</s>``, ``<|eot|>``)."""
    from test_tokenizer import LLAMA2, special_folder

    make_llama_folder(folder, **config)
    files = {"tokenizer_config.json": LLAMA2, "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
             "generation_config.json": {"bos_token_id": 297, "eos_token_id": [298, 299]}}  # fmt: skip
    return special_folder(folder, files, post_bos=True)


def test_the_run_folder_keeps_the_special_tokens_and_generate_stops_there_without_the_base_files(tmp_path):
    pytest.importorskip("tokenizers")
    from lora.tokenizer import load_tokenizer
    from scripts.generate import parse_args, run

    base = _llama_with_special_tokens(tmp_path / "base")
    text = tmp_path / "my.txt"
    text.write_text((GPT2_TEXT[:400] + "</s>") * 10)  # documents separated by the folder's EOS
    runs = tmp_path / "runs"
    argv = ["--task", "text", "--train_file", str(text), "--base_checkpoint", str(base), "--seq_len", "16",
            "--batch_size", "8", "--max_steps", "2", "--eval_every", "2", "--eval_batches", "1", "--device", "cpu",
            "--output_dir", str(runs), "--run_name", "special"]  # fmt: skip
    assert main(argv) == 0
    folder = runs / "special"
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (folder / name).read_bytes() == (base / name).read_bytes()
        (base / name).unlink()  # generation below reads the run folder's alone
    model = LoRATransformer.from_pretrained(base, lora_r=0).eval()
    model.load_adapter(folder)
    tokenizer = load_tokenizer(folder, 300)
    prompt = [297, *tokenizer.encode("The quick")]  # BOS first, once
    greedy = model.generate(torch.tensor([prompt]), 12, temperature=0)[0, len(prompt) :].tolist()
    eos = greedy[3]  # the run folder's generation_config.json names it: generation stops there
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 299]}))
    rows = []
    args = ["--base", str(base), "--adapter", str(folder), "--prompt", "The quick", "--max_new_tokens", "12",
            "--temperature", "0", "--no_base"]  # fmt: skip
    texts = run(parse_args(args), rows)
    stop = greedy.index(eos)
    assert rows[0][1] == greedy[: stop + 1]  # the EOS is the last token generated, and not in the text
    assert texts == [(f"adapter {folder}", tokenizer.decode(greedy[:stop]))]


def test_the_samples_of_a_run_start_after_bos_and_stop_at_eos(tmp_path):
    from dataclasses import replace

    from lora.application import samples
    from lora.data import Task, TaskData
    from lora.tokenizer import load_tokenizer

    base = _llama_with_special_tokens(tmp_path / "base")
    model = LoRATransformer.from_pretrained(base, lora_r=4).eval()
    tokenizer = load_tokenizer(base, 300)
    tokenizer.special_tokens = replace(
        tokenizer.special_tokens, eos_ids=tuple(range(300))
    )  # every token ends
    empty = TaskData(torch.zeros(0, 16, dtype=torch.int32), torch.zeros(0, 16, dtype=torch.int32))
    text = samples(model, Task("text", empty, empty, "bits_per_token", False), torch.device("cpu"), tokenizer)
    for prompt in ("def ", "import ", "class ", "The "):  # each generation stops at its first token
        assert f"--- base:\n{prompt}\n--- adapted:\n{prompt}\n" in text


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: make_llama_folder(f, vocab_size=280), "the tokenizer has 300 tokens but the model 280 embeddings"),
        (lambda f: (f / "generation_config.json").write_text('{"eos_token_id": [2, 300]}'),
         "generation_config.json: eos_token_id 300 is beyond the model's 300 embeddings"),
        (lambda f: (f / "tokenizer_config.json").write_text('{"bos_token": "<s>"}'),
         "tokenizer_config.json: bos_token '<s>' is not in the tokenizer's vocabulary"),
    ],
    ids=["bigger tokenizer", "eos beyond the embeddings", "bos not in the vocabulary"],
)  # fmt: skip
def test_a_tokenizer_that_does_not_fit_the_llama_model_is_refused_with_nothing_written(
    damage, message, llama_folder, tmp_path, capsys
):
    from test_hostile_input import refused

    folder = tmp_path / "llama"
    shutil.copytree(llama_folder, folder)
    tokenizer = (folder / "tokenizer.json").read_bytes()
    damage(folder)
    (folder / "tokenizer.json").write_bytes(tokenizer)  # (300 tokens, whatever the model now has)
    text = tmp_path / "my.txt"
    text.write_text(GPT2_TEXT)
    argv = ["--task", "text", "--train_file", text, "--base_checkpoint", folder, "--seq_len", "16",
            "--device", "cpu", "--output_dir", tmp_path / "runs"]  # fmt: skip
    refused(capsys, argv, message)
    assert not (tmp_path / "runs").exists()
