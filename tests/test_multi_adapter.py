"""Several adapters in one batch (lora/multi_adapter.py): each row equals its adapter run alone."""

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import assert_close_scaled, load_script, make_llama_folder
from torch import nn

from lora.decoder import Decoder
from lora.lora_transformer import LoRATransformer
from lora.model_config import LoRAConfig, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 50, "d_model": 32, "num_heads": 4, "num_layers": 2, "max_seq_len": 32, "dropout": 0.0}
NAMES = ["a", "b", "base", "c"]  # 4 rows over 3 adapters and the base; "c" adapts q only


def with_adapters(model: LoRATransformer, dora: bool = False) -> LoRATransformer:
    """``model`` with parked adapters "a", "b", "c" (random B, "c" on the q projections only; "d" DoRA when
    asked) and "a" active."""
    torch.manual_seed(1)
    for name in ("a", "b", "c"):
        for _, layer in model.lora_layers():
            nn.init.normal_(layer.lora_A, std=0.3)
            nn.init.normal_(layer.lora_B, std=0.3)
        adapter = model.adapters.capture()
        if name == "c":
            layers = {m: s for m, s in adapter.layers.items() if m.endswith("q_proj")}
            adapter = dataclasses.replace(adapter, layers=layers)
        model.adapters.parked[name] = adapter
    if dora:
        adapter = model.adapters.parked["a"]
        layers = {m: dataclasses.replace(s, lora_magnitude=torch.ones(s.lora_B.shape[0]))
                  for m, s in adapter.layers.items()}  # fmt: skip
        model.adapters.parked["d"] = dataclasses.replace(adapter, layers=layers)
    model.set_adapter("a")
    return model.eval()


def gpt2_model() -> LoRATransformer:
    torch.manual_seed(0)
    return with_adapters(LoRATransformer(**TINY, lora_targets=("q", "k", "v", "o"), adapt_feedforward=True))


def single(model: LoRATransformer, name: str, fn):
    """``fn()`` with adapter ``name`` alone (the base for "base")."""
    if name == "base":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


@pytest.fixture(scope="module")
def llama_model(tmp_path_factory):
    folder = make_llama_folder(tmp_path_factory.mktemp("llama") / "base", "llama")
    model = LoRATransformer.from_pretrained(folder, lora_r=4, lora_targets="q,k,v,o,gate,up,down")
    return with_adapters(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_batch_over_4_adapters_equals_the_4_single_runs(family, request, one_thread):
    model = gpt2_model() if family == "gpt2" else request.getfixturevalue("llama_model")
    torch.manual_seed(2)
    idx = torch.randint(0, min(model.config.vocab_size, 50), (4, 6))
    with torch.no_grad(), model.per_row_adapters(NAMES):
        mixed = model(idx)  # (4, 6, vocab)
    for i, name in enumerate(NAMES):
        with torch.no_grad():
            alone = single(model, name, lambda i=i: model(idx[i : i + 1]))
        assert_close_scaled(mixed[i : i + 1], alone, 1e-5, msg=f"row {i} ({name})")
    # the rows really differ: each adapter changes its rows (the test could fail)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-2 and (mixed[3] - mixed[2]).abs().max() > 1e-3
    out = model.generate(idx, 8, temperature=0, adapter_names=NAMES)
    for i, name in enumerate(NAMES):
        alone = single(model, name, lambda i=i: model.generate(idx[i : i + 1], 8, temperature=0))
        assert torch.equal(out[i : i + 1], alone), f"row {i} ({name})"


def test_the_state_is_restored_after_the_block_and_after_an_error(one_thread):
    model = gpt2_model()
    idx = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        before = model(idx)
    with pytest.raises(RuntimeError, match="boom"), model.per_row_adapters(["b", None]):
        assert not model.fused_qkv
        raise RuntimeError("boom")
    assert model.fused_qkv and model.active_adapter == "a"
    assert all(layer._per_row is None for _, layer in model.lora_layers())
    with torch.no_grad():
        assert torch.equal(model(idx), before)


def test_refusals():
    model = gpt2_model()
    idx = torch.randint(0, 50, (2, 5))
    with pytest.raises(
        ValueError, match=r"no adapter named 'x'; the adapters are \['a', 'b', 'c', 'default'\]"
    ):
        model.generate(idx, 2, adapter_names=["a", "x"])
    with pytest.raises(ValueError, match="one adapter per row: 2 rows, 3 names"):
        model.generate(idx, 2, adapter_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="a batch of 3 rows, got 2"), model.per_row_adapters(["a", "b", "c"]):
        model(idx)
    model.merge_lora()
    with pytest.raises(ValueError, match="need an unmerged model"):
        model.generate(idx, 2, adapter_names=["a", "b"])
    model.unmerge_lora()
    dora = with_adapters(LoRATransformer(**TINY, lora_targets=("q", "v")), dora=True)
    with pytest.raises(ValueError, match="adapter 'd' uses DoRA"):
        dora.generate(idx, 2, adapter_names=["a", "d"])
    assert all(layer._per_row is None for _, layer in dora.lora_layers())
    plain = Decoder(ModelConfig(**TINY), LoRAConfig(lora_r=0, lora_targets=()))
    with pytest.raises(ValueError, match="needs a model with an adapter set"):
        plain.generate(idx, 2, adapter_names=["a", "b"])


def test_stream_yields_generate_s_tokens_one_at_a_time():
    model = gpt2_model()
    idx = torch.randint(0, 50, (2, 4))
    steps = list(model.stream(idx, 6, temperature=0))
    assert len(steps) == 6 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), model.generate(idx, 6, temperature=0)[:, 4:])
    eos = int(steps[1][0])  # row 0 stops at its second token; row 1 continues with EOS once done
    out = model.generate(idx, 6, temperature=0, eos_token_id=eos)
    streamed = torch.stack(list(model.stream(idx, 6, temperature=0, eos_token_id=eos)), 1)
    assert torch.equal(streamed, out[:, 4:])
    it = model.stream(idx, 6, temperature=0, adapter_names=["b", "base"])
    next(it)
    assert (
        not model.fused_qkv and torch.is_grad_enabled()
    )  # between steps: per-row mode, gradients as they were
    it.close()
    assert model.fused_qkv and all(layer._per_row is None for _, layer in model.lora_layers())


def script(name: str):
    return load_script(name)


def test_generate_batched_answers_as_one_adapter_at_a_time(tmp_path, one_thread):
    """generate.py --batched: the base and two adapters in one mixed batch, each answer as it is alone."""
    byte = {**TINY, "vocab_size": 260}
    torch.manual_seed(0)
    LoRATransformer(**byte, lora_r=0).save_pretrained(tmp_path / "base")
    for name, opts in (("a", {}), ("b", {"lora_r": 4, "lora_targets": "q,k,v,o", "adapt_feedforward": True})):
        model = LoRATransformer.from_pretrained(tmp_path / "base", **opts)
        with torch.no_grad():
            for _, layer in model.lora_layers():
                layer.lora_B.normal_(std=0.3)
        model.save_adapter(tmp_path / name)
    gen = script("generate")
    argv = ["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "a"), "--adapter", str(tmp_path / "b"),
            "--prompt", "héllo", "--max_new_tokens", "10", "--temperature", "0"]  # fmt: skip
    one_at_a_time = gen.run(gen.parse_args(argv))
    assert gen.run(gen.parse_args([*argv, "--batched"])) == one_at_a_time
    assert [label for label, _ in one_at_a_time] == [
        "base",
        f"adapter {tmp_path / 'a'}",
        f"adapter {tmp_path / 'b'}",
    ]
    assert len({text for _, text in one_at_a_time}) == 3  # the adapters change the answer


def test_a_bad_flag_of_the_chat_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        script("chat").main(["--no-such-option"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.endswith("(see --help)\n"), err
