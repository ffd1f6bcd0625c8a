"""lora/fused_qkv.py: q, k, v in one fused path give the per-projection results (outputs, LoRA gradients,
training losses, eager and compiled), and nothing users see changes: keys, shapes, fingerprint, merging."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled
from torch import nn

from lora.fused_qkv import FrozenConcat, can_fuse, fused_lora_linear
from lora.lora_layer import LoRALinear
from lora.lora_transformer import LoRATransformer

V, D, H, L, T = 50, 32, 4, 2, 16
TARGETS = [("q", "v"), ("q", "k", "v"), ("v",), ("k", "o")]


def tiny(targets=("q", "v"), dropout=0.0, lora_dropout=0.0, seed=0) -> LoRATransformer:
    """A tiny model whose adapters have random, non-zero B's (an untrained B = 0 would hide errors)."""
    torch.manual_seed(seed)
    model = LoRATransformer(V, D, H, L, max_seq_len=T, dropout=dropout, lora_targets=targets,
                            lora_dropout=lora_dropout)  # fmt: skip
    model.configure_lora_training()
    for _, layer in model.lora_layers():
        nn.init.normal_(layer.lora_B, std=0.1)
    return model


def batch(seed=1) -> torch.Tensor:
    return torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, idx, forward=None):
    logits = (model if forward is None else forward)(idx)
    loss = F.cross_entropy(logits.reshape(-1, V), idx.reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def assert_grads_equal(a, b, tol=1e-6):
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].abs().sum() > 0, name
        assert_close_scaled(a[name], b[name], tol, msg=name)


@pytest.mark.parametrize("targets", TARGETS)
def test_fused_equals_unfused_outputs_and_lora_gradients(targets):
    model, idx = tiny(targets), batch()
    assert model.fused_qkv
    fused = loss_and_grads(model, idx)
    model.fused_qkv = False
    assert not any(block.attn.fused_qkv for block in model.blocks)
    unfused = loss_and_grads(model, idx)
    assert_close_scaled(fused[0], unfused[0], 1e-6)
    assert_grads_equal(fused[1], unfused[1])
    assert all(n.rsplit(".", 2)[-2][0] in targets for n in fused[1])  # only the adapted projections train


def test_the_fused_path_is_taken_and_its_three_products_are_all():
    """The fused model calls the three q/k/v layers' forward not at all and computes 2 + 1 products per
    block for the base and the stacked A's and the block-diagonal B's (against 6 unfused, q and v adapted)."""
    model, idx = tiny(("q", "v")), batch()
    calls = []
    for block in model.blocks:
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(block.attn, name).register_forward_hook(lambda *_, n=name: calls.append(n))
    with torch.no_grad():
        model(idx)
    assert calls == []
    model.fused_qkv = False
    with torch.no_grad():
        model(idx)
    assert calls == ["q_proj", "k_proj", "v_proj"] * L


@pytest.mark.parametrize("targets", [("q", "v"), ("k", "o")])
def test_compiled_fused_equals_eager_unfused(targets):
    """torch.compile (aot_eager traces forward and backward through AOTAutograd, as inductor would; inductor
    itself takes minutes to build on a CPU) sees the fused path's gradients, not an opaque function."""
    torch._dynamo.reset()
    model, idx = tiny(targets), batch()
    compiled = loss_and_grads(model, idx, torch.compile(model, backend="aot_eager", fullgraph=True))
    model.fused_qkv = False
    eager = loss_and_grads(model, idx)
    assert_close_scaled(compiled[0], eager[0], 1e-6)
    assert_grads_equal(compiled[1], eager[1])


@pytest.mark.parametrize("lora_dropout", [0.0, 0.2])
def test_five_training_steps_give_the_same_losses(lora_dropout):
    """A fixed-seed AdamW run, model and LoRA dropout on: the fused path draws the same dropout masks."""
    losses = {}
    for fused in (True, False):
        model = tiny(("q", "k", "v", "o"), dropout=0.1, lora_dropout=lora_dropout)
        model.fused_qkv = fused
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(2)
        run = []
        for step in range(5):
            idx = batch(step)
            loss = F.cross_entropy(model(idx).reshape(-1, V), idx.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.append(loss.item())
        losses[fused] = run
    assert losses[True][0] != losses[True][-1]  # it trained
    assert losses[True] == pytest.approx(losses[False], abs=1e-6, rel=1e-6)  # 1e-6 x max(1, |loss|)


def test_keys_shapes_and_fingerprint_are_unchanged():
    model = tiny(("q", "v"))
    fingerprint = model.base_fingerprint()
    attn = {k for k in model.state_dict() if k.startswith("blocks.0.attn.")}
    assert attn == {f"blocks.0.attn.{p}_proj.{leaf}" for p in "qkvo" for leaf in ("weight", "bias")} | {
        f"blocks.0.attn.{p}_proj.{leaf}" for p in "qv" for leaf in ("lora_A", "lora_B")
    }
    shapes = {k: tuple(v.shape) for k, v in model.lora_state_dict().items()}
    assert shapes["blocks.1.attn.q_proj.lora_A"] == (8, D) and shapes["blocks.1.attn.v_proj.lora_B"] == (D, 8)
    assert len(shapes) == 2 * 2 * L
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # training through the fused path leaves the base and its fingerprint alone
        loss_and_grads(model, batch())
        F.cross_entropy(model(batch()).reshape(-1, V), batch().reshape(-1)).backward()
        opt.step()
    assert model.base_fingerprint() == fingerprint
    assert {k: tuple(v.shape) for k, v in model.lora_state_dict().items()} == shapes
    model.fused_qkv = False
    assert model.base_fingerprint() == fingerprint


def test_an_adapter_saved_unfused_loads_and_computes_the_same_fused(tmp_path):
    model, idx = tiny(("q", "k", "v")), batch()
    model.fused_qkv = False
    with torch.no_grad():
        expected = model(idx)
    model.save_adapter(tmp_path / "a")
    other = tiny(("q", "k", "v"), seed=0)
    for _, layer in other.lora_layers():
        nn.init.zeros_(layer.lora_B)
    other.load_adapter(tmp_path / "a")
    assert other.fused_qkv
    with torch.no_grad():
        assert_close_scaled(other(idx), expected, 1e-6)


def test_merge_unmerge_and_disable_follow_the_weights():
    """The stacked frozen weights are kept between calls; merging changes the weights in place, and the
    fused path sees it: merged logits equal unmerged ones (a stale copy would give the base's)."""
    model, idx = tiny(("q", "v")), batch()
    model.eval()
    with torch.no_grad():
        unmerged = model(idx)
        with model.disable_adapter():
            base = model(idx)
        model.merge_lora()
        merged = model(idx)
        with model.disable_adapter():
            base_again = model(idx)
        model.unmerge_lora()
        after = model(idx)
        model.fused_qkv = False
        unfused_base = model.merged_model()(idx)
    assert (unmerged - base).abs().max() > 1e-3  # the adapter matters
    assert_close_scaled(merged, unmerged, 1e-5)
    assert_close_scaled(base_again, base, 1e-5)
    assert_close_scaled(after, unmerged, 1e-5)
    assert_close_scaled(unfused_base, unmerged, 1e-5)


def test_loaded_weights_and_a_new_dtype_are_seen():
    model, idx = tiny(("q",)), batch()
    model.eval()
    with torch.no_grad():
        model(idx)  # the stacked copy now exists
        model.load_state_dict(tiny(("q",), seed=5).state_dict())
        fused = model(idx)
        model.fused_qkv = False
        assert_close_scaled(fused, model(idx), 1e-6)
        model.fused_qkv = True
        model.double()
        fused64 = model(idx)
        model.fused_qkv = False
        assert fused64.dtype == torch.float64
        assert_close_scaled(fused64, model(idx), 1e-12)


def test_full_fine_tuning_gets_base_weight_gradients():
    """Base weights that train take the per-projection path, each weight with its own gradient."""
    model, idx = tiny(("q", "v")), batch()
    model.requires_grad_(True)
    assert not can_fuse(
        (model.blocks[0].attn.q_proj, model.blocks[0].attn.k_proj, model.blocks[0].attn.v_proj)
    )
    fused = loss_and_grads(model, idx)
    for p in ("q", "k", "v"):
        assert fused[1][f"blocks.0.attn.{p}_proj.weight"].abs().sum() > 0
    model.fused_qkv = False
    unfused = loss_and_grads(model, idx)
    assert_grads_equal(fused[1], unfused[1], tol=0)  # the same products: bit for bit


def test_gradient_checkpointing_with_the_fused_path():
    model, idx = tiny(("q", "v")), batch()
    plain = loss_and_grads(model, idx)
    model.gradient_checkpointing = True
    checkpointed = loss_and_grads(model, idx)
    assert_grads_equal(plain[1], checkpointed[1])


def test_ranks_and_scalings_that_differ_between_projections():
    """q at r 8 and alpha 16 (s = 2), k untouched, v at r 3 and alpha 12 with rsLoRA (s = 12 / sqrt 3)."""
    torch.manual_seed(0)
    layers = [
        LoRALinear(D, 24, r=8),
        LoRALinear(D, 24, r=0),
        LoRALinear(D, 16, r=3, lora_alpha=12, use_rslora=True),
    ]
    for m in layers:
        if m.r:
            nn.init.normal_(m.lora_B)
    x = torch.randn(2, 5, D, requires_grad=True)
    assert can_fuse(layers)
    fused = fused_lora_linear(x, layers)
    assert fused.shape == (2, 5, 24 + 24 + 16)
    unfused = torch.cat([m(x) for m in layers], dim=-1)
    assert_close_scaled(fused, unfused, 1e-6)  # outputs up to ~26: within 2.6e-5
    params = [x, layers[0].lora_A, layers[0].lora_B, layers[2].lora_A, layers[2].lora_B]
    g = torch.randn_like(fused)
    for a, b in zip(
        torch.autograd.grad(fused, params, g), torch.autograd.grad(unfused, params, g), strict=True
    ):
        assert_close_scaled(a, b, 1e-6, rtol=1e-5)  # B ~ N(0, 1): gradients of size 10


def test_autocast_takes_the_out_of_place_path():
    model, idx = tiny(("q", "v")), batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(idx).float()
        model.fused_qkv = False
        unfused = model(idx).float()
    assert_close_scaled(fused, unfused, 0.1)  # bfloat16's rounding, not a wrong result


def test_can_fuse_refuses_what_it_does_not_cover():
    a, b = LoRALinear(8, 8, r=2), LoRALinear(8, 8, r=2, bias=False)
    assert can_fuse([a, LoRALinear(8, 4, r=0)]) and not can_fuse([])
    assert not can_fuse([a, b])  # a bias and none
    assert not can_fuse([a, nn.Linear(8, 8)])  # not a LoRA layer
    assert not can_fuse([a, LoRALinear(4, 8, r=2)])  # another input width
    a.bias.requires_grad_(True)
    assert not can_fuse([a, LoRALinear(8, 8, r=2)])  # a trainable bias


def test_frozen_concat_is_kept_until_a_tensor_changes():
    cat = FrozenConcat()
    a, b, c = torch.ones(2, 3), torch.zeros(1, 3), torch.ones(2)
    first = cat([a, b], [c, c])
    assert first[0].shape == (3, 3) and first[1].shape == (4,)
    assert cat([a, b], [c, c]) is first
    b.add_(1)  # in place: the version counter moves
    second = cat([a, b], [c, c])
    assert second is not first and torch.equal(second[0][2], torch.ones(3))
    assert cat([a, b.clone()], [c, c]) is not second  # another tensor
    with torch.inference_mode():
        (third,) = cat([a, b])
    assert not third.is_inference()  # usable by autograd later
    assert cat([a, b])[0] is third
    cat.clear()
    assert cat([a, b])[0] is not third
    w = torch.ones(2, requires_grad=True)
    assert cat([w, w])[0] is not cat([w, w])[0]  # a tensor that needs a gradient is never kept


def test_the_stacked_base_is_made_once_per_weight_change():
    model, idx = tiny(("q", "v")), batch()
    frozen = model.blocks[0].attn._frozen_qkv
    loss_and_grads(model, idx)
    kept = frozen._value
    assert kept is not None and kept[0].shape == (3 * D, D) and kept[1].shape == (3 * D,)
    loss_and_grads(model, idx)
    assert frozen._value is kept
    with torch.no_grad():
        model.blocks[0].attn.k_proj.bias.add_(1.0)
    loss_and_grads(model, idx)
    assert frozen._value is not kept and torch.equal(
        frozen._value[1][D : 2 * D], model.blocks[0].attn.k_proj.bias
    )
    twin = copy.deepcopy(model)  # a copy starts without a stack (none of the original's tensors)
    assert twin.blocks[0].attn._frozen_qkv._value is None
    with torch.no_grad():
        twin.blocks[0].attn.q_proj.weight.add_(1.0)
        model.blocks[0].attn.q_proj.weight.add_(1.0)
        torch.testing.assert_close(twin(idx), model(idx), rtol=0, atol=0)


def test_the_benchmark_times_both_layouts():
    """``scripts/benchmark.py --configs lora_qv,lora_qv_unfused`` compares the layouts within one run."""
    import importlib.util
    import sys
    from pathlib import Path

    benchmark = sys.modules.get("benchmark")
    if benchmark is None:
        path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
        spec = importlib.util.spec_from_file_location("benchmark", path)
        benchmark = importlib.util.module_from_spec(spec)
        sys.modules["benchmark"] = benchmark  # its dataclasses look their module up there
        spec.loader.exec_module(benchmark)
    configs = {c.name: c for c in (*benchmark.CONFIGS, *benchmark.EXTRA_CONFIGS)}
    shape, cpu = benchmark.SIZES["tiny"], torch.device("cpu")
    assert benchmark.build_ours(shape, configs["lora_qv"], cpu).fused_qkv
    assert not benchmark.build_ours(shape, configs["lora_qv_unfused"], cpu).fused_qkv
    qkvo = benchmark.build_ours(shape, configs["infer_lora_qkvo_unmerged"], cpu)
    assert len(list(qkvo.lora_layers())) == 4 * shape.num_layers
    args = benchmark.parse_args(["--configs", "lora_qv,lora_qv_unfused,infer_lora_qkvo_unmerged_unfused"])
    assert args.configs == ["lora_qv", "lora_qv_unfused", "infer_lora_qkvo_unmerged_unfused"]


def test_the_stack_is_the_weights_own_storage_and_survives_merge_save_and_load(tmp_path):
    """A block's frozen q, k, v weights become views of their stacked copy: no second copy (the storages
    behind them are the stack's bytes alone), and merging, saving and loading see the same values."""
    from lora.memory import storage_bytes

    model, idx = tiny(("q", "k", "v", "o")), batch()
    before = {n: t.detach().clone() for n, t in model.base_state_dict().items()}
    loss_and_grads(model, idx)
    attn = model.blocks[0].attn
    weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    stack = attn._frozen_qkv._value[0]
    assert storage_bytes([*weights, stack]) == stack.numel() * stack.element_size() == 3 * D * D * 4
    assert all(
        torch.equal(t, before[f"blocks.0.attn.{p}_proj.weight"]) for t, p in zip(weights, "qkv", strict=True)
    )
    model.eval()
    with torch.no_grad():
        unmerged = model(idx)
        model.merge_lora()  # in place, through the views: the stack follows
        assert_close_scaled(model(idx), unmerged, 1e-5)
        model.unmerge_lora()
        assert_close_scaled(model(idx), unmerged, 1e-6)
    model.save_pretrained(tmp_path / "m")
    again = LoRATransformer.from_pretrained(tmp_path / "m", lora_r=0)
    for name, value in again.base_state_dict().items():
        assert torch.equal(value, before[name]), name  # unmerge puts back the W0 the merge kept
