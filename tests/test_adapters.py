"""The model's adapters (lora/adapter_set.py, lora/adapter.py, lora/formats.py): round trips, base checks,
several adapters, weighted sums, export."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import assert_close_scaled
from torch import nn

from lora.files import atomic_save_safetensors, atomic_write_bytes, read_safetensors
from lora.lora_transformer import LoRATransformer
from lora.peft_format import write_peft_folder

TINY = {"vocab_size": 260, "d_model": 32, "num_heads": 4, "num_layers": 2, "max_seq_len": 16, "dropout": 0.0}


def tiny(seed: int = 0, **kw) -> LoRATransformer:
    torch.manual_seed(seed)
    return LoRATransformer(**{**TINY, **kw}).eval()


def randomise(model: LoRATransformer, seed: int) -> None:
    """Give the active adapter non-zero B (and a random head), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
        if model.cls_head is not None:
            model.cls_head.weight.copy_(torch.randn(model.cls_head.weight.shape, generator=g))


def base_copy(model: LoRATransformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def same_base(model: LoRATransformer, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return all(torch.equal(now[k], v) for k, v in before.items() if not k.startswith("cls_head."))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One saved base; models with other LoRA settings are built on it with ``from_pretrained``.

    (Building ``tiny(lora_r=4)`` and ``tiny(lora_r=8)`` from the same seed gives different base weights:
    the LoRA ``A`` initialisations draw from the same generator.)
    """
    return tiny().save_pretrained(tmp_path_factory.mktemp("base"))


def on_base(base: Path, seed: int | None = None, **kw) -> LoRATransformer:
    if seed is not None:
        torch.manual_seed(seed)
    return LoRATransformer.from_pretrained(base, **kw).eval()


IDX = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------
# Base model save / load


def test_pretrained_round_trip_is_bit_for_bit(tmp_path):
    model = tiny()
    randomise(model, 1)
    model.save_pretrained(tmp_path / "base")
    files = sorted(p.name for p in (tmp_path / "base").iterdir())
    assert files == ["config.json", "model.safetensors"]
    tensors = read_safetensors(tmp_path / "base" / "model.safetensors")
    assert not any("lora_" in k for k in tensors)
    assert "wte.weight" in tensors and "lm_head.weight" not in tensors  # tied: stored once

    loaded = LoRATransformer.from_pretrained(tmp_path / "base", lora_r=0).eval()
    assert loaded.lm_head.weight is loaded.wte.weight
    with model.disable_adapter():
        assert torch.equal(loaded(IDX), model(IDX))
    assert loaded.base_fingerprint() == model.base_fingerprint()


def test_merged_model_saves_its_unmerged_base(tmp_path):
    model = tiny()
    randomise(model, 1)
    model.save_pretrained(tmp_path / "a")
    model.merge_lora()
    merged_fp = model.base_fingerprint()
    model.save_pretrained(tmp_path / "b")
    a = read_safetensors(tmp_path / "a" / "model.safetensors")
    b = read_safetensors(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the W0 the merge kept
    model.unmerge_lora()  # the fingerprint of a merged model is that of its unmerged weights
    assert model.base_fingerprint() == merged_fp


def test_a_base_saved_after_merge_and_unmerge_is_the_base_its_adapters_were_trained_on(tmp_path):
    """Merging and unmerging leave the weights bit for bit, so the fingerprint the model reports is its weights'
    hash, and an adapter saved after it loads on the base saved after it without ``force``."""
    model = tiny(lora_targets=("q", "k", "v", "o"), adapt_feedforward=True, use_dora=True)
    randomise(model, 2)
    before = base_copy(model)
    fingerprint = model.base_fingerprint()
    model.merge_lora()
    model.unmerge_lora()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model.save_pretrained(tmp_path / "base")
    model.save_adapter(tmp_path / "adapter")
    again = LoRATransformer.from_pretrained(tmp_path / "base", lora_r=0)
    assert again.base_fingerprint() == model.base_fingerprint() == fingerprint
    again.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again.eval()(IDX), model(IDX))


def test_from_pretrained_passes_lora_options(tmp_path):
    tiny().save_pretrained(tmp_path)
    model = LoRATransformer.from_pretrained(
        tmp_path, lora_r=4, lora_alpha=8, lora_targets="q,k,v,o", adapt_feedforward=True, num_classes=3
    )
    assert {n.rsplit(".", 1)[-1] for n, _ in model.lora_layers()} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "fc1",
        "fc2",
    }
    assert model.cls_head.out_features == 3
    with pytest.raises(ValueError, match="unknown from_pretrained options"):
        LoRATransformer.from_pretrained(tmp_path, lora_rank=4)


def test_fingerprint_is_deterministic_and_sees_one_changed_weight():
    a, b = tiny(), tiny()
    assert a.base_fingerprint() == b.base_fingerprint()
    randomise(b, 3)  # adapters and heads do not count
    assert a.base_fingerprint() == b.base_fingerprint()
    with torch.no_grad():
        b.blocks[1].mlp.fc2.weight[0, 0] += 1e-3
    assert a.base_fingerprint() != b.base_fingerprint()


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / "config.json").unlink(), "config.json: file not found"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: file not found"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json: not valid JSON"),
        (lambda d: (d / "config.json").write_text("[1, 2]"), "expected a JSON object"),
        (lambda d: (d / "config.json").write_text('{"d_model": 32}'), "missing architecture keys"),
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
            "not a readable safetensors file",
        ),
        (
            lambda d: atomic_save_safetensors({"wte.weight": torch.zeros(3, 3)}, d / "model.safetensors"),
            r"model.safetensors holds 0 blocks, but config.json says num_layers 2",
        ),
    ],
)
def test_from_pretrained_refuses_bad_folders_with_one_line(tmp_path, damage, match):
    tiny().save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=match) as info:
        LoRATransformer.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="no such model folder"):
        LoRATransformer.from_pretrained(tmp_path / "nowhere")


class _Evil:
    """Unpickling this would create a file: proof that a loader executed the pickle."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_pickle_named_model_safetensors_is_refused_without_running(tmp_path):
    tiny().save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps({"wte.weight": _Evil(marker)}))
    torch.save({"x": _Evil(marker)}, tmp_path / "adapter_model.safetensors")  # torch's zip+pickle format
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        LoRATransformer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_safetensors(tmp_path / "adapter_model.safetensors")
    assert not marker.exists()


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_bytes(tmp_path / "f.bin", b"one")
    atomic_write_bytes(tmp_path / "f.bin", b"two")
    assert (tmp_path / "f.bin").read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


@pytest.mark.parametrize("what", ["model", "adapter", "peft"])
def test_a_disk_full_while_writing_a_folder_leaves_its_earlier_model_or_adapter_whole(
    what, tmp_path, monkeypatch
):
    """The weights and their config.json replace the earlier pair together: a write that fails on the second
    file (here: no space left at its fsync) leaves both old files, and no temporary one."""
    import lora.files

    old, new = tiny(seed=0), tiny(seed=1, d_model=64)  # another shape: a mixed pair would not load
    randomise(new, 1)
    save = {"model": lambda m: m.save_pretrained(tmp_path / "f"),
            "adapter": lambda m: m.save_adapter(tmp_path / "f"),
            "peft": lambda m: write_peft_folder(tmp_path / "f", m.get_adapter(), m.config)}[what]  # fmt: skip
    save(old)
    before = {p.name: p.read_bytes() for p in (tmp_path / "f").iterdir()}
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(lora.files.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        save(new)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "f").iterdir()} == before


# ---------------------------------------------------------------------------------------------------------
# Adapter save / load


def test_adapter_round_trip_is_bit_for_bit(tmp_path):
    model = tiny(num_classes=None, lora_targets="q,v,o", adapt_feedforward=True)
    randomise(model, 1)
    model.save_pretrained(tmp_path / "base")
    model.save_adapter(tmp_path / "ad", extra={"task": "copy"})
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["lora_r"] == 8 and config["scaling"] == "alpha/r" and config["task"] == "copy"
    assert config["base_fingerprint"] == model.base_fingerprint() and config["version"]
    tensors = read_safetensors(tmp_path / "ad" / "adapter_model.safetensors")
    assert set(tensors) == set(model.lora_state_dict())

    fresh = LoRATransformer.from_pretrained(tmp_path / "base", lora_r=2).eval()  # another rank and targets
    fresh.load_adapter(tmp_path / "ad")
    assert torch.equal(fresh(IDX), model(IDX))
    assert fresh.lora_config.lora_targets == ("q", "v", "o") and fresh.lora_config.adapt_feedforward
    assert fresh.list_adapters() == ["default"]


def test_classification_head_travels_with_the_adapter(tmp_path):
    model = tiny(num_classes=3)
    randomise(model, 2)
    model.save_pretrained(tmp_path / "base")
    model.save_adapter(tmp_path / "ad")
    lm = LoRATransformer.from_pretrained(tmp_path / "base", num_classes=None).eval()
    assert lm.cls_head is None
    lm.load_adapter(tmp_path / "ad", "cls")
    assert lm.config.num_classes == 3
    assert torch.equal(lm(IDX), model(IDX))


def test_rslora_adapter_round_trip(tmp_path, base):
    model = on_base(base, use_rslora=True, lora_r=4)
    randomise(model, 1)
    model.save_adapter(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["scaling"] == "alpha/sqrt(r)"
    other = on_base(base)
    other.load_adapter(tmp_path)
    assert torch.equal(other(IDX), model(IDX))


def test_adapter_for_other_shapes_is_refused_even_with_force(tmp_path):
    tiny(d_model=64).save_adapter(tmp_path)
    model = tiny()
    with pytest.raises(
        ValueError,
        match=r"another architecture: d_model: adapter 64, model 32; d_ff: adapter 256, model 128$",
    ):
        model.load_adapter(tmp_path, force=True)


def test_adapter_for_other_weights_is_refused_unless_forced(tmp_path):
    trained = tiny(seed=0)
    randomise(trained, 1)
    trained.save_adapter(tmp_path)
    other = tiny(seed=1)  # same shapes, other base weights
    before = base_copy(other)
    with pytest.raises(ValueError, match=r"other base weights .*force=True"):
        other.load_adapter(tmp_path)
    with pytest.warns(UserWarning, match="loaded anyway"):
        other.load_adapter(tmp_path, force=True)
    assert torch.equal(other.blocks[0].attn.q_proj.lora_B, trained.blocks[0].attn.q_proj.lora_B)
    assert same_base(other, before)


def test_bad_adapter_files_are_refused(tmp_path):
    model = tiny()
    model.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["modules"]["blocks.0.attn.q_proj"]["r"] = 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'blocks.0.attn.q_proj' claims rank 4, but its lora_A in "
                       r"adapter_model.safetensors has shape \(8, 32\), rank 8"):  # fmt: skip
        model.load_adapter(tmp_path)
    config["modules"]["blocks.0.attn.q_proj"]["r"] = 8
    config["modules"]["blocks.9.attn.q_proj"] = {"r": 8}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"lacks \['blocks\.9\.attn\.q_proj\.lora_A', 'blocks\.9\.attn\.q_proj\.lora_B'\]"
    ):
        model.load_adapter(tmp_path)
    tensors = read_safetensors(tmp_path / "adapter_model.safetensors")
    for leaf in ("lora_A", "lora_B"):
        tensors[f"blocks.9.attn.q_proj.{leaf}"] = tensors[f"blocks.0.attn.q_proj.{leaf}"].clone()
    atomic_save_safetensors(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"'blocks\.9\.attn\.q_proj' is not a LoRA layer"):
        model.load_adapter(tmp_path)
    del config["base_fingerprint"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing keys \['base_fingerprint'\]"):
        model.load_adapter(tmp_path)
    with pytest.raises(ValueError, match="no such adapter folder"):
        model.load_adapter(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="would overwrite"):
        model.save_adapter(tmp_path / "x", extra={"lora_r": 3})


# ---------------------------------------------------------------------------------------------------------
# Several adapters on one base


def two_adapters(tmp_path, base) -> tuple[LoRATransformer, torch.Tensor, torch.Tensor]:
    """A model holding adapters "a" (q, v; r 8) and "b" (all attention + MLP; r 4), "b" active."""
    a = on_base(base, lora_r=8)
    randomise(a, 1)
    a.save_adapter(tmp_path / "a")
    b = on_base(base, lora_r=4, lora_alpha=4, lora_targets="q,k,v,o", adapt_feedforward=True)
    randomise(b, 2)
    b.save_adapter(tmp_path / "b")
    model = on_base(base, lora_r=2)
    model.load_adapter(tmp_path / "a", "a")
    model.load_adapter(tmp_path / "b", "b")
    return model, a(IDX), b(IDX)


def test_switching_adapters_gives_each_ones_outputs_back_and_keeps_the_base(tmp_path, base):
    model, out_a, out_b = two_adapters(tmp_path, base)
    before = base_copy(model)
    assert model.list_adapters() == ["b", "a", "default"] and model.active_adapter == "b"
    assert torch.equal(model(IDX), out_b)
    model.set_adapter("a")
    assert torch.equal(model(IDX), out_a)
    assert set(model.state_dict()) - set(before) == {
        f"blocks.{i}.attn.{p}_proj.lora_{m}" for i in (0, 1) for p in "qv" for m in "AB"
    }  # only the active adapter is in the state dict
    model.set_adapter("b")
    assert torch.equal(model(IDX), out_b)
    assert same_base(model, before)
    with pytest.raises(ValueError, match=r"no adapter named 'c'; the adapters are \['b', 'a', 'default'\]"):
        model.set_adapter("c")


def test_switching_a_merged_model_keeps_it_merged(tmp_path, base):
    model, out_a, out_b = two_adapters(tmp_path, base)
    before = base_copy(model)
    model.merge_lora()
    model.set_adapter("a")
    assert all(layer.merged for _, layer in model.lora_layers())
    assert_close_scaled(model(IDX), out_a, 1e-5)
    model.set_adapter("b")
    model.unmerge_lora()
    assert_close_scaled(model(IDX), out_b, 1e-5)
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in before.items())  # W0 back, bit for bit


def test_a_refused_adapter_leaves_the_model_as_it_was(tmp_path, base):
    model, _, out_b = two_adapters(tmp_path, base)
    tiny(seed=5).save_adapter(tmp_path / "foreign")
    with pytest.raises(ValueError, match="other base weights"):
        model.load_adapter(tmp_path / "foreign", "a")
    assert model.list_adapters() == ["b", "a", "default"] and torch.equal(model(IDX), out_b)


def test_disable_adapter_gives_the_base_outputs(tmp_path, base):
    model, _, out_b = two_adapters(tmp_path, base)
    plain = on_base(base, lora_r=0)
    with model.disable_adapter():
        assert torch.equal(model(IDX), plain(IDX))
    assert torch.equal(model(IDX), out_b)


def test_delete_adapter(tmp_path, base):
    model, out_a, _ = two_adapters(tmp_path, base)
    model.delete_adapter("b")
    assert model.list_adapters() == ["a", "default"] and model.active_adapter is None
    assert torch.equal(model(IDX), on_base(base, lora_r=0)(IDX))
    model.set_adapter("a")
    assert torch.equal(model(IDX), out_a)
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        model.delete_adapter("b")


def test_saving_an_inactive_adapter_does_not_switch(tmp_path, base):
    model, out_a, _ = two_adapters(tmp_path, base)
    model.save_adapter(tmp_path / "a2", adapter_name="a")
    assert model.active_adapter == "b"
    fresh = on_base(base)
    fresh.load_adapter(tmp_path / "a2")
    assert torch.equal(fresh(IDX), out_a)


def test_weighted_adapter_is_the_exact_weighted_sum(tmp_path, base):
    model, _, _ = two_adapters(tmp_path, base)
    delta = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        delta[name] = {n: layer.delta_weight() for n, layer in model.lora_layers()}
    model.add_weighted_adapter({"a": 0.7, "b": -0.3}, "mix")
    assert model.active_adapter == "b"
    model.set_adapter("mix")
    got = {n: layer.delta_weight() for n, layer in model.lora_layers()}
    assert set(got) == set(delta["a"]) | set(delta["b"])
    zero = torch.zeros(())
    for n, d in got.items():
        by_hand = 0.7 * delta["a"].get(n, zero) - 0.3 * delta["b"].get(n, zero)
        assert_close_scaled(d, by_hand, 1e-6)
    q = model.blocks[0].attn.q_proj
    assert q.r == 8 + 4 and q.scaling == 1.0

    # logits: the mixed adapter equals a LoRA-free model with W0 + the hand-computed delta
    plain = on_base(base, lora_r=0)
    with torch.no_grad():
        for n, layer in plain.named_modules():
            if n in got:
                layer.weight += 0.7 * delta["a"].get(n, zero) - 0.3 * delta["b"].get(n, zero)
    assert_close_scaled(model(IDX), plain(IDX), 1e-5)

    model.save_adapter(tmp_path / "mix")
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert config["made_from"] == {"method": "add_weighted_adapter", "weights": {"a": 0.7, "b": -0.3}}
    fresh = on_base(base)
    fresh.load_adapter(tmp_path / "mix")
    assert torch.equal(fresh(IDX), model(IDX))
    with pytest.raises(ValueError, match="exists already"):
        model.add_weighted_adapter({"a": 1.0}, "mix")


def test_weighted_adapter_refuses_heads(tmp_path):
    model = tiny(num_classes=2)
    with pytest.raises(ValueError, match="classification heads"):
        model.add_weighted_adapter({"default": 1.0}, "x")


# ---------------------------------------------------------------------------------------------------------
# Merge and export


@pytest.mark.parametrize("num_classes", [None, 3])
def test_merge_and_export_matches_and_leaves_the_model_unchanged(tmp_path, base, num_classes):
    model, _, _ = two_adapters(tmp_path, base)
    if num_classes:
        model = tiny(num_classes=num_classes, lora_targets="q,k,v,o", adapt_feedforward=True)
        randomise(model, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapters, expected = model.list_adapters(), model(IDX)
    model.merge_and_export(tmp_path / "merged")

    tensors = read_safetensors(tmp_path / "merged" / "model.safetensors")
    assert not any("lora_" in k for k in tensors)
    merged = LoRATransformer.from_pretrained(tmp_path / "merged", lora_r=0).eval()
    assert merged.config.num_classes == num_classes
    assert_close_scaled(merged(IDX), expected, 1e-5)
    assert model.list_adapters() == adapters
    assert not any(layer.merged for _, layer in model.lora_layers())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_bf16_export_merges_in_float32(tmp_path):
    model = tiny()
    randomise(model, 1)
    model.to(torch.bfloat16)
    model.merge_and_export(tmp_path)
    merged = LoRATransformer.from_pretrained(tmp_path, lora_r=0)
    assert merged.wte.weight.dtype == torch.bfloat16
    layer = model.blocks[0].attn.q_proj
    by_hand = (layer.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    assert torch.equal(merged.blocks[0].attn.q_proj.weight, by_hand)
    model.save_pretrained(tmp_path / "bf16")  # a bf16 base round-trips with its dtype and fingerprint
    again = LoRATransformer.from_pretrained(tmp_path / "bf16")
    assert again.wte.weight.dtype == torch.bfloat16 and again.base_fingerprint() == model.base_fingerprint()


def test_nn_module_bookkeeping_ignores_inactive_adapters(tmp_path, base):
    model, _, _ = two_adapters(tmp_path, base)
    names = {n for n, _ in model.named_parameters()}
    assert all(".lora_" not in n or n.endswith(("lora_A", "lora_B")) for n in names)
    assert (
        sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        == model.get_parameter_stats()["lora_params"]
    )
    assert not any(isinstance(v, nn.Module) for v in vars(model).values() if not isinstance(v, dict))


def test_an_adapter_with_a_bad_head_is_refused_and_the_model_is_unchanged(tmp_path):
    model = tiny(num_classes=3)
    randomise(model, 1)
    model.save_adapter(tmp_path / "good")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    config["num_classes"] = 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(config))
    (bad / "adapter_model.safetensors").write_bytes(
        (tmp_path / "good" / "adapter_model.safetensors").read_bytes()
    )
    before, adapters = model(IDX), model.list_adapters()
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2 or null, got 1"):
        model.load_adapter(bad, "bad")
    assert model.list_adapters() == adapters and torch.equal(model(IDX), before)


def test_a_switch_that_fails_halfway_puts_the_previous_adapter_back(tmp_path, monkeypatch):
    lm = tiny(num_classes=None)
    randomise(lm, 1)
    classifier = tiny(num_classes=3, lora_r=4)
    randomise(classifier, 2)
    classifier.save_adapter(tmp_path / "cls")
    before = lm(IDX)
    calls = []

    def fail_once(self, *args, **kwargs):  # the head is loaded last: the layers have already changed
        calls.append(1)
        raise RuntimeError("simulated failure while loading the head")

    monkeypatch.setattr(nn.Linear, "load_state_dict", fail_once)
    with (
        pytest.raises(RuntimeError, match="simulated failure"),
        pytest.warns(UserWarning, match="loaded anyway"),
    ):
        lm.load_adapter(tmp_path / "cls", "cls", force=True)  # another seed: other base weights
    monkeypatch.undo()
    assert calls and lm.list_adapters() == ["default"] and lm.cls_head is None
    assert lm.lora_config.lora_r == 8 and torch.equal(lm(IDX), before)


def test_a_state_dict_is_not_loaded_into_a_merged_model(tmp_path):
    """The weight loaded would stand for a merged one, over the W0 that the merge kept (which unmerge would then
    put back beside the other tensors' new values): refused, before any tensor changes."""
    a, b = tiny(seed=0), tiny(seed=1)
    randomise(a, 1)
    randomise(b, 2)
    a.merge_lora()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    with pytest.raises(RuntimeError, match="load_state_dict into a merged model: unmerge_lora"):
        a.load_state_dict(b.state_dict())
    assert all(torch.equal(a.state_dict()[k], v) for k, v in before.items())
    layer = next(layer for _, layer in a.lora_layers())
    with pytest.raises(RuntimeError, match="load_state_dict into a merged layer"):
        layer.load_state_dict(layer.state_dict())
    a.unmerge_lora()
    a.load_state_dict(b.state_dict())  # unmerged: loads as any module does
    assert a.base_fingerprint() == b.base_fingerprint()
