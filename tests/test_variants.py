"""The LoRA variants: DoRA, the initialisations (kaiming, gaussian, PiSSA, OLoRA) and LoRA+.

Each is checked against its formula by hand, for the exactness the project promises (the output at the start
equals the base's, merged equals unmerged, the base tensors stay bit for bit), through the fused q/k/v path,
through an adapter folder and back, and at the command line (bad choices refused with one line)."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled

from lora.config import TrainConfig
from lora.errors import ConfigError
from lora.lora_layer import LORA_INITS, LoRALinear, inject_lora
from lora.lora_transformer import LoRATransformer
from lora.peft_format import adapter_to_peft
from lora.trainer import LoRATrainer

TINY = {"vocab_size": 40, "d_model": 32, "num_heads": 4, "num_layers": 2, "max_seq_len": 16, "dropout": 0.0}
IDX = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(0))


def randomise(layer: LoRALinear, seed: int = 1) -> None:
    """Move the trainable tensors away from their start, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
        if layer.lora_magnitude is not None:
            layer.lora_magnitude.mul_(1 + 0.2 * torch.rand(layer.lora_magnitude.shape, generator=g))


def randomise_model(model: LoRATransformer, seed: int = 1) -> LoRATransformer:
    for i, (_, layer) in enumerate(model.lora_layers()):
        randomise(layer, seed + i)
    return model


@pytest.mark.parametrize("init", LORA_INITS)
@pytest.mark.parametrize("dora", [False, True])
def test_layer_starts_as_the_base_and_merges_exactly(init, dora):
    torch.manual_seed(0)
    layer = LoRALinear(24, 20, r=4, lora_alpha=8, use_dora=dora, lora_init=init)
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 24)
    base = F.linear(x, w0, layer.bias)
    assert_close_scaled(layer(x), base, 1e-6)  # PiSSA/OLoRA: B A - B0 A0 rounds to ~1e-7
    randomise(layer)
    unmerged = layer(x)
    assert (unmerged - base).abs().max() > 1e-2  # the adapter matters: the checks below can fail
    layer.merge()
    assert_close_scaled(layer(x), unmerged, 2e-6)
    layer.unmerge()
    assert_close_scaled(layer.weight, w0, 1e-6)
    assert_close_scaled(layer(x), unmerged, 2e-6)


def test_dora_is_the_paper_s_formula():
    """``h = m * (W0 + s B A) x / ||W0 + s B A||_row + b``; the norm is detached, so ``dm`` is ``g``'s only path."""
    torch.manual_seed(0)
    layer = LoRALinear(16, 12, r=3, lora_alpha=6, use_dora=True)
    torch.testing.assert_close(layer.lora_magnitude, layer.weight.norm(dim=1))  # m starts at ||W0||_row
    randomise(layer)
    x = torch.randn(4, 16)
    w = layer.weight + 2.0 * layer.lora_B @ layer.lora_A  # s = 6 / 3
    expected = (x @ w.t()) * (layer.lora_magnitude / w.norm(dim=1)) + layer.bias
    assert_close_scaled(layer(x), expected, 1e-6, rtol=1e-5)
    # gradients: the norm is a constant (detached), as in the paper (Sec. 4.3) and PEFT
    layer(x).sum().backward()
    a = layer.lora_A.detach().requires_grad_()
    b = layer.lora_B.detach().requires_grad_()
    m = layer.lora_magnitude.detach().requires_grad_()
    w_ = layer.weight + 2.0 * b @ a
    ((x @ w_.t()) * (m / w_.norm(dim=1).detach()) + layer.bias).sum().backward()
    for mine, ref in ((layer.lora_A, a), (layer.lora_B, b), (layer.lora_magnitude, m)):
        assert_close_scaled(mine.grad, ref.grad, 1e-6, rtol=1e-5)
    assert layer.weight.grad is None


def test_pissa_takes_the_principal_part_and_leaves_the_base_tensor_alone():
    torch.manual_seed(0)
    layer = LoRALinear(24, 20, r=4, lora_alpha=8, lora_init="pissa")
    w0 = layer.weight.detach().clone()
    s = layer.scaling
    principal = s * layer.lora_B @ layer.lora_A
    u, sv, vh = torch.linalg.svd(w0)
    assert_close_scaled(principal, u[:, :4] @ torch.diag(sv[:4]) @ vh[:4], 1e-5, rtol=1e-4)
    residual = w0 - principal  # what the adapter trains on: its singular values are the rest of W0's
    assert_close_scaled(torch.linalg.svdvals(residual)[:16], sv[4:], 1e-5, rtol=1e-4)
    assert torch.equal(layer.lora_A0, layer.lora_A) and torch.equal(layer.lora_B0, layer.lora_B)
    randomise(layer)
    layer.merge()
    layer.unmerge()
    assert_close_scaled(layer.weight, w0, 1e-6)
    assert not layer.lora_A0.requires_grad and "lora_A0" not in dict(layer.named_parameters())


def test_olora_b_is_orthonormal_and_gaussian_has_its_spread():
    torch.manual_seed(0)
    olora = LoRALinear(24, 20, r=4, lora_init="olora")
    assert_close_scaled(olora.lora_B.t() @ olora.lora_B, torch.eye(4), 1e-5)
    gauss = LoRALinear(256, 64, r=4, lora_init="gaussian")
    assert abs(gauss.lora_A.std().item() - 1 / 4) < 0.01 and not gauss.lora_B.any()


def test_inject_lora_takes_the_variants():
    model = inject_lora(
        torch.nn.Sequential(torch.nn.Linear(8, 8)), ["0"], r=2, use_dora=True, lora_init="olora"
    )
    assert model[0].use_dora and model[0].lora_init == "olora"
    with pytest.raises(ValueError, match="lora_init must be one of kaiming, gaussian, pissa, olora"):
        LoRALinear(8, 8, lora_init="svd")


def loss_and_grads(model: LoRATransformer, y: torch.Tensor, run=None) -> tuple[torch.Tensor, dict]:
    """One LM loss of ``IDX`` against ``y`` through ``run`` (default: the model) and the gradients it gives."""
    model.zero_grad(set_to_none=True)
    loss = (model if run is None else run)(IDX, targets=y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict]) -> dict:
    """The same loss (1e-6 relative) and gradients (1e-4 relative, 1e-6 of the largest) for the same
    parameters; returns ``a``'s gradients."""
    (l1, g1), (l2, g2) = a, b
    assert_close_scaled(l1, l2, 1e-6, rtol=1e-6)
    assert g1.keys() == g2.keys()
    for n in g1:
        assert_close_scaled(g1[n], g2[n], 1e-6, rtol=1e-4)
    return g1


def fused_and_unfused(model: LoRATransformer) -> dict:
    """The fused q/k/v path's step equals the per-layer path's; returns the gradients."""
    y = torch.randint(0, 40, IDX.shape, generator=torch.Generator().manual_seed(2))
    steps = []
    for fused in (True, False):
        model.fused_qkv = fused
        steps.append(loss_and_grads(model, y))
    return assert_same_step(*steps)


@pytest.mark.parametrize(
    "options",
    [
        {"use_dora": True},
        {"lora_init": "pissa"},
        {"use_dora": True, "lora_init": "olora", "lora_targets": "q,k,v,o"},
    ],
)
def test_fused_qkv_equals_the_per_layer_path(options):
    torch.manual_seed(0)
    model = randomise_model(LoRATransformer(**TINY, lora_r=4, **options))
    model.configure_lora_training()
    grads = fused_and_unfused(model)
    assert any(k.endswith("lora_magnitude") for k in grads) == bool(options.get("use_dora"))


def test_compiled_dora_and_pissa_equal_eager():
    """torch.compile (aot_eager: AOTAutograd traces forward and backward as inductor would) through DoRA's
    detached norms and PiSSA's frozen factors, in the fused path, gives eager's loss and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomise_model(LoRATransformer(**TINY, lora_r=4, use_dora=True, lora_init="pissa"))
    model.configure_lora_training()
    y = torch.randint(0, 40, IDX.shape)
    compiled = loss_and_grads(model, y, torch.compile(model, backend="aot_eager", fullgraph=True))
    grads = assert_same_step(compiled, loss_and_grads(model, y))
    assert len(grads) == 3 * 2 * TINY["num_layers"]  # A, B, m of q and v per block


@pytest.mark.parametrize(
    "options", [{"use_dora": True}, {"lora_init": "pissa"}, {"lora_init": "olora", "use_dora": True}]
)
def test_model_starts_as_its_base_keeps_the_fingerprint_and_round_trips(tmp_path, options):
    torch.manual_seed(0)
    base = LoRATransformer(**TINY, lora_r=0)
    base.save_pretrained(tmp_path / "base")
    model = LoRATransformer.from_pretrained(tmp_path / "base", lora_r=4, **options).eval()
    with torch.no_grad():
        assert_close_scaled(model(IDX), base.eval()(IDX), 1e-5)
    assert model.base_fingerprint() == base.base_fingerprint()  # the base tensors are the pretrained ones
    randomise_model(model)
    model.save_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] == options.get("use_dora", False)
    assert config["lora_init"] == options.get("lora_init", "kaiming")
    back = LoRATransformer.from_pretrained(tmp_path / "base", lora_r=0).eval()
    back.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(IDX)
        assert torch.equal(back(IDX), expected)
        merged = model.merged_model()(IDX)
        assert_close_scaled(merged, expected, 1e-5)
    model.merge_lora()
    model.unmerge_lora()
    for key, value in base.base_state_dict().items():
        assert_close_scaled(model.base_state_dict()[key], value, 1e-6)


def test_pissa_adapter_refuses_another_base_even_with_force(tmp_path):
    torch.manual_seed(0)
    LoRATransformer(**TINY, lora_r=0).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    LoRATransformer(**TINY, lora_r=0).save_pretrained(tmp_path / "other")
    model = LoRATransformer.from_pretrained(tmp_path / "base", lora_r=4, lora_init="pissa")
    model.save_adapter(tmp_path / "adapter")
    other = LoRATransformer.from_pretrained(tmp_path / "other", lora_r=0)
    with pytest.raises(
        ValueError, match="lora_init pissa adapter trains on the residual of the base it was made"
    ):
        other.load_adapter(tmp_path / "adapter", force=True)
    assert other.active_adapter is None


def test_adapters_saved_before_the_variants_still_load(tmp_path):
    torch.manual_seed(0)
    model = randomise_model(LoRATransformer(**TINY, lora_r=4))
    model.save_adapter(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["use_dora"], config["lora_init"]  # as written before they existed
    path.write_text(json.dumps(config))
    back = LoRATransformer(**TINY, lora_r=0)
    back.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
    back.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(back.eval()(IDX), model.eval()(IDX))


def test_weighted_sum_refuses_dora_and_keeps_pissa_exact():
    torch.manual_seed(0)
    model = randomise_model(LoRATransformer(**TINY, lora_r=4, lora_init="pissa"))
    expected = {n: layer.delta_weight() for n, layer in model.lora_layers()}
    model.add_weighted_adapter({"default": 1.0}, "sum")
    for n, spec in model.get_adapter("sum").layers.items():
        assert_close_scaled(spec.delta_weight(), expected[n], 1e-6, rtol=1e-5)
    dora = LoRATransformer(**TINY, lora_r=4, use_dora=True)
    with pytest.raises(ValueError, match="DoRA adapters, whose row rescaling cannot be summed"):
        dora.add_weighted_adapter({"default": 0.5}, "half")


# ---------------------------------------------------------------------------------------------------------
# LoRA+


def test_lora_plus_gives_b_its_ratio_of_the_learning_rate():
    torch.manual_seed(0)
    model = LoRATransformer(**TINY, lora_r=4, use_dora=True)
    batches = [{"x": IDX, "y": IDX} for _ in range(2)]
    trainer = LoRATrainer(model, batches, batches[:1], learning_rate=1e-3, warmup_steps=0, lr_schedule="constant",
                          lora_plus_ratio=16.0, max_steps=1, eval_every=1, device="cpu", quiet=True)  # fmt: skip
    names = {p: n for n, p in model.named_parameters()}
    groups = trainer.optimizer.param_groups
    assert [g["lr_ratio"] for g in groups] == [1.0, 16.0]
    assert all(names[p].endswith("lora_B") for p in groups[1]["params"])
    assert {names[p].rsplit(".", 1)[-1] for p in groups[0]["params"]} == {"lora_A", "lora_magnitude"}
    trainer.train()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 16e-3]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lora_init": "svd"}, "lora_init must be one of kaiming, gaussian, pissa, olora, got 'svd'"),
        ({"lora_plus_ratio": 0.0}, "lora_plus_ratio must be > 0"),
        ({"quantize_base": "int3"}, "quantize_base must be one of auto, none, bf16, nf4, got 'int3'"),
    ],
)
def test_bad_variant_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values).validate()


def test_a_resumed_run_may_change_the_base_s_storage_but_not_to_or_from_4_bits():
    """none, bf16 and auto train the same adapter (bf16's products are the float32 base's under autocast), so
    a run interrupted under the old default none resumes under auto; 4 bits would train something else."""
    for was, now in (("none", "auto"), ("auto", "bf16"), ("bf16", "none")):
        TrainConfig(quantize_base=now).check_resume(TrainConfig(quantize_base=was), "run")
    for was, now in (("nf4", "auto"), ("none", "nf4")):
        with pytest.raises(ConfigError, match=f"run was trained with quantize_base '{was}', not '{now}'"):
            TrainConfig(quantize_base=now).check_resume(TrainConfig(quantize_base=was), "run")


@pytest.mark.parametrize("key", ["use_dora", "lora_init", "lora_plus_ratio", "quantize_base"])
def test_variants_are_refused_with_full_fine_tuning(key):
    value = {"use_dora": True, "lora_init": "pissa", "lora_plus_ratio": 4.0, "quantize_base": "nf4"}[key]
    with pytest.raises(ConfigError, match=f"{key} has no effect with method full"):
        TrainConfig(method="full", **{key: value}).validate(given={key})


def test_rank_stabilised_dora_scaling_is_the_layer_s():
    layer = LoRALinear(8, 8, r=4, lora_alpha=8, use_rslora=True, use_dora=True)
    assert layer.scaling == pytest.approx(8 / math.sqrt(4))


# ---------------------------------------------------------------------------------------------------------
# QLoRA: a 4-bit NF4 base (lora/quantize.py; blocks of 16,384 weights, so d_model 128)

QUANT = {**TINY, "d_model": 128}


def quantized_pair(tmp_path, **options) -> tuple[LoRATransformer, LoRATransformer]:
    """The same base twice, with the same adapter: full precision, and with its block weights in NF4."""
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    LoRATransformer(**QUANT, lora_r=0).save_pretrained(tmp_path / "base")
    full = LoRATransformer.from_pretrained(tmp_path / "base", lora_r=4, **options).eval()
    full.configure_lora_training()
    randomise_model(full)
    quant = LoRATransformer.from_pretrained(tmp_path / "base", lora_r=4, **options).eval()
    quant.configure_lora_training()
    quant.load_lora_state_dict(full.lora_state_dict())
    return full, quant.quantize_base("nf4")


@pytest.mark.parametrize("options", [{}, {"use_dora": True}, {"lora_init": "pissa"}])
def test_quantized_base_keeps_the_fingerprint_and_the_adapter_moves_both_ways(tmp_path, options):
    full, quant = quantized_pair(tmp_path, **options)
    assert quant.base_fingerprint() == full.base_fingerprint() and quant.base_quantization == "nf4"
    assert all(
        layer.quantized for _, layer in quant.blocks[0].named_modules() if isinstance(layer, LoRALinear)
    )
    with torch.no_grad():
        a, b = full(IDX), quant(IDX)
    assert 0 < (a - b).norm() / a.norm() < 0.25  # 4-bit rounding (~9 % a weight): close, not equal
    quant.save_adapter(tmp_path / "from-4bit")
    assert (
        json.loads((tmp_path / "from-4bit" / "adapter_config.json").read_text())["base_quantization"] == "nf4"
    )
    on_full = LoRATransformer.from_pretrained(tmp_path / "base", lora_r=0).eval()
    on_full.load_adapter(tmp_path / "from-4bit")  # no --force: the fingerprint is the full-precision base's
    with torch.no_grad():
        assert torch.equal(on_full(IDX), a)
    full.save_adapter(tmp_path / "from-full")
    again = LoRATransformer.from_pretrained(tmp_path / "base", lora_r=0).eval()
    again.configure_lora_training()
    again.quantize_base("nf4").load_adapter(tmp_path / "from-full")
    with torch.no_grad():
        assert torch.equal(again(IDX), b)


def test_quantized_base_trains_only_the_adapter_and_fused_equals_unfused(tmp_path):
    _, quant = quantized_pair(tmp_path, use_dora=True, lora_targets="q,k,v,o")
    grads = fused_and_unfused(quant.train())
    assert all(n.rsplit(".", 1)[-1].startswith("lora_") for n in grads)


def test_quantized_base_refuses_to_merge_to_save_and_to_train_its_weights(tmp_path):
    _, quant = quantized_pair(tmp_path)
    for action in (quant.merge_lora, quant.merged_model, lambda: quant.merge_and_export(tmp_path / "m")):
        with pytest.raises(
            ValueError, match=r"cannot merge into a 4-bit \(nf4\) base.*merge into the full-precision"
        ):
            action()
    with pytest.raises(ValueError, match=r"a 4-bit \(nf4\) base is not saved"):
        quant.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "m").exists() and not (tmp_path / "q").exists()
    trained = LoRATransformer(**QUANT, lora_r=0).requires_grad_(True)
    with pytest.raises(ValueError, match=r"a 4-bit \(nf4\) base stays frozen"):
        trained.quantize_base("nf4")
    with pytest.raises(ValueError, match="nf4 stores weights in blocks of 16,384 elements"):
        LoRATransformer(**TINY, lora_r=2).requires_grad_(False).quantize_base("nf4")


# ---------------------------------------------------------------------------------------------------------
# At the command line


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora_init", "svd"], "lora_init must be one of kaiming, gaussian, pissa, olora, got 'svd'"),
        (["--quantize_base", "int4"], "quantize_base must be one of auto, none, bf16, nf4, got 'int4'"),
        (["--lora_plus_ratio", "-2"], "lora_plus_ratio must be > 0, got -2.0"),
        (["--method", "full", "--use_dora"], "use_dora has no effect with method full"),
        (["--method", "full", "--quantize_base", "nf4"], "quantize_base has no effect with method full"),
        # TINY_ARCH's d_model 32 gives 1,024-weight matrices: no whole NF4 block of 16,384
        (["--quantize_base", "nf4"], "quantize_base nf4: nf4 stores weights in blocks of 16,384 elements"),
    ],
)
def test_bad_variant_flags_get_one_line_and_exit_2_before_anything_is_written(tiny_flags, tmp_path, capsys,
                                                                              extra, message):  # fmt: skip
    from lora.train_lora import main

    assert main([*tiny_flags, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    runs = tmp_path / "runs"
    assert not runs.exists() or [p.name for p in runs.iterdir()] == ["bases"]  # at most the shared base


def test_a_qlora_dora_run_at_the_command_line_records_its_variant(tmp_path):
    from lora.train_lora import main

    pytest.importorskip("torchao")
    torch.manual_seed(0)
    LoRATransformer(256, d_model=128, num_heads=2, num_layers=1, max_seq_len=32, lora_r=0).save_pretrained(
        tmp_path / "base"
    )
    flags = ["--max_steps", "4", "--batch_size", "8", "--eval_every", "4", "--eval_batches", "1", "--device", "cpu",
             "--num_examples", "64", "--output_dir", str(tmp_path / "runs"), "--base_checkpoint", str(tmp_path / "base"),
             "--run_name", "q", "--quantize_base", "nf4", "--use_dora", "--lora_init", "pissa",
             "--lora_plus_ratio", "4"]  # fmt: skip
    assert main(flags) == 0
    config = json.loads((tmp_path / "runs" / "q" / "adapter_config.json").read_text())
    assert (config["base_quantization"], config["use_dora"], config["lora_init"]) == ("nf4", True, "pissa")
    full = LoRATransformer.from_pretrained(tmp_path / "base", lora_r=0)
    full.load_adapter(tmp_path / "runs" / "q")  # the full-precision base takes it: same fingerprint
    assert full.lora_config.use_dora and full.lora_config.lora_init == "pissa"


def test_a_bf16_base_run_trains_the_float32_base_run_s_adapter_bit_for_bit(tiny_flags, tmp_path):
    """At the command line under bf16 autocast (--precision bf16, as a GPU runs by default): the same adapter,
    bit for bit, with the base stored in bfloat16 (needs no torchao), which quantize_base auto chooses there;
    without autocast auto keeps the float32 base. The adapter records how the base was stored."""
    from safetensors.torch import load_file

    from lora.train_lora import main

    flags = [*tiny_flags, "--lora_targets", "q,k,v,o", "--lora_init", "pissa"]  # PiSSA: from the float32 W0
    runs = {"fp32": ["--precision", "bf16", "--quantize_base", "none"], "bf16": ["--precision", "bf16",
            "--quantize_base", "bf16"], "auto": ["--precision", "bf16"], "auto_fp32": []}  # fmt: skip
    for name, extra in runs.items():
        assert main([*flags, *extra, "--run_name", name]) == 0
    out = tmp_path / "runs"
    adapters = [load_file(out / name / "adapter_model.safetensors") for name in ("fp32", "bf16", "auto")]
    assert len(adapters[0]) == 16 and all(a.keys() == adapters[0].keys() for a in adapters)  # A, B, A0, B0
    assert all(torch.equal(a[k], adapters[0][k]) for a in adapters[1:] for k in a)
    stored = {
        name: json.loads((out / name / "adapter_config.json").read_text())["base_quantization"]
        for name in runs
    }
    assert stored == {"fp32": None, "bf16": "bf16", "auto": "bf16", "auto_fp32": None}


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_variant_run_on_a_base_pretrained_here_resumes_exactly(tiny_flags, tmp_path, precision):
    """LoRA+ leaves the base's pretraining alone (it has no B), and a run with every variant resumed from
    its middle checkpoint ends with the uninterrupted run's adapter, bit for bit; under bf16 autocast too,
    where the base is stored in bfloat16 (quantize_base auto), in the run and in its resumption."""
    import shutil

    from safetensors.torch import load_file

    from lora.train_lora import main

    flags = [*tiny_flags, "--use_dora", "--lora_init", "olora", "--lora_plus_ratio", "4", "--save_every", "6",
             "--keep_checkpoints", "3", "--run_name", "ref", "--precision", precision]  # fmt: skip
    assert main(flags) == 0
    ref = tmp_path / "runs" / "ref"
    copy = tmp_path / "copy" / "ref"
    shutil.copytree(ref, copy)
    for name in ("checkpoint-0000012.safetensors", "metrics.json", "adapter_model.safetensors"):
        (copy / name).unlink()
    assert main(["--resume", str(copy / "checkpoint-0000006.safetensors")]) == 0
    a, b = load_file(ref / "adapter_model.safetensors"), load_file(copy / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("lora_magnitude") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    stored = json.loads((copy / "adapter_config.json").read_text())["base_quantization"]
    assert stored == {"auto": None, "bf16": "bf16"}[precision]


# ---------------------------------------------------------------------------------------------------------
# Corners: a 4-bit start, merged models, autocast, ranks, the sweep


def test_a_fresh_adapter_on_a_4_bit_base_starts_at_that_base_and_exports_full_precision_norms(tmp_path):
    """As a run builds it (quantize, then derive the start): DoRA's magnitudes are the 4-bit rows' norms, so
    the output starts at the 4-bit base's; PEFT's untrained c_attn rows get the full-precision norms."""
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    LoRATransformer(**QUANT, lora_r=0).save_pretrained(tmp_path / "base")
    model = LoRATransformer.from_pretrained(
        tmp_path / "base", lora_r=4, use_dora=True, lora_init="pissa"
    ).eval()
    full_k = model.blocks[0].attn.k_proj.weight.detach().norm(dim=1)
    model.configure_lora_training()
    model.quantize_base("nf4").init_adapter_from_base()
    with torch.no_grad():
        adapted = model(IDX)
        with model.disable_adapter():
            base = model(IDX)
    assert_close_scaled(adapted, base, 1e-5)
    _, tensors = adapter_to_peft(model.get_adapter(), model.config, base_norms=model.fused_row_norms())
    magnitude = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"]  # (3C,)
    assert torch.equal(magnitude[128:256], full_k)  # k: not adapted, scale 1 on the full-precision base


def test_a_merged_model_keeps_its_fingerprint_and_takes_its_own_pissa_adapter(tmp_path):
    torch.manual_seed(0)
    model = randomise_model(LoRATransformer(**TINY, lora_r=4, lora_init="pissa"))
    fingerprint = model.base_fingerprint()
    model.save_adapter(tmp_path / "adapter")
    model.merge_lora()
    assert model.base_fingerprint() == fingerprint
    model.load_adapter(tmp_path / "adapter", adapter_name="again")  # merged: switched, merged again
    model.unmerge_lora()
    assert model.base_fingerprint() == fingerprint


def test_updates_and_norms_are_float32_under_autocast():
    torch.manual_seed(0)
    layer = LoRALinear(32, 16, r=4, use_dora=True)
    randomise(layer)
    x = torch.randn(3, 32)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.delta_weight().dtype == torch.float32 and layer._row_norm().dtype == torch.float32
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert_close_scaled(out.float(), expected, 0.05, rtol=0.05)


def test_a_4_bit_base_without_an_adapter_is_not_merged_either(tmp_path):
    _, quant = quantized_pair(tmp_path)
    quant.delete_adapter("default")
    with pytest.raises(ValueError, match=r"cannot merge into a 4-bit \(nf4\) base"):
        quant.merge_and_export(tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_derived_starts_refuse_a_rank_above_the_weight_s(init):
    with pytest.raises(ValueError, match=f"lora_init {init} takes r <= min.in_features, out_features. = 4"):
        LoRALinear(8, 4, r=6, lora_init=init)


def test_the_variants_sweep_refuses_settings_its_cells_would_override(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "sweep.py"
    spec = importlib.util.spec_from_file_location("sweep_script", path)
    sweep = importlib.util.module_from_spec(spec)
    sys.modules["sweep_script"] = sweep  # its dataclasses look their module up there
    spec.loader.exec_module(sweep)
    for extra in (["--lora_init", "pissa"], ["--targets", "q"]):
        assert sweep.main(["--mode", "variants", "--output_dir", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "has no effect with --mode variants" in err, err
    assert not any(tmp_path.iterdir())


def test_sampling_on_a_4_bit_base_dequantizes_once_and_gives_the_same_tokens(tmp_path):
    _, quant = quantized_pair(tmp_path, use_dora=True)
    weights = {n: layer.weight for n, layer in quant.named_modules() if isinstance(layer, LoRALinear)}
    with torch.no_grad():
        per_token = quant._sample(IDX[:, :4], 6, 0.0, None, None)  # every forward dequantizes
    assert torch.equal(quant.generate(IDX[:, :4], 6, temperature=0.0), per_token)
    after = {n: layer.weight for n, layer in quant.named_modules() if isinstance(layer, LoRALinear)}
    assert all(after[n] is w for n, w in weights.items())  # the same 4-bit tensors again
    assert all(quant.get_submodule(n).quantized for n in weights)


def test_a_4_bit_base_keeps_its_embeddings_in_bfloat16_and_computes_in_float32(tmp_path):
    """QLoRA's layout: the tied embedding and the positions in bfloat16 (the blocks in NF4); logits, the
    chunked loss and its gradients are those of the same values held dense in float32 (``dense_base``)."""
    full, quant = quantized_pair(tmp_path, use_dora=True)
    assert quant.wte.weight.dtype == quant.wpe.weight.dtype == torch.bfloat16
    assert quant.lm_head.weight is quant.wte.weight and not quant.wte.weight.requires_grad
    assert quant.ln_f.weight.dtype == torch.float32
    torch.testing.assert_close(quant.wte.weight.float(), full.wte.weight, rtol=2**-8, atol=0)  # bf16 rounding
    targets = torch.roll(IDX, -1, dims=1)
    embeddings = (quant.wte.weight, quant.wpe.weight)
    loss = quant(IDX, targets=targets)
    grads = torch.autograd.grad(loss, [p for p in quant.parameters() if p.requires_grad])
    with torch.no_grad():
        logits = quant(IDX)
    assert logits.dtype == torch.float32
    with quant.dense_base():
        assert quant.wte.weight.dtype == torch.float32 and quant.lm_head.weight is quant.wte.weight
        dense_loss = quant(IDX, targets=targets)
        dense_grads = torch.autograd.grad(dense_loss, [p for p in quant.parameters() if p.requires_grad])
        with torch.no_grad():
            dense_logits = quant(IDX)
    assert (quant.wte.weight, quant.wpe.weight) == embeddings and quant.lm_head.weight is embeddings[0]
    assert_close_scaled(logits, dense_logits, 1e-5)
    assert_close_scaled(loss, dense_loss, 1e-6)
    assert_close_scaled(
        loss, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), 1e-6
    )
    for a, b in zip(grads, dense_grads, strict=True):
        assert_close_scaled(a, b, 1e-5)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_a_run_s_dora_adapter_on_a_bf16_or_4_bit_base_starts_at_the_weights_it_trains_on(tmp_path, quantize):
    """The run widens a bf16 file to float32 (and quantizes it): DoRA's magnitudes are derived from those
    weights, not kept from the bf16 ones, so the output starts at that base's."""
    from lora.application import build_model
    from lora.pretrained import resolve_base

    if quantize == "nf4":
        pytest.importorskip("torchao")
    torch.manual_seed(0)
    LoRATransformer(**QUANT, lora_r=0).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    cfg = TrainConfig(use_dora=True, lora_init="olora", quantize_base=quantize, dropout=0.0)
    model = build_model(cfg, resolve_base(tmp_path / "base"), None).eval()
    assert model.ln_f.weight.dtype == torch.float32 and model.lora_config.use_dora
    assert model.wte.weight.dtype == (
        torch.bfloat16 if quantize == "nf4" else torch.float32
    )  # QLoRA's layout
    with torch.no_grad():
        adapted = model(IDX)
        with model.disable_adapter():
            base = model(IDX)
    assert_close_scaled(adapted, base, 1e-5)


def test_principal_factors_are_computed_once_per_layer_built_or_loaded(tmp_path, monkeypatch):
    """PiSSA's SVD runs once per adapted layer: in the constructor after the weights are initialised, and in
    from_pretrained after the file's weights are in (not first for the random ones they replace)."""
    import lora.lora_layer as layer_module

    calls = []
    real = layer_module._principal_factors
    monkeypatch.setattr(
        layer_module, "_principal_factors", lambda w, *a: calls.append(w.clone()) or real(w, *a)
    )
    torch.manual_seed(0)
    built = LoRATransformer(**TINY, lora_r=2, lora_init="pissa")
    assert len(calls) == 2 * 2  # q and v of 2 blocks
    built.save_pretrained(tmp_path / "base")
    calls.clear()
    loaded = LoRATransformer.from_pretrained(tmp_path / "base", lora_r=2, lora_init="pissa")
    assert len(calls) == 4
    q = loaded.blocks[0].attn.q_proj
    assert torch.equal(calls[0], q.weight)  # of the loaded weights
    torch.testing.assert_close(q.lora_B @ q.lora_A * q.scaling, built.blocks[0].attn.q_proj.lora_B @
                               built.blocks[0].attn.q_proj.lora_A * q.scaling)  # fmt: skip


def test_dora_norms_are_computed_once_within_evaluation_and_sampling():
    """fixed_dora_norms keeps each layer's ||W0 + s B A||_row for the block (no weight changes there): the same
    outputs, bit for bit, with one norm per layer instead of one per forward; leaving the block forgets them."""
    from lora.lora_layer import fixed_dora_norms

    torch.manual_seed(0)
    model = randomise_model(LoRATransformer(**TINY, lora_r=2, use_dora=True).eval())
    layers = [layer for _, layer in model.lora_layers()]
    with torch.no_grad():
        plain = [model(IDX), model(IDX[:, :5])]
        with fixed_dora_norms(model):
            first = model(IDX)
            kept = [layer._fixed_norm for layer in layers]
            again = model(IDX[:, :5])
            assert all(
                k is not None and layer._fixed_norm is k for k, layer in zip(kept, layers, strict=True)
            )
        assert all(layer._fixed_norm is None and not layer._norm_fixed for layer in layers)
    assert torch.equal(first, plain[0]) and torch.equal(again, plain[1])


# ---------------------------------------------------------------------------------------------------------
# A bfloat16 base (quantize_base("bf16")): the frozen block weights in the compute dtype of bf16 autocast


def bf16_pair(**options) -> tuple[LoRATransformer, LoRATransformer]:
    """The same model twice with the same (trained-looking) adapter: float32 base, and bfloat16 base."""
    import copy

    torch.manual_seed(0)
    full = randomise_model(LoRATransformer(**TINY, lora_r=4, **options))
    full.configure_lora_training()
    return full, copy.deepcopy(full).quantize_base("bf16")


def step(model: LoRATransformer, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    targets = torch.roll(IDX, -1, dims=1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(IDX, targets=targets)
    return loss, list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))


@pytest.mark.parametrize(
    "options", [{}, {"lora_init": "pissa"}, {"lora_targets": "q,k,v,o", "adapt_feedforward": True}]
)
@pytest.mark.parametrize("fused", [True, False])
def test_a_bf16_base_under_bf16_autocast_gives_the_float32_base_s_step_bit_for_bit(options, fused):
    """Autocast casts a float32 weight to bfloat16 for each product; the stored bfloat16 copy is the same
    rounding, so the loss and every LoRA gradient are equal, without any cast of the base per step."""
    full, narrow = bf16_pair(**options)
    full.fused_qkv = narrow.fused_qkv = fused
    (loss, grads), (narrow_loss, narrow_grads) = step(full, True), step(narrow, True)
    assert loss.dtype == torch.float32 and torch.equal(loss, narrow_loss)
    assert len(grads) == len(narrow_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, narrow_grads, strict=True))
    # and the float32 base outside autocast differs: the equality above is not a float32 computation's
    assert not torch.equal(step(full, False)[0], loss)


def test_a_bf16_base_stores_its_block_weights_narrow_and_keeps_the_rest():
    from lora.memory import storage_bytes

    full, narrow = bf16_pair(lora_targets="q,k,v,o")
    block_linear = ("proj.weight", "proj.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    narrowed = [name for name, _ in narrow.named_parameters() if name.endswith(block_linear)]
    assert len(narrowed) == 2 * 6 * 2  # layers x (q, k, v, o, fc1, fc2) x (weight, bias)
    for name, t in narrow.named_parameters():
        if name in narrowed:
            assert t.dtype == torch.bfloat16 and not t.requires_grad, name
            assert torch.equal(t, full.get_parameter(name).detach().bfloat16()), name
        else:  # the adapter, the embeddings (the residual stream starts there), the LayerNorms
            assert t.dtype == torch.float32, name
    assert narrow.base_quantization == "bf16" and narrow.base_fingerprint() == full.base_fingerprint()
    halves = [storage_bytes([model.get_parameter(n) for n in narrowed]) for model in (narrow, full)]
    assert 2 * halves[0] == halves[1]
    with pytest.raises(ValueError, match="already stored in bf16, not nf4"):
        narrow.quantize_base("nf4")


def test_a_bf16_base_outside_autocast_computes_in_float32_on_its_rounded_values():
    _, narrow = bf16_pair(use_dora=True, lora_targets="q,k,v,o")
    rounded = randomise_model(LoRATransformer(**TINY, lora_r=4, use_dora=True, lora_targets="q,k,v,o"))
    rounded.load_state_dict({k: v.float() for k, v in narrow.state_dict().items()})
    rounded.configure_lora_training()
    (loss, grads), (narrow_loss, narrow_grads) = step(rounded, False), step(narrow, False)
    assert narrow_loss.dtype == torch.float32
    assert_close_scaled(narrow_loss, loss, 1e-6)
    for a, b in zip(grads, narrow_grads, strict=True):
        assert_close_scaled(b, a, 1e-6, rtol=1e-5)
    with torch.no_grad():
        logits = narrow(IDX)
        with narrow.dense_base():  # sampling's: widened once, then the same bfloat16 tensors again
            assert narrow.blocks[0].attn.q_proj.weight.dtype == torch.float32
            assert torch.equal(narrow(IDX), logits)
    assert (
        narrow.blocks[0].attn.q_proj.weight.dtype == narrow.blocks[0].attn.q_proj.bias.dtype == torch.bfloat16
    )
    assert torch.equal(
        narrow.generate(IDX[:, :4], 5, temperature=0.0), rounded.generate(IDX[:, :4], 5, temperature=0.0)
    )


def saved_for_backward(model: LoRATransformer) -> int:
    """Bytes of the tensors a training forward keeps for backward, other than the parameters themselves."""
    with (
        torch.no_grad()
    ):  # the first forward makes q, k, v views of their stack (FrozenConcat): before counting
        model(IDX, targets=torch.roll(IDX, -1, dims=1))
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += 0 if t.data_ptr() in params else t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(IDX, targets=torch.roll(IDX, -1, dims=1))
    return total


@pytest.mark.parametrize(
    "options", [{}, {"use_dora": True}, {"lora_targets": "q,k,v,o", "adapt_feedforward": True}]
)
def test_a_bf16_base_outside_autocast_keeps_no_widened_weight_for_backward(options):
    """Widened for each product, a bfloat16 weight is widened again in backward rather than kept widened
    (which would cost more than the float32 weight it replaces): the step keeps no more than the float32
    base's step does, besides half the weights."""
    full, narrow = bf16_pair(**options)
    assert 0 < saved_for_backward(narrow) <= saved_for_backward(full)


def test_a_bf16_base_refuses_to_merge_and_to_save_and_its_adapter_moves_to_the_float32_base(tmp_path):
    full, narrow = bf16_pair(use_dora=True)
    for action in (narrow.merge_lora, narrow.merged_model, lambda: narrow.merge_and_export(tmp_path / "m")):
        with pytest.raises(
            ValueError, match=r"cannot merge into a bfloat16 \(bf16\) base.*the full-precision base"
        ):
            action()
    with pytest.raises(ValueError, match=r"cannot merge into a bfloat16 \(bf16\) base"):
        narrow.blocks[0].attn.q_proj.merge()
    with pytest.raises(ValueError, match=r"a bfloat16 \(bf16\) base is not saved"):
        narrow.save_pretrained(tmp_path / "b")
    assert not (tmp_path / "m").exists() and not (tmp_path / "b").exists()
    narrow.save_adapter(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_quantization"] == "bf16"
    full.delete_adapter("default")
    full.load_adapter(tmp_path / "a")  # no --force: the fingerprint is the float32 base's
    mine, theirs = full.lora_state_dict(), narrow.lora_state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():  # DoRA's norms are of the weights as stored: 8e-5 apart, bf16's rounding is 4e-3
        full.eval(), narrow.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert_close_scaled(full(IDX), narrow(IDX), 2e-2)
    narrow.load_adapter(tmp_path / "a", adapter_name="again")  # an adapter made after narrowing: float32 too
    narrow.set_adapter("again")
    q = narrow.blocks[0].attn.q_proj
    assert q.lora_A.dtype == q.lora_B.dtype == q.lora_magnitude.dtype == torch.float32, q.lora_A.dtype
    with pytest.raises(ValueError, match=r"cannot merge into a bfloat16 \(bf16\) base"):
        narrow.merge_lora()
    trained = LoRATransformer(**TINY, lora_r=0).requires_grad_(True)
    with pytest.raises(ValueError, match=r"a bfloat16 \(bf16\) base stays frozen"):
        trained.quantize_base("bf16")
