"""Adapters exchanged with Hugging Face PEFT on GPT-2, both ways: the same logits as PeftModel (fp32, 1e-4),
our exports coming back bit for bit, and one-line refusals of what this model cannot compute."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_close_scaled
from safetensors.torch import load_file, save_file

from lora.lora_transformer import LoRATransformer
from lora.peft_format import adapter_to_peft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
IDX = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
ALL_MODULES = ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def hf_model(folder: Path):
    return transformers.GPT2LMHeadModel.from_pretrained(folder).eval()


@torch.no_grad()
def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    return peft.PeftModel.from_pretrained(hf_model(base), adapter).eval()(IDX).logits


@torch.no_grad()
def our_logits(model: LoRATransformer) -> torch.Tensor:
    return model.eval()(IDX)


def randomise(model: LoRATransformer, seed: int = 1) -> LoRATransformer:
    """Non-zero ``B`` everywhere (at init ``B = 0`` and every adapter would agree with every other)."""
    torch.manual_seed(seed)
    for _, layer in model.lora_layers():
        torch.nn.init.normal_(layer.lora_B, std=0.2)
        if layer.lora_magnitude is not None:  # DoRA: magnitudes moved off the base's norms too
            with torch.no_grad():
                layer.lora_magnitude.mul_(1 + 0.3 * torch.rand(layer.lora_magnitude.shape))
    return model


def mixed(model: LoRATransformer) -> None:
    """Other ranks and alphas inside one c_attn: the export folds ``s_p / s_c`` into ``B_p``."""
    model.blocks[0].attn.k_proj.reset_lora(2, 5.0)
    model.blocks[1].attn.v_proj.reset_lora(3, 12.0)


ALL_RSLORA = {"lora_r": 4, "lora_alpha": 8, "lora_targets": "q,k,v,o", "adapt_feedforward": True,
              "use_rslora": True}  # fmt: skip
OURS = {
    "qv": ({"lora_r": 4, "lora_targets": "q,v"}, None),
    "all-rslora": (ALL_RSLORA, None),
    "mixed": ({"lora_r": 4, "lora_targets": "q,k,v,o"}, mixed),
    # DoRA on q and v only: c_attn's k rows take the base's norms, so PEFT computes k unchanged
    "dora-qv": ({"lora_r": 4, "lora_targets": "q,v", "use_dora": True}, None),
    "dora-all": ({**ALL_RSLORA, "use_dora": True}, None),
    # PiSSA goes out as plain LoRA of rank 2r for the original base, as PEFT converts its own
    "pissa": (
        {"lora_r": 4, "lora_targets": "q,k,v,o", "adapt_feedforward": True, "lora_init": "pissa"},
        None,
    ),
}


def ours(gpt2_folder: Path, variant: str) -> LoRATransformer:
    options, tweak = OURS[variant]
    model = LoRATransformer.from_gpt2(gpt2_folder, **options)
    if tweak is not None:
        tweak(model)
    return randomise(model)


@pytest.mark.parametrize("variant", list(OURS))
def test_our_export_gives_peft_our_logits(gpt2_folder, tmp_path, variant):
    model = ours(gpt2_folder, variant)
    model.export_peft(tmp_path / "peft", base_model_name_or_path=str(gpt2_folder))
    theirs, mine = peft_logits(gpt2_folder, tmp_path / "peft"), our_logits(model)
    with torch.no_grad():
        base = hf_model(gpt2_folder)(IDX).logits
    assert (mine - base).abs().max() > 1e-2  # the adapter matters: the comparison can fail
    assert_close_scaled(theirs, mine, 1e-4)


def test_export_layout_by_hand(gpt2_folder):
    """q, v of rank 4, alpha 16 -> one c_attn of rank 8, alpha 32 (the same scaling 4), B block-diagonal."""
    model = ours(gpt2_folder, "qv")
    config, tensors = adapter_to_peft(model.get_adapter(), model.config)
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (8, 32.0, ["attn.c_attn"])
    assert config["rank_pattern"] == config["alpha_pattern"] == {}
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_"
    A, B = tensors[key + "A.weight"], tensors[key + "B.weight"]  # (8, 32), (96, 8)
    q, v = model.blocks[1].attn.q_proj, model.blocks[1].attn.v_proj
    assert torch.equal(A, torch.cat([q.lora_A, v.lora_A]))
    assert torch.equal(B[:32, :4], q.lora_B) and torch.equal(B[64:, 4:], v.lora_B)
    assert not B[32:64].any() and not B[:32, 4:].any() and not B[64:, :4].any()


def test_mixed_scalings_are_patterns(gpt2_folder):
    model = ours(gpt2_folder, "mixed")
    config, _ = adapter_to_peft(model.get_adapter(), model.config)
    # block 0: q, v rank 4 alpha 16 and k rank 2 alpha 5 -> rank 10 at q's scaling 4; block 1: 4 + 4 + 3
    assert config["rank_pattern"] == {"h.0.attn.c_attn": 10, "h.1.attn.c_attn": 11}
    assert config["alpha_pattern"] == {"h.0.attn.c_attn": 40.0, "h.1.attn.c_attn": 44.0}
    assert config["target_modules"] == ["attn.c_attn", "attn.c_proj"]


@pytest.mark.parametrize("variant", ["qv", "all-rslora", "dora-qv", "dora-all"])
def test_round_trip_gives_back_the_trained_adapter_exactly(gpt2_folder, tmp_path, variant):
    model = ours(gpt2_folder, variant)
    model.export_peft(tmp_path / "peft")
    back = LoRATransformer.from_gpt2(gpt2_folder, lora_r=0)
    back.load_adapter(tmp_path / "peft")
    trained, loaded = model.get_adapter(), back.get_adapter()
    assert loaded.layers.keys() == trained.layers.keys()
    for m, spec in trained.layers.items():
        got = loaded.layers[m]
        assert (got.r, got.lora_alpha, got.use_rslora) == (spec.r, spec.lora_alpha, spec.use_rslora), m
        assert torch.equal(got.lora_A, spec.lora_A) and torch.equal(got.lora_B, spec.lora_B), m
        assert (got.lora_magnitude is None) == (spec.lora_magnitude is None), m
        assert spec.lora_magnitude is None or torch.equal(got.lora_magnitude, spec.lora_magnitude), m
    assert loaded.settings == trained.settings
    assert loaded.extra["imported_from"] == "peft"


def test_round_trip_of_mixed_scalings_keeps_ranks_and_updates(gpt2_folder, tmp_path):
    model = ours(gpt2_folder, "mixed")
    model.export_peft(tmp_path / "peft")
    back = LoRATransformer.from_gpt2(gpt2_folder, lora_r=0)
    back.load_adapter(tmp_path / "peft")
    trained, loaded = model.get_adapter(), back.get_adapter()
    assert {m: s.r for m, s in loaded.layers.items()} == {m: s.r for m, s in trained.layers.items()}
    for m, spec in trained.layers.items():
        assert_close_scaled(loaded.layers[m].delta_weight(), spec.delta_weight(), 1e-7, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# PEFT -> ours


def save_peft(gpt2_folder: Path, folder: Path, randomise_b: bool = True, **options) -> Path:
    """A PEFT LoRA adapter of GPT-2 saved by PEFT itself (``r`` 4, ``lora_alpha`` 8 unless ``options`` say)."""
    torch.manual_seed(2)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ALL_MODULES, "fan_in_fan_out": True,
                                **options})  # fmt: skip
    model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder), config)
    if randomise_b:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.2)
                if "lora_magnitude_vector" in name:  # DoRA
                    p.mul_(1 + 0.3 * torch.rand(p.shape))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def peft_folder(gpt2_folder, tmp_path_factory) -> Path:
    return save_peft(gpt2_folder, tmp_path_factory.mktemp("peft") / "adapter")


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"h.1.attn.c_attn": 2, "mlp.c_fc": 3}, "alpha_pattern": {"h.0.attn.c_proj": 5}},
        {"target_modules": ["c_attn"], "lora_alpha": 16},
        {"use_dora": True},
        {"use_dora": True, "use_rslora": True, "target_modules": ["c_attn", "mlp.c_proj"]},
    ],
)
def test_peft_adapter_gives_us_peft_s_logits(gpt2_folder, tmp_path, options):
    folder = save_peft(gpt2_folder, tmp_path / "peft", **options)
    model = LoRATransformer.from_gpt2(gpt2_folder, lora_r=0)
    model.load_adapter(folder)
    mine = our_logits(model)
    assert (mine - hf_model(gpt2_folder)(IDX).logits).abs().max() > 1e-2
    assert_close_scaled(mine, peft_logits(gpt2_folder, folder), 1e-4)


def test_peft_patterns_set_each_module_s_rank(gpt2_folder, tmp_path):
    folder = save_peft(gpt2_folder, tmp_path / "peft", rank_pattern={"h.1.attn.c_attn": 2, "mlp.c_fc": 3},
                       alpha_pattern={"h.0.attn.c_proj": 5})  # fmt: skip
    model = LoRATransformer.from_gpt2(gpt2_folder, lora_r=0)
    model.load_adapter(folder)
    layers = model.get_adapter().layers
    assert [layers[f"blocks.1.attn.{p}_proj"].r for p in "qkv"] == [2, 2, 2]
    assert layers["blocks.0.mlp.fc1"].r == layers["blocks.1.mlp.fc1"].r == 3
    assert [layers[f"blocks.{i}.attn.o_proj"].lora_alpha for i in range(2)] == [5.0, 8.0]
    assert model.lora_config.lora_targets == ("q", "k", "v", "o") and model.lora_config.adapt_feedforward


def test_peft_round_trip_gives_back_peft_s_files(gpt2_folder, peft_folder, tmp_path):
    """PEFT -> ours -> PEFT: q, k, v share c_attn's A, so it is not stacked three times."""
    model = LoRATransformer.from_gpt2(gpt2_folder, lora_r=0)
    model.load_adapter(peft_folder)
    model.export_peft(tmp_path / "again")
    before, after = (
        json.loads((f / "adapter_config.json").read_text()) for f in (peft_folder, tmp_path / "again")
    )
    assert [after[k] for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")] == [4, 8.0, {}, {}]
    assert sorted(before["target_modules"]) == ["attn.c_proj", "c_attn", "mlp.c_fc", "mlp.c_proj"]
    assert after["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    original, exported = (
        load_file(f / "adapter_model.safetensors") for f in (peft_folder, tmp_path / "again")
    )
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)


def test_fresh_peft_adapter_keeps_its_full_rank(gpt2_folder, tmp_path):
    folder = save_peft(gpt2_folder, tmp_path / "peft", randomise_b=False, target_modules=["c_attn"])
    model = LoRATransformer.from_gpt2(gpt2_folder, lora_r=0)
    model.load_adapter(folder)
    assert {m: s.r for m, s in model.get_adapter().layers.items()} == {
        f"blocks.{i}.attn.{p}_proj": 4 for i in range(2) for p in "qkv"
    }


def test_zero_columns_of_a_part_are_dropped(gpt2_folder, tmp_path):
    """k's rows of c_attn's B all zero: no k adapter (it added nothing); q and v keep rank 4."""
    folder = tmp_path / "peft"
    shutil.copytree(save_peft(gpt2_folder, tmp_path / "src", target_modules=["c_attn"]), folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    for i in range(2):
        tensors[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_B.weight"][32:64] = 0
    save_file(tensors, folder / "adapter_model.safetensors")
    model = LoRATransformer.from_gpt2(gpt2_folder, lora_r=0)
    model.load_adapter(folder)
    assert {m: s.r for m, s in model.get_adapter().layers.items()} == {
        f"blocks.{i}.attn.{p}_proj": 4 for i in range(2) for p in "qv"
    }
    assert_close_scaled(our_logits(model), peft_logits(gpt2_folder, folder), 1e-4)


def test_tensor_names_without_prefixes_are_read(gpt2_folder, peft_folder, tmp_path):
    folder = tmp_path / "bare"
    shutil.copytree(peft_folder, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    bare = {k.removeprefix("base_model.model.transformer."): v for k, v in tensors.items()}
    save_file(bare, folder / "adapter_model.safetensors")
    a, b = (LoRATransformer.from_gpt2(gpt2_folder, lora_r=0) for _ in range(2))
    a.load_adapter(peft_folder)
    b.load_adapter(folder)
    assert torch.equal(our_logits(a), our_logits(b))


def edited(peft_folder: Path, tmp_path: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of ``peft_folder`` with ``config`` keys changed and ``tensors(dict) -> dict`` applied."""
    folder = tmp_path / "edited"
    shutil.copytree(peft_folder, folder)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **(config or {})}))
    if tensors is not None:
        weights = folder / "adapter_model.safetensors"
        save_file(tensors(load_file(weights)), weights)
    return folder


C_ATTN_B = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"use_dora": True}, None, "missing tensors: h.0.attn.c_attn.lora_magnitude_vector"),
        ({"use_dora": "yes"}, None, "use_dora must be true or false, got 'yes'"),
        ({"peft_type": "IA3"}, None, "peft_type 'IA3' is not supported; only LORA"),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save .* are not supported"),
        ({"target_modules": ["c_attn", "q_proj"]}, None, r"target_modules \['q_proj'\] are not in this model"),
        ({"bias": "all"}, None, "bias 'all' is not supported"),
        ({"layers_to_transform": [0]}, None, "layers_to_transform is not supported"),
        ({"init_lora_weights": "pissa"}, None, "also changes the base weights"),
        (None, lambda t: {k: v for k, v in t.items() if k != C_ATTN_B}, "missing tensors: h.1.attn.c_attn.lora_B"),
        (None, lambda t: {**t, C_ATTN_B: t[C_ATTN_B][:, :3].contiguous()}, r"wrong shapes: h.1.attn.c_attn.lora_B \(96, 3\)"),
        (None, lambda t: {**t, C_ATTN_B: t[C_ATTN_B].int()}, "has dtype torch.int32, expected floating point"),
        (None, lambda t: {k.replace(".weight", ".default.weight"): v for k, v in t.items()}, "an adapter name"),
        (None, lambda t: {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)},
         "unexpected tensors: lm_head.lora_A"),
        ({"r": 10**9}, None, r"wrong shapes: h.0.attn.c_attn.lora_A \(4, 32\) \(expected \(1000000000, 32\)\)"),
    ],
)  # fmt: skip
def test_what_this_model_cannot_compute_is_refused_in_one_line(
    gpt2_folder, peft_folder, tmp_path, config, tensors, message
):
    folder = edited(peft_folder, tmp_path, config, tensors)
    model = LoRATransformer.from_gpt2(gpt2_folder, lora_r=0)
    with pytest.raises(ValueError, match=message) as caught:
        model.load_adapter(folder)
    assert "\n" not in str(caught.value)
    assert model.active_adapter is None  # nothing was loaded


def test_an_adapter_with_a_head_is_not_exported(gpt2_folder, tmp_path):
    model = LoRATransformer.from_gpt2(gpt2_folder, lora_r=4, num_classes=3)
    with pytest.raises(ValueError, match="classification head"):
        model.export_peft(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


# ---------------------------------------------------------------------------------------------------------
# scripts/export_peft.py


def export_script():
    spec = importlib.util.spec_from_file_location("export_peft", ROOT / "scripts" / "export_peft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_exports_what_peft_loads(gpt2_folder, tmp_path, capsys):
    model = ours(gpt2_folder, "all-rslora")
    model.save_adapter(tmp_path / "ours", extra={"task": "t"})
    args = ["--base", str(gpt2_folder), "--adapter", str(tmp_path / "ours"), "--out", str(tmp_path / "peft")]
    assert export_script().main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'peft'}/adapter_config.json")
    assert "PeftModel.from_pretrained" in out
    assert_close_scaled(peft_logits(gpt2_folder, tmp_path / "peft"), our_logits(model), 1e-4)
    assert export_script().main(args) == 2  # --out is not empty now
    assert "pass --overwrite" in capsys.readouterr().err
    assert export_script().main([*args, "--overwrite"]) == 0


def test_script_bad_input_is_one_line_and_writes_nothing(gpt2_folder, tmp_path, capsys):
    args = ["--base", str(gpt2_folder), "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "peft")]
    assert export_script().main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("export_peft.py: error: ") and err.count("\n") == 1
    assert "no such adapter folder" in err
    assert not (tmp_path / "peft").exists()
