"""PEFT both ways for every family (GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3): our adapter on every
projection exported and loaded by PEFT gives our logits, PEFT's adapter on every module imported here gives
PEFT's (fp32, 1e-4), and the round trips keep the ranks and the tensors."""

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_close_scaled, make_gpt2_folder, make_llama_folder
from safetensors.torch import load_file

from lora.lora_transformer import LoRATransformer
from lora.peft_names import LAYOUTS

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"]
IDX = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=FAMILIES)
def folder(request, tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}"
    if request.param == "gpt2":
        return make_gpt2_folder(where)
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2} if request.param == "phi3" else {}
    return make_llama_folder(where, request.param, **ids)  # (Phi-3's default ids exceed 300)


def layout_of(folder: Path):
    kind = json.loads((folder / "config.json").read_text())["model_type"]
    return LAYOUTS["llama" if kind not in LAYOUTS else kind]


def hf_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


@torch.no_grad()
def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    return peft.PeftModel.from_pretrained(hf_model(base), adapter).eval()(IDX).logits


@torch.no_grad()
def our_logits(model: LoRATransformer) -> torch.Tensor:
    return model.eval()(IDX)


def ours(folder: Path, variant: str) -> LoRATransformer:
    """Our adapter on every projection (``dora``: on q, v, up and down, so fused modules have untrained parts)
    with non-zero ``B``; ``mixed``: rsLoRA, other ranks and alphas in some modules (inside fused ones too)."""
    gpt2 = layout_of(folder).family == "gpt2"
    dora = {"lora_targets": "q,v,fc2" if gpt2 else "q,v,up_proj,down", "use_dora": True}
    options = {"dora": dora, "all": {}, "mixed": {"use_rslora": True}}[variant]
    model = LoRATransformer.from_pretrained(
        folder, lora_r=4, lora_alpha=8, **{"lora_targets": "all", **options}
    )
    if variant == "mixed":
        model.blocks[0].attn.k_proj.reset_lora(2, 5.0, use_rslora=True)
        mlp = model.blocks[1].mlp
        (mlp.fc1 if hasattr(mlp, "fc1") else mlp.up_proj).reset_lora(3, 12.0, use_rslora=True)
    torch.manual_seed(1)
    for _, layer in model.lora_layers():
        torch.nn.init.normal_(layer.lora_B, std=0.2)
        if layer.lora_magnitude is not None:  # DoRA: magnitudes moved off the base's norms too
            with torch.no_grad():
                layer.lora_magnitude.mul_(1 + 0.3 * torch.rand(layer.lora_magnitude.shape))
    return model


@pytest.mark.parametrize("variant", ["all", "mixed", "dora"])
def test_our_export_gives_peft_our_logits_and_comes_back(folder, tmp_path, variant):
    model = ours(folder, variant)
    model.export_peft(tmp_path / "peft", base_model_name_or_path=str(folder))
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    layout = layout_of(folder)
    if variant == "all":  # every module of the family, by the family's own names
        assert saved["target_modules"] == [layout.target(m) for m in layout.modules]
    assert saved["fan_in_fan_out"] is layout.fan_in_fan_out and saved["base_model_name_or_path"] == str(
        folder
    )
    mine, theirs = our_logits(model), peft_logits(folder, tmp_path / "peft")
    with torch.no_grad():
        base = hf_model(folder)(IDX).logits
    assert (mine - base).abs().max() > 1e-2  # the adapter matters: the comparison can fail
    assert_close_scaled(theirs, mine, 1e-4)

    back = LoRATransformer.from_pretrained(folder, lora_r=0)
    back.load_adapter(tmp_path / "peft")
    trained, loaded = model.get_adapter(), back.get_adapter()
    assert {m: s.r for m, s in loaded.layers.items()} == {m: s.r for m, s in trained.layers.items()}
    for m, spec in trained.layers.items():
        got = loaded.layers[m]
        if variant == "mixed":  # a part of a fused module at another scaling carries s_p / s_c in its B
            assert_close_scaled(got.delta_weight(), spec.delta_weight(), 1e-7, rtol=1e-6)
            continue
        assert (got.r, got.lora_alpha, got.use_rslora) == (spec.r, spec.lora_alpha, spec.use_rslora), m
        assert torch.equal(got.lora_A, spec.lora_A) and torch.equal(got.lora_B, spec.lora_B), m
        assert spec.lora_magnitude is None or torch.equal(got.lora_magnitude, spec.lora_magnitude), m
    if variant != "mixed":
        assert loaded.settings == trained.settings
    assert_close_scaled(our_logits(back), mine, 1e-5)


def save_peft(folder: Path, out: Path, **options) -> Path:
    """A PEFT LoRA adapter on every module of the family, saved by PEFT itself, with random ``B``."""
    layout = layout_of(folder)
    torch.manual_seed(2)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": [layout.target(m) for m in layout.modules],
                                "fan_in_fan_out": layout.fan_in_fan_out, **options})  # fmt: skip
    model = peft.get_peft_model(hf_model(folder), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
            if "lora_magnitude_vector" in name:  # DoRA
                p.mul_(1 + 0.3 * torch.rand(p.shape))
    model.save_pretrained(out)
    return out


def patterns(folder: Path) -> dict:
    """rsLoRA with a rank for every first module, another for one block's last, an alpha for one module."""
    layout = layout_of(folder)
    first, second, *_, last = layout.modules
    return {"use_rslora": True, "rank_pattern": {layout.target(first): 2, f"{layout.block}.1.{last}": 3},
            "alpha_pattern": {f"{layout.block}.0.{second}": 5}}  # fmt: skip


@pytest.mark.parametrize("variant", ["plain", "patterns", "dora"])
def test_peft_adapter_gives_us_peft_s_logits(folder, tmp_path, variant):
    options = {"plain": {}, "patterns": patterns(folder), "dora": {"use_dora": True}}[variant]
    adapter = save_peft(folder, tmp_path / "peft", **options)
    model = LoRATransformer.from_pretrained(folder, lora_r=0)
    model.load_adapter(adapter)
    assert_close_scaled(our_logits(model), peft_logits(folder, adapter), 1e-4)
    kinds = {m.split(".", 2)[2] for m in model.get_adapter().layers}
    assert kinds == set(model.config.projection_shapes())  # every projection adapted
    settings = model.get_adapter().settings
    assert (settings.lora_targets, settings.adapt_feedforward) == (("q", "k", "v", "o"), True)
    if variant == "plain":  # and back: PEFT's own files (a fused module's parts share its A, kept once)
        model.export_peft(tmp_path / "again")
        original, exported = (
            load_file(f / "adapter_model.safetensors") for f in (adapter, tmp_path / "again")
        )
        assert original.keys() == exported.keys()
        assert all(torch.equal(original[k], exported[k]) for k in original)


def test_the_script_exports_a_family_s_adapter(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "export_peft", Path(__file__).parents[1] / "scripts" / "export_peft.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder = make_llama_folder(tmp_path / "phi3", "phi3", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = ours(folder, "mixed")
    model.save_adapter(tmp_path / "ours")
    args = ["--base", str(folder), "--adapter", str(tmp_path / "ours"), "--out", str(tmp_path / "peft")]
    assert script.main(args) == 0
    assert "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(" in capsys.readouterr().out
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    # r 4 on o and down; the fused modules' ranks add up, k (2) in block 0 and up (3) in block 1 of their own
    ranks = {"layers.0.self_attn.qkv_proj": 10, "layers.0.mlp.gate_up_proj": 8, "layers.1.self_attn.qkv_proj": 12,
             "layers.1.mlp.gate_up_proj": 7}  # fmt: skip
    assert (saved["r"], saved["rank_pattern"]) == (4, ranks)
    assert_close_scaled(peft_logits(folder, tmp_path / "peft"), our_logits(model), 1e-4)


def test_a_layout_no_family_has_is_refused(tmp_path):
    model = LoRATransformer(vocab_size=300, d_model=16, num_heads=2, num_layers=1, lora_r=2, norm="rmsnorm")
    with pytest.raises(ValueError, match=r"^PEFT's names are mapped for gpt2, llama, .* and phi3 models, not a model "
                                         r"that differs from GPT-2 in norm$"):  # fmt: skip
        model.export_peft(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
