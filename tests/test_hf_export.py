"""Merged export to a Hugging Face folder (lora/hf_export.py; scripts/merge_adapter.py --format hf): for every
family, transformers' AutoModelForCausalLM on the export gives the adapted model's logits, with nothing missing
or unexpected, in the family's own tensor names and config.json, sharded or not; the tokenizer files copied;
the dtype kept; what cannot be exported refused in one line, nothing written."""

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_close_scaled, make_gpt2_folder, make_llama_folder
from safetensors import safe_open

from lora.files import read_safetensors
from lora.hf_export import parse_size, shard
from lora.lora_transformer import LoRATransformer
from lora.model_config import LoRAConfig, ModelConfig

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

# each family's tiny base, with what makes it itself (phi3's default token ids exceed 300)
FAMILIES = {
    "gpt2": {},
    "llama": {},
    "mistral": {"sliding_window": 48},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 24},
    "gemma": {"head_dim": 24},
    "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
}
LORA = {"lora_r": 4, "lora_targets": ("q", "k", "v", "o"), "adapt_feedforward": True}
IDX = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
DTYPE_KEYS = ("dtype", "torch_dtype")


def make_base(kind: str, folder: Path) -> Path:
    if kind == "gpt2":
        return make_gpt2_folder(folder)
    return make_llama_folder(folder, kind, **FAMILIES[kind])


def randomize(model: LoRATransformer, seed: int = 1) -> LoRATransformer:
    """Random nonzero B on every adapted projection (the adapter changes every weight it touches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    return model.eval()


def adapted(folder: Path) -> LoRATransformer:
    model = randomize(LoRATransformer.from_pretrained(folder, **LORA))
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.lora_layers()}
    assert leaves in ({"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"},
                      {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})  # fmt: skip
    return model


def theirs(folder: Path) -> torch.nn.Module:
    """transformers' model of ``folder``, checked to load every tensor it expects and no other."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info  # nothing missing, unexpected or mismatched
    return model.eval()


def names(folder: Path) -> set[str]:
    files = sorted(folder.glob("*.safetensors"))
    found: set[str] = set()
    for f in files:
        with safe_open(str(f), "pt") as opened:
            found |= set(opened.keys())
    return found


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_transformers_reads_the_merged_export_of_every_family_as_our_adapted_model(kind, tmp_path):
    base = make_base(kind, tmp_path / "base")
    model = adapted(base)
    out = model.export_hf(tmp_path / "out")
    with torch.no_grad():
        ours = model(IDX)
        loaded = theirs(out)
        assert_close_scaled(loaded(IDX).logits, ours, 1e-4)
        assert not torch.allclose(theirs(base)(IDX).logits, ours, atol=1e-3)  # the adapter changed the model
    written, original = (json.loads((f / "config.json").read_text()) for f in (out, base))
    assert written["model_type"] == kind and loaded.config.model_type == kind
    assert {k: v for k, v in written.items() if k not in DTYPE_KEYS} == {
        k: v for k, v in original.items() if k not in DTYPE_KEYS
    }  # the base's own config.json: sliding window, token ids, head size ... as they were
    assert written["dtype"] == "float32"
    assert names(out) == names(base)  # the family's names (GPT-2's c_attn, Phi-3's fused projections)
    for name in ("tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]  # no temporary folder left


def test_a_sharded_export_loads_the_same(tmp_path):
    base = make_llama_folder(tmp_path / "base", "llama")
    model = adapted(base)
    out = model.export_hf(tmp_path / "out", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n > 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == set(files) and set(index["weight_map"]) == names(base)
    tensors = {k: v for f in files for k, v in read_safetensors(out / f).items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for f in files:  # each shard within the limit, or a single tensor larger than it
        part = read_safetensors(out / f)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 20_000 or len(part) == 1
        assert all(index["weight_map"][k] == f for k in part)
    with torch.no_grad():
        ours = model(IDX)
        assert_close_scaled(theirs(out)(IDX).logits, ours, 1e-4)
        assert_close_scaled(LoRATransformer.from_pretrained(out, lora_r=0).eval()(IDX), ours, 1e-5)


def test_shards_cut_as_transformers_cuts_them():
    t = {k: torch.zeros(n) for k, n in (("a", 3), ("b", 2), ("c", 9), ("d", 1), ("e", 1))}  # 4 bytes each
    assert [list(s) for s in shard(t, 20)] == [["a", "b"], ["c"], ["d", "e"]]
    assert [list(s) for s in shard(t, 10**9)] == [["a", "b", "c", "d", "e"]]
    assert (parse_size("5GB"), parse_size("20KB"), parse_size("2MiB"), parse_size(123)) == (
        5 * 10**9, 20_000, 2 << 20, 123)  # fmt: skip
    for bad in ("5XB", "GB", "-1KB", 0, "0.1B"):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


LAYOUT = {"norm": "rmsnorm", "mlp": "gated", "positions": "rotary", "bias": False, "activation": "silu",
          "num_kv_heads": 2}  # fmt: skip


@pytest.mark.parametrize(
    ("family", "kind"),
    [
        ({}, "gpt2"),
        ({**LAYOUT, "tied_head": True, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "llama"),
        ({**LAYOUT, "qkv_bias": True, "rope_theta": 500.0}, "qwen2"),
        ({**LAYOUT, "qk_norm": True, "tied_head": False, "head_dim": 12}, "qwen3"),
        (
            {**LAYOUT, "norm": "rmsnorm_plus_one", "scale_embeddings": True, "activation": "gelu_tanh"},
            "gemma",
        ),
    ],
    ids=["gpt2", "llama", "qwen2", "qwen3", "gemma"],
)
def test_a_model_of_our_own_format_exports_as_the_family_its_layout_is(family, kind, tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(300, 32, 4, 2, 48, 64, dropout=0.0, **family)
    LoRATransformer.from_config(config).save_pretrained(tmp_path / "base")
    model = adapted(tmp_path / "base")  # (a folder of ours: no config.json of Hugging Face's to start from)
    out = model.export_hf(tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["model_type"] == kind
    with torch.no_grad():
        assert_close_scaled(theirs(out)(IDX).logits, model(IDX), 1e-4)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no tokenizer: none


def test_bfloat16_weights_export_as_bfloat16_merged_in_float32(tmp_path):
    base = make_llama_folder(tmp_path / "base", "llama")
    model = randomize(LoRATransformer.from_pretrained(base, **LORA).to(torch.bfloat16))
    out = model.export_hf(tmp_path / "out")
    tensors = read_safetensors(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    layer = model.blocks[1].mlp.up_proj
    a, b = layer.lora_A.float(), layer.lora_B.float()
    expected = (layer.weight.float() + layer.scaling * (b @ a)).to(torch.bfloat16)  # one rounding, at the end
    assert torch.equal(tensors["model.layers.1.mlp.up_proj.weight"], expected)
    assert torch.equal(tensors["model.norm.weight"], model.ln_f.weight)


def merge(argv: list, capsys) -> tuple[int, str, str]:
    from scripts.merge_adapter import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_command_exports_our_adapter_and_peft_s(tmp_path, capsys):
    base = make_gpt2_folder(tmp_path / "gpt2")
    model = adapted(base)
    model.save_adapter(tmp_path / "ours")
    model.export_peft(tmp_path / "peft")
    for adapter in ("ours", "peft"):
        out = tmp_path / f"out-{adapter}"
        argv = ["--format", "hf", "--base", base, "--adapter", tmp_path / adapter, "--out", out]
        rc, stdout, err = merge([*argv, "--max_shard_size", "40KB"], capsys)
        assert rc == 0, err
        assert "a Hugging Face gpt2 folder, float32" in stdout and "tokenizer.json" in stdout
        assert len(list(out.glob("model-*.safetensors"))) > 1
        with torch.no_grad():
            assert_close_scaled(theirs(out)(IDX).logits, model(IDX), 1e-4)


def test_refusals_exit_2_in_one_line_and_write_nothing(tmp_path, capsys):
    base = make_llama_folder(tmp_path / "base", "llama")
    adapted(base).save_adapter(tmp_path / "adapter")
    randomize(LoRATransformer.from_pretrained(base, **LORA, num_classes=3)).save_adapter(tmp_path / "head")
    torch.manual_seed(0)  # a layout of ours that no Hugging Face family has: LayerNorm with rotary positions
    odd = ModelConfig(300, 32, 4, 2, 48, 64, positions="rotary", num_kv_heads=2)
    LoRATransformer.from_config(odd).save_pretrained(tmp_path / "odd")
    randomize(LoRATransformer.from_pretrained(tmp_path / "odd", **LORA)).save_adapter(
        tmp_path / "odd-adapter"
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    hf = ["--format", "hf"]
    cases = [
        ([*hf, "--base", base, "--adapter", tmp_path / "adapter", "--out", tmp_path / "full"],
         "is not empty: a Hugging Face export is written only into a new or empty folder"),
        ([*hf, "--base", base, "--adapter", tmp_path / "head", "--out", tmp_path / "x"],
         "classification head (cls_head, 3 classes)"),
        ([*hf, "--base", tmp_path / "odd", "--adapter", tmp_path / "odd-adapter", "--out", tmp_path / "x"],
         "no Hugging Face family: as llama, its norm 'layernorm' (read back: 'rmsnorm')"),
        ([*hf, "--base", base, "--adapter", tmp_path / "adapter", "--out", tmp_path / "x", "--max_shard_size", "5XB"],
         "max_shard_size '5XB' is not a size"),
        ([*hf, "--base", base, "--adapter", tmp_path / "adapter", "--out", tmp_path / "x", "--overwrite"],
         "--overwrite is for --format lora"),
    ]  # fmt: skip
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()  # (transformers' progress bars while the bases were made)
    for argv, message in cases:
        rc, stdout, err = merge(argv, capsys)
        assert rc == 2 and err.startswith("merge_adapter.py: error: ") and message in err, err
        assert err.count("\n") == 1 and stdout == ""
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".*"))


def test_another_base_s_config_is_refused(tmp_path):
    """The config.json the export starts from must describe the model exported (here: another head size)."""
    model = adapted(make_llama_folder(tmp_path / "base", "llama"))
    other = LoRATransformer.from_pretrained(make_llama_folder(tmp_path / "other", "qwen3"), lora_r=0)
    with pytest.raises(
        ValueError, match=r"other/config.json describes another model than the one exported: "
    ):
        model.export_hf(tmp_path / "out", base=other.base_source)
    assert not (tmp_path / "out").exists()


def test_a_4_bit_base_is_refused_and_its_adapter_merges_into_the_full_precision_base(tmp_path, capsys):
    pytest.importorskip("torchao")
    tiles = {"hidden_size": 128, "intermediate_size": 128, "num_key_value_heads": 4}  # nf4's 16,384-blocks
    base = make_llama_folder(tmp_path / "base", "llama", **tiles)
    model = randomize(LoRATransformer.from_pretrained(base, **LORA))
    model.configure_lora_training()
    model.quantize_base("nf4")
    with pytest.raises(ValueError, match=r"cannot merge into a 4-bit \(nf4\) base"):
        model.export_hf(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.save_adapter(
        tmp_path / "adapter"
    )  # the command merges it into the full-precision base, and says so
    rc, stdout, err = merge(["--format", "hf", "--base", base, "--adapter", tmp_path / "adapter", "--out",
                             tmp_path / "out"], capsys)  # fmt: skip
    assert rc == 0, err
    assert (
        "note: the adapter was trained with this base stored as nf4; it is merged into the full-precision"
        in stdout
    )
    full = LoRATransformer.from_pretrained(base, lora_r=0)
    full.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert_close_scaled(theirs(tmp_path / "out")(IDX).logits, full.eval()(IDX), 1e-4)


def test_lora_config_keys_do_not_leak_into_the_export(tmp_path):
    """A model built here and exported: LoRAConfig's settings (rank, targets) have no place in config.json."""
    torch.manual_seed(0)
    model = LoRATransformer.from_config(ModelConfig(300, 32, 4, 2, max_seq_len=64), LoRAConfig(lora_r=2))
    written = json.loads((randomize(model).export_hf(tmp_path / "out") / "config.json").read_text())
    assert not any(k.startswith("lora") for k in written) and written["model_type"] == "gpt2"
    assert (written["n_embd"], written["n_head"], written["n_layer"], written["n_positions"]) == (
        32,
        4,
        2,
        64,
    )
