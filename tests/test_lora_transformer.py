"""LoRATransformer: merge equivalence, freezing, parameter accounting, state dicts, generation."""

import pytest
import torch
from conftest import assert_close_scaled
from torch import nn

from lora.adapter_set import describe_trainable
from lora.lora_layer import LoRALinear
from lora.lora_transformer import LoRATransformer

TINY = {"vocab_size": 50, "d_model": 32, "num_heads": 4, "num_layers": 2, "max_seq_len": 16, "dropout": 0.0}


def tiny(**kw) -> LoRATransformer:
    torch.manual_seed(0)
    return LoRATransformer(**{**TINY, **kw})


def randomise_b(model: LoRATransformer) -> None:
    for _, layer in model.lora_layers():
        nn.init.normal_(layer.lora_B, std=0.05)


def test_seed_document_constructor():
    model = LoRATransformer(
        vocab_size=10000, d_model=512, num_heads=8, num_layers=6, lora_r=8, lora_alpha=16,
        adapt_attention=True, adapt_feedforward=False,
    )  # fmt: skip
    stats = model.configure_lora_training()
    assert stats["trainable_params"] == 6 * 2 * 8 * (512 + 512)


def test_merged_equals_unmerged_logits():
    model = tiny(lora_targets=("q", "k", "v", "o"), adapt_feedforward=True).eval()
    randomise_b(model)
    idx = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        unmerged = model(idx)
        model.merge_lora()
        merged = model(idx)
        model.merge_lora()
        twice = model(idx)
        model.unmerge_lora()
        again = model(idx)
    assert_close_scaled(merged, unmerged, 1e-5)
    assert torch.equal(merged, twice)
    assert_close_scaled(again, unmerged, 1e-5)


def test_output_at_init_equals_lora_free_model():
    model = tiny()
    plain = LoRATransformer(**TINY, lora_r=0)
    plain.load_state_dict(model.state_dict(), strict=False)
    idx = torch.randint(0, 50, (2, 10))
    model.eval(), plain.eval()
    assert torch.equal(model(idx), plain(idx))


def test_training_leaves_base_bit_for_bit_unchanged_and_b_gets_gradients():
    model = tiny(lora_targets="q,k,v,o", adapt_feedforward=True, dropout=0.1)
    model.configure_lora_training()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 50, (4, 16))
    for step in range(3):
        logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 50), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, layer in model.lora_layers():
                assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0, name
        opt.step()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(layer.lora_B.abs().sum() > 0 for _, layer in model.lora_layers())


@pytest.mark.parametrize(
    ("targets", "ff", "r"), [(("q", "v"), False, 4), (("q", "k", "v", "o"), False, 2), (("o",), True, 3)]
)
def test_trainable_count_matches_formula(targets, ff, r):
    model = tiny(lora_targets=targets, adapt_feedforward=ff, lora_r=r)
    stats = model.configure_lora_training()
    d, d_ff = TINY["d_model"], 4 * TINY["d_model"]
    per_layer = len(targets) * r * (d + d) + (r * (d + d_ff) * 2 if ff else 0)
    assert stats["trainable_params"] == TINY["num_layers"] * per_layer == stats["lora_params"]
    assert stats["total_params"] == sum(p.numel() for p in model.parameters())
    assert stats["frozen_params"] == stats["total_params"] - stats["trainable_params"]
    assert stats["reduction_factor"] == pytest.approx(stats["total_params"] / stats["trainable_params"])
    by = stats["lora_params_by_projection"]
    assert by["q"] == (TINY["num_layers"] * r * 2 * d if "q" in targets else 0)
    assert list(by) == ["q", "k", "v", "o", "fc1", "fc2"]  # GPT-2's targets, each counted
    assert by["fc1"] == by["fc2"] == (TINY["num_layers"] * r * (d + d_ff) if ff else 0)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_B")) for n in names)


def test_what_trains_in_words_for_lora_and_for_full_fine_tuning():
    model = tiny(lora_r=4)
    stats = model.configure_lora_training()
    n, total = stats["trainable_params"], stats["total_params"]
    assert n == TINY["num_layers"] * 2 * 4 * (2 * TINY["d_model"]) < total
    assert (
        describe_trainable(stats)
        == f"{n:,} of {total:,} parameters ({100 * n / total:.2f}%, {total / n:.0f}x fewer)"
    )
    assert describe_trainable(model.prepare_training("full")) == f"all {total:,} parameters"  # not "1x fewer"


def test_classification_head_is_trainable_and_in_lora_state_dict():
    model = tiny(num_classes=3)
    stats = model.configure_lora_training()
    assert stats["trainable_params"] == stats["lora_params"] + 32 * 3 + 3
    assert {"cls_head.weight", "cls_head.bias"} <= set(model.lora_state_dict())
    idx = torch.randint(0, 50, (2, 8))
    logits = model(idx, lengths=torch.tensor([8, 5]))
    assert logits.shape == (2, 3)
    assert_close_scaled(logits[1], model(idx[1:, :5])[0], 1e-5)


def test_lora_free_state_dict_loads_with_only_lora_keys_missing():
    plain = LoRATransformer(**TINY, lora_r=0)
    model = tiny(lora_targets="q,k,v,o")
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.endswith(("lora_A", "lora_B")) for k in result.missing_keys)
    assert len(result.missing_keys) == 2 * 4 * TINY["num_layers"]


def test_lora_state_dict_round_trip_and_errors():
    src = tiny()
    randomise_b(src)
    dst = tiny()
    dst.load_lora_state_dict(src.lora_state_dict())
    idx = torch.randint(0, 50, (2, 8))
    src.eval(), dst.eval()
    assert torch.equal(src(idx), dst(idx))
    sd = src.lora_state_dict()
    first = next(iter(sd))
    with pytest.raises(ValueError, match="missing keys: " + first):
        dst.load_lora_state_dict({k: v for k, v in sd.items() if k != first})
    with pytest.raises(ValueError, match=r"unexpected keys: extra\.lora_A"):
        dst.load_lora_state_dict({**sd, "extra.lora_A": torch.zeros(1)})
    with pytest.raises(
        ValueError, match=r"wrong shapes: blocks\.0\.attn\.q_proj\.lora_A \(4, 32\) \(expected \(8, 32\)\)"
    ):
        dst.load_lora_state_dict({**sd, "blocks.0.attn.q_proj.lora_A": torch.zeros(4, 32)})


def test_disable_adapter_gives_base_outputs():
    model = tiny().eval()
    idx = torch.randint(0, 50, (2, 8))
    base = model(idx)
    randomise_b(model)
    adapted = model(idx)
    with model.disable_adapter():
        assert torch.equal(model(idx), base)
    assert torch.equal(model(idx), adapted)


def test_generate_shapes_and_greedy_determinism():
    model = tiny().eval()
    idx = torch.randint(0, 50, (2, 4))
    out = model.generate(idx, max_new_tokens=20, temperature=0)
    assert out.shape == (2, 24) and torch.equal(out[:, :4], idx)
    assert torch.equal(out, model.generate(idx, max_new_tokens=20, temperature=0))
    g = torch.Generator().manual_seed(1)
    sampled = model.generate(idx, max_new_tokens=5, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(sampled, out[:, :9])  # top_k=1 is greedy


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 30}, "d_model .30. must be divisible by num_heads .4."),
        ({"lora_targets": "q,x"}, "lora_targets: unknown target 'x'; the targets are q, k, v, o"),
        ({"lora_r": -1}, "lora_r must be"),
        ({"lora_alpha": 0}, "lora_alpha must be"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"num_classes": 1}, "num_classes must be"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_sequence_longer_than_max_seq_len_is_refused():
    with pytest.raises(ValueError, match="exceeds max_seq_len 16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_every_linear_is_lora_capable_and_head_is_tied():
    model = tiny(lora_targets="q")
    assert model.lm_head.weight is model.wte.weight
    assert isinstance(model.blocks[0].attn.k_proj, LoRALinear) and model.blocks[0].attn.k_proj.r == 0
    assert model.blocks[0].attn.q_proj.r == 8
