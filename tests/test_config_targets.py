"""LoRA targets per projection: every spelling (ours, PEFT's, the shortcuts) read as one form, a target the
model's family lacks refused before anything is written, and a command-line run adapting exactly its targets."""

import json
import re
from pathlib import Path

import pytest
from conftest import GPT2_TEXT, make_llama_folder

from lora.config import resolve_config
from lora.errors import ConfigError
from lora.lora_transformer import LoRATransformer
from lora.model_config import LoRAConfig, ModelConfig, lora_targets_of, parse_targets
from lora.train_lora import main

pytestmark = pytest.mark.usefixtures("one_thread")
GPT2 = ModelConfig(vocab_size=10, d_model=8, num_heads=2, num_layers=1)
LLAMA = ModelConfig(vocab_size=10, d_model=8, num_heads=2, num_layers=1, norm="rmsnorm", mlp="gated",
                    positions="rotary", bias=False, tied_head=False)  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "targets", "every_mlp"),
    [
        ("q,v", ("q", "v"), False),
        ("v, Q", ("q", "v"), False),  # any order and case, spaces: our order
        (["o", "k", "o"], ("k", "o"), False),
        ("gate,down", ("gate", "down"), False),
        ("up,q", ("q", "up"), False),
        ("fc1", ("fc1",), False),
        ("q_proj,k_proj,v_proj,o_proj", ("q", "k", "v", "o"), False),  # PEFT's Llama names
        ("gate_proj,up_proj,down_proj", (), True),  # a gated MLP's every projection: adapt_feedforward
        ("fc1,fc2", (), True),
        ("c_attn", ("q", "k", "v"), False),  # PEFT's GPT-2 names: c_attn is q, k and v
        ("attn.c_proj,mlp.c_fc", ("o", "fc1"), False),
        ("mlp.c_proj", ("fc2",), False),
        ("qkv_proj,gate_up_proj", ("q", "k", "v", "gate", "up"), False),  # PEFT's Phi-3 names
        ("mlp", (), True),  # the shortcuts
        ("q,mlp,gate", ("q",), True),
        ("all", ("q", "k", "v", "o"), True),
        ("all-linear", ("q", "k", "v", "o"), True),
    ],
)
def test_every_spelling_reads_as_one_form(spec, targets, every_mlp):
    lora = LoRAConfig(lora_targets=spec)
    assert (lora.lora_targets, lora.adapt_feedforward) == (targets, every_mlp)
    assert LoRAConfig.from_dict(lora.to_dict()) == lora


def test_adapt_feedforward_covers_the_mlp_targets():
    lora = LoRAConfig(lora_targets="v,down", adapt_feedforward=True)
    assert (lora.lora_targets, lora.adapt_feedforward) == (("v",), True)
    assert [m for m in LLAMA.projection_shapes() if lora.adapts(m)] == [
        "attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "c_proj",
            "c_proj is GPT-2's name for two projections, attn.c_proj .o. and mlp.c_proj .fc2.: write o or fc2",
        ),
        ("q,x", "lora_targets: unknown target 'x'; the targets are q, k, v, o .attention., gate, up, down"),
        ("gaet", re.escape("did you mean 'gate'?")),
        (["q", 3], "lora_targets must be a list of q, k, v, o"),
    ],
)
def test_unknown_and_ambiguous_targets_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_targets(spec)
    assert "\n" not in str(e.value)


def test_a_target_the_family_lacks_is_refused_naming_what_it_has():
    message = ("lora_targets gate,up: this model has no such projection (its MLP is plain, as GPT-2's (fc1, "
               "fc2)); its targets are q, k, v, o, fc1, fc2, or mlp, all")  # fmt: skip
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        LoRAConfig(lora_targets="q,gate,up").check_family(GPT2)
    with pytest.raises(
        ConfigError, match=r"^lora_targets fc1: .* its targets are q, k, v, o, gate, up, down"
    ):
        LoRAConfig(lora_targets="fc1").check_family(LLAMA)
    LoRAConfig(lora_targets="all").check_family(GPT2)  # the shortcuts fit every family
    LoRAConfig(lora_targets="all").check_family(LLAMA)
    with pytest.raises(ValueError, match="lora_targets gate"):
        LoRATransformer(vocab_size=10, d_model=8, num_heads=2, num_layers=1, lora_targets="gate")


def test_targets_of_modules_and_the_old_form():
    assert lora_targets_of(["blocks.0.attn.q_proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]) == (("q",), True)
    assert lora_targets_of(["blocks.0.mlp.gate_proj", "blocks.0.mlp.down_proj"]) == (("gate", "down"), False)
    # an adapter of the old form (q,k,v,o + adapt_feedforward) records what it always did, however spelled
    for spec in ("q,k,v,o", "all", "q_proj,k_proj,v_proj,o_proj,mlp"):
        saved = LoRAConfig(lora_targets=spec, adapt_feedforward=spec == "q,k,v,o").to_dict()
        assert (saved["lora_targets"], saved["adapt_feedforward"]) == (["q", "k", "v", "o"], True)


def test_train_config_takes_the_one_form():
    cfg = resolve_config(overrides={"lora_targets": "all-linear"})
    assert (cfg.lora_targets, cfg.adapt_feedforward) == (["q", "k", "v", "o"], True)
    cfg = resolve_config(overrides={"lora_targets": "v_proj,gate"})
    assert (cfg.lora_targets, cfg.adapt_feedforward) == (["v", "gate"], False)
    with pytest.raises(ConfigError, match="c_proj is GPT-2's name for two projections"):
        resolve_config(overrides={"lora_targets": "c_proj"})


def test_stats_count_each_projection_of_the_family():
    model = LoRATransformer.from_config(LLAMA, LoRAConfig(lora_r=2, lora_targets="k,up"))
    by = model.configure_lora_training()["lora_params_by_projection"]
    assert by == {"q": 0, "k": 2 * (8 + 8), "v": 0, "o": 0, "gate": 0, "up": 2 * (8 + 32), "down": 0}


# ---------------------------------------------------------------------------------------------------------
# The command line


def run_flags(base: Path, tmp_path: Path, targets: str) -> list[str]:
    text = tmp_path / "my.txt"
    text.write_text(GPT2_TEXT)
    return ["--task", "text", "--train_file", str(text), "--base_checkpoint", str(base), "--seq_len", "16",
            "--batch_size", "4", "--max_steps", "2", "--eval_every", "2", "--eval_batches", "1", "--device", "cpu",
            "--lora_targets", targets, "--output_dir", str(tmp_path / "runs"), "--run_name", "t"]  # fmt: skip


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return make_llama_folder(tmp_path_factory.mktemp("llama") / "tiny-llama")


def test_a_run_adapts_exactly_its_targets(llama_folder, tmp_path):
    pytest.importorskip("tokenizers")
    assert main(run_flags(llama_folder, tmp_path, "gate_proj,down")) == 0
    saved = json.loads((tmp_path / "runs" / "t" / "adapter_config.json").read_text())
    assert (saved["lora_targets"], saved["adapt_feedforward"]) == (["gate", "down"], False)
    assert sorted(saved["modules"]) == [
        f"blocks.{i}.mlp.{p}" for i in (0, 1) for p in ("down_proj", "gate_proj")
    ]
    model = LoRATransformer.from_pretrained(llama_folder, lora_r=0)
    model.load_adapter(tmp_path / "runs" / "t")
    assert sorted(n for n, _ in model.lora_layers()) == sorted(saved["modules"])


@pytest.mark.parametrize("targets", ["q,fc1", "c_fc"])
def test_a_target_the_base_lacks_exits_2_and_writes_nothing(llama_folder, tmp_path, capsys, targets):
    assert main(run_flags(llama_folder, tmp_path, targets)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora_targets fc1: this model has no such projection" in err
    assert "its targets are q, k, v, o, gate, up, down" in err
    assert not (tmp_path / "runs").exists()
