"""LoRALinear and the model-level helpers: exact math, freezing, validation."""

import math
from pathlib import Path

import pytest
import torch
from conftest import assert_close_scaled
from torch import nn

from lora.lora_layer import (
    LinearWithLoRA,
    LoRALinear,
    disable_adapter,
    inject_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    unmerge_lora,
)


def test_output_at_init_equals_base_layer():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8)
    x = torch.randn(5, 3, 16)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (8, 4)


def test_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    layer = LoRALinear(6, 4, r=2, lora_alpha=3.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(7, 6)
    expected = x @ layer.weight.T + layer.bias + 1.5 * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert_close_scaled(layer(x), expected, 1e-5)


def test_rslora_scaling():
    assert LoRALinear(8, 8, r=4, lora_alpha=8).scaling == 2.0
    assert LoRALinear(8, 8, r=4, lora_alpha=8, use_rslora=True).scaling == 8 / math.sqrt(4)


def test_merge_of_small_integer_matrices_by_hand():
    layer = LoRALinear(2, 2, r=1, lora_alpha=2.0, bias=False)  # scaling 2
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.lora_A.copy_(torch.tensor([[1.0, -1.0]]))
        layer.lora_B.copy_(torch.tensor([[2.0], [3.0]]))
    layer.merge()
    # W0 + 2 * B A = [[1, 2], [3, 4]] + 2 * [[2, -2], [3, -3]]
    assert torch.equal(layer.weight, torch.tensor([[5.0, -2.0], [9.0, -2.0]]))
    layer.unmerge()
    assert torch.equal(layer.weight, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_merge_is_idempotent_and_unmerge_restores_base():
    torch.manual_seed(0)
    layer = LoRALinear(32, 16, r=4)
    nn.init.normal_(layer.lora_B)
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 32)
    unmerged = layer(x)
    layer.merge()
    once = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged and torch.equal(layer.weight, once)
    assert_close_scaled(layer(x), unmerged, 1e-5)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("use_dora", "lora_init", "use_rslora"),
                         [(False, "kaiming", False), (False, "kaiming", True), (True, "pissa", True)])  # fmt: skip
def test_unmerge_gives_back_w0_bit_for_bit(dtype, use_dora, lora_init, use_rslora):
    """Subtracting the update again would round W0 (in bfloat16 by a whole step): the merge keeps W0 instead,
    and frees it at unmerge."""
    torch.manual_seed(0)
    layer = LoRALinear(
        48, 40, r=4, dtype=dtype, use_dora=use_dora, lora_init=lora_init, use_rslora=use_rslora
    )
    with torch.no_grad():
        layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.1)
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 48, dtype=dtype)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert not torch.equal(layer.weight, w0) and torch.equal(layer.base_weight(), w0)
        assert "_merged_base" not in layer.state_dict()  # only the module's own tensors are saved
        layer.unmerge()
        assert torch.equal(layer.weight, w0) and torch.equal(layer(x), unmerged)
    assert layer._merged_base is None


def test_merged_forward_uses_only_the_merged_weight():
    torch.manual_seed(0)
    layer = LoRALinear(8, 8, r=2)
    nn.init.normal_(layer.lora_B)
    layer.merge()
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), x @ layer.weight.T + layer.bias)


def test_bf16_merge_is_computed_in_float32():
    torch.manual_seed(0)
    layer = LoRALinear(64, 64, r=8, dtype=torch.bfloat16)
    nn.init.normal_(layer.lora_B, std=0.1)
    expected = (layer.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight, expected)


def test_eval_does_not_merge_and_disable_adapter_gives_base():
    torch.manual_seed(0)
    base = nn.Linear(8, 4)
    ref = nn.Linear(8, 4)
    ref.load_state_dict(base.state_dict())
    layer = LinearWithLoRA(base, rank=2, alpha=4)
    nn.init.normal_(layer.lora_B)
    layer.eval()
    assert not layer.merged
    x = torch.randn(3, 8)
    adapted = layer(x)
    assert not torch.allclose(adapted, ref(x))
    for merged in (False, True):
        if merged:
            layer.merge()
        with layer.disable_adapter():
            assert_close_scaled(layer(x), ref(x), 1e-6)
        assert layer.merged == merged
        assert_close_scaled(layer(x), adapted, 1e-5)


def test_linear_with_lora_wraps_and_keeps_weights():
    base = nn.Linear(512, 256)
    layer = LinearWithLoRA(base, rank=4, alpha=8)
    assert isinstance(layer, LoRALinear)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad
    assert (layer.r, layer.lora_alpha, layer.scaling) == (4, 8.0, 2.0)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == 4 * (512 + 256)


def test_linear_with_lora_scales_by_alpha_over_rank_and_the_docs_say_so():
    """The seed document that named LinearWithLoRA multiplied by alpha itself; the paper's alpha / r is kept."""
    torch.manual_seed(0)
    base = nn.Linear(512, 256)
    layer = LinearWithLoRA(base, rank=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 512)
    by_hand = base(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)  # alpha / r = 8 / 4
    assert_close_scaled(layer(x), by_hand, 1e-5, rtol=1e-5)
    assert not torch.allclose(layer(x), base(x) + 8.0 * (x @ layer.lora_A.T @ layer.lora_B.T), atol=1e-3)
    page = " ".join((Path(__file__).resolve().parents[1] / "docs" / "library.md").read_text().split())
    assert "`LinearWithLoRA(nn.Linear(512, 256), rank=4, alpha=8)` has scaling 2, not 8" in page


def test_rank_zero_is_a_plain_linear_layer():
    layer = LoRALinear(8, 4, r=0)
    assert layer.lora_A is None and layer.lora_B is None
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 8)
    assert torch.equal(layer(x), x @ layer.weight.T + layer.bias)


def test_base_state_dict_loads_with_only_lora_keys_missing():
    base = nn.Linear(8, 4)
    layer = LoRALinear(8, 4, r=2)
    result = layer.load_state_dict(base.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["lora_A", "lora_B"] and not result.unexpected_keys
    assert torch.equal(layer.weight, base.weight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": -1}, "lora_r must be an integer >= 0"),
        ({"r": 2.5}, "lora_r must be an integer >= 0"),
        ({"r": True}, "lora_r must be an integer >= 0"),
        ({"lora_alpha": 0}, "lora_alpha must be > 0"),
        ({"lora_alpha": -1.0}, "lora_alpha must be > 0"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\)"),
        ({"lora_dropout": "0.1"}, "lora_dropout must be a number"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(8, 4, **kwargs)


def test_rank_above_min_dimension_warns():
    with pytest.warns(UserWarning, match="adds parameters but no capacity"):
        LoRALinear(8, 4, r=5)


def test_dropout_is_a_module_not_a_lambda():
    assert isinstance(LoRALinear(8, 4, r=2, lora_dropout=0.1).lora_dropout, nn.Dropout)
    assert isinstance(LoRALinear(8, 4, r=2).lora_dropout, nn.Identity)


def test_inject_lora_on_sequential_and_helpers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    before = model(x)
    inject_lora(model, ["0"], r=2, lora_alpha=4)
    assert isinstance(model[0], LoRALinear) and type(model[2]) is nn.Linear
    mark_only_lora_as_trainable(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_A", "0.lora_B"]
    assert torch.equal(model(x), before)
    assert set(lora_state_dict(model)) == {"0.lora_A", "0.lora_B"}
    nn.init.normal_(model[0].lora_B)
    adapted = model(x)
    merge_lora(model)
    assert_close_scaled(model(x), adapted, 1e-5)
    unmerge_lora(model)
    with disable_adapter(model):
        assert_close_scaled(model(x), before, 1e-6)


def test_mark_only_lora_bias_modes():
    model = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), ["0"], r=1, lora_alpha=1)
    mark_only_lora_as_trainable(model, bias="lora_only")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B", "0.bias"}
    mark_only_lora_as_trainable(model, bias="all")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.lora_A",
        "0.lora_B",
        "0.bias",
        "1.bias",
    }
    with pytest.raises(ValueError, match="bias must be"):
        mark_only_lora_as_trainable(model, bias="some")


def test_inject_lora_no_match_lists_linear_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no nn.Linear matches .*the linear layers are: 0, 2"):
        inject_lora(model, ["q_proj"], r=2)


def test_inject_lora_into_transformer_encoder_layer_with_fast_path_off():
    """PyTorch's encoder fast path (eval + no grad) reads linear1.weight directly and would skip an
    unmerged adapter, so this test turns it off; merged adapters work either way."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    inject_lora(layer, ["linear1", "linear2"], r=4, lora_alpha=8)
    assert isinstance(layer.linear1, LoRALinear) and isinstance(layer.linear2, LoRALinear)
    mark_only_lora_as_trainable(layer)
    for m in (layer.linear1, layer.linear2):
        nn.init.normal_(m.lora_B)
    x = torch.randn(2, 5, 16)
    layer.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            adapted = layer(x)
            with disable_adapter(layer):
                base = layer(x)
            merge_lora(layer)
            merged = layer(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert (adapted - base).abs().max() > 1e-3
    assert_close_scaled(merged, adapted, 1e-5)


def test_inject_lora_refuses_multihead_attention_internals():
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        inject_lora(layer, ["self_attn.out_proj"], r=2)
