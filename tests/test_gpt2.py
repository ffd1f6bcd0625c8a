"""Importing Hugging Face GPT-2 folders: the same logits and tokens as transformers' GPT2LMHeadModel."""

import json
import shutil

import pytest
import torch
from conftest import assert_close_scaled, copy_with_config, unmerged_and_merged
from safetensors.torch import load_file, save_file

from lora.lora_transformer import LoRATransformer
from lora.pretrained import read_base_tensors, resolve_base

transformers = pytest.importorskip("transformers")


def hf_model(folder):
    return transformers.GPT2LMHeadModel.from_pretrained(folder).eval()


def test_logits_and_greedy_tokens_equal_transformers(gpt2_folder):
    ours = LoRATransformer.from_gpt2(gpt2_folder, lora_r=0).eval()
    theirs = hf_model(gpt2_folder)
    idx = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_scaled(ours(idx), theirs(idx).logits, 1e-4)
    prompt = idx[:1, :6]
    expected = theirs.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert ours.generate(prompt, 32, temperature=0).tolist() == expected.tolist()  # with the cache


def test_config_is_honoured(tmp_path):
    from conftest import make_gpt2_folder

    folder = make_gpt2_folder(tmp_path / "g", n_positions=48, layer_norm_epsilon=1e-3, activation_function="relu",
                              n_inner=40)  # fmt: skip
    config = resolve_base(folder).architecture
    assert (config.max_seq_len, config.layer_norm_eps, config.activation, config.d_ff) == (
        48,
        1e-3,
        "relu",
        40,
    )
    ours = LoRATransformer.from_gpt2(folder, lora_r=0).eval()
    idx = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_scaled(ours(idx), hf_model(folder)(idx).logits, 1e-4)


def test_split_and_transpose_by_hand(gpt2_folder):
    raw = load_file(gpt2_folder / "model.safetensors")
    ours = read_base_tensors(resolve_base(gpt2_folder))
    w, b = raw["transformer.h.1.attn.c_attn.weight"], raw["transformer.h.1.attn.c_attn.bias"]  # (32, 96)
    assert torch.equal(ours["blocks.1.attn.k_proj.weight"], w[:, 32:64].T)
    assert torch.equal(ours["blocks.1.attn.v_proj.bias"], b[64:])
    assert torch.equal(ours["blocks.0.mlp.fc2.weight"], raw["transformer.h.0.mlp.c_proj.weight"].T)


def test_lora_on_gpt2_merges_exactly_and_keeps_the_base(gpt2_folder):
    model = LoRATransformer.from_gpt2(
        gpt2_folder, lora_r=4, lora_targets="q,k,v,o", adapt_feedforward=True
    ).eval()
    before = model.base_fingerprint()
    for _, layer in model.lora_layers():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    assert model.base_fingerprint() == before  # the adapter is not the base
    unmerged, merged = unmerged_and_merged(model, torch.randint(0, 300, (2, 30)))
    assert_close_scaled(merged, unmerged, 1e-5)


def test_prefixless_bin_with_buffers_reads_the_same(gpt2_folder, tmp_path):
    """The original checkpoints: no ``transformer.`` prefix, the causal-mask buffers saved, a .bin file."""
    folder = tmp_path / "old"
    folder.mkdir()
    shutil.copy(gpt2_folder / "config.json", folder)
    state = {
        k.removeprefix("transformer."): v for k, v in load_file(gpt2_folder / "model.safetensors").items()
    }
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
    torch.save(state, folder / "pytorch_model.bin")
    assert (
        read_base_tensors(resolve_base(folder)).keys() == read_base_tensors(resolve_base(gpt2_folder)).keys()
    )
    a = LoRATransformer.from_gpt2(folder, lora_r=0)
    b = LoRATransformer.from_gpt2(gpt2_folder, lora_r=0)
    assert a.base_fingerprint() == b.base_fingerprint()


def test_bin_with_objects_is_refused_not_unpickled(gpt2_folder, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(gpt2_folder / "config.json", folder)
    torch.save({"wte.weight": torch.zeros(1), "x": object.__new__(Exploit)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights-only"):
        LoRATransformer.from_gpt2(folder)


class Exploit:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled')",))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "bert"}, "model_type 'bert' is not supported"),
        ({"model_type": "falcon"}, "model_type 'falcon' is not supported"),
        ({"activation_function": "mish"}, "activation_function 'mish'"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"n_layer": 3}, "holds 2 blocks"),
    ],
)
def test_bad_config_is_refused_in_one_line(gpt2_folder, tmp_path, change, message):
    folder = copy_with_config(gpt2_folder, tmp_path / "bad", **change)
    with pytest.raises(ValueError, match=message) as e:
        LoRATransformer.from_pretrained(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), "missing tensors: h.1.mlp.c_fc.bias"),
        (lambda t: t.update(extra=torch.zeros(2)), "unexpected tensors: extra"),
        (
            lambda t: t.update({"transformer.wpe.weight": torch.zeros(10, 32)}),
            r"wrong shapes: wpe.weight \(10, 32\)",
        ),
        (
            lambda t: t.update({"lm_head.weight": torch.zeros(300, 32)}),
            "lm_head.weight differs from wte.weight",
        ),
    ],
)
def test_bad_tensors_are_named(gpt2_folder, tmp_path, edit, message):
    folder = tmp_path / "bad"
    shutil.copytree(gpt2_folder, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        LoRATransformer.from_gpt2(folder)


def test_folder_without_weights_is_refused(gpt2_folder, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    shutil.copy(gpt2_folder / "config.json", folder)
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        LoRATransformer.from_gpt2(folder)


def test_legacy_bin_format_and_a_config_without_model_type(gpt2_folder, tmp_path):
    """The oldest checkpoints: torch's pre-zip .bin format, and a config.json that names no model_type."""
    folder = tmp_path / "legacy"
    folder.mkdir()
    config = json.loads((gpt2_folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(load_file(gpt2_folder / "model.safetensors"), folder / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)  # fmt: skip
    a = LoRATransformer.from_pretrained(folder, lora_r=0)
    assert a.base_fingerprint() == LoRATransformer.from_gpt2(gpt2_folder, lora_r=0).base_fingerprint()
