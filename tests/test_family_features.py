"""Everything else keeps working on an imported family: DoRA, PiSSA and a 4-bit base, weighted adapters,
classification from JSONL with the pictures, and torchrun, on tiny Llama-layout folders built here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GPT2_TEXT, assert_close_scaled, make_llama_folder, unmerged_and_merged

from lora.files import read_safetensors
from lora.lora_transformer import LoRATransformer
from lora.train_lora import main

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory) -> Path:
    """Qwen3: grouped-query attention, per-head q/k norms, its own head_dim and LM head."""
    return make_llama_folder(tmp_path_factory.mktemp("qwen3") / "tiny-qwen3", "qwen3", head_dim=24)


def one_step(model: LoRATransformer, idx: torch.Tensor) -> None:
    """One AdamW step of the LM loss on ``idx`` over the trainable (LoRA) parameters."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    logits = model(idx[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize(
    "options",
    [{"use_dora": True}, {"lora_init": "pissa"}, {"lora_init": "olora", "use_rslora": True}],
    ids=["dora", "pissa", "olora-rslora"],
)
def test_the_variants_train_merge_exactly_and_round_trip_on_a_family(qwen3_folder, tmp_path, options):
    model = LoRATransformer.from_pretrained(
        qwen3_folder, lora_r=4, lora_targets="q,k,v,o", adapt_feedforward=True, **options
    ).eval()
    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        at_start = model(idx)
        with model.disable_adapter():
            base = model(idx)
    assert_close_scaled(at_start, base, 1e-5)  # every variant starts as the base
    before = model.base_fingerprint()
    model.prepare_training()
    one_step(model, idx)
    assert model.base_fingerprint() == before  # the frozen base bit for bit
    unmerged, merged = unmerged_and_merged(model, idx)
    assert_close_scaled(merged, unmerged, 1e-5)
    assert not torch.allclose(unmerged, at_start, atol=1e-4)  # the step changed the output
    model.save_adapter(tmp_path / "adapter")
    again = LoRATransformer.from_pretrained(qwen3_folder, lora_r=0).eval()
    again.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again(idx), unmerged)


def test_a_4_bit_base_of_a_family_trains_and_keeps_its_fingerprint(tmp_path):
    pytest.importorskip("torchao")
    # widths that tile nf4's blocks of 16,384 (128 x 128, 256 x 128): 4 heads of 32, no sharing
    shape = {"hidden_size": 128, "intermediate_size": 256, "num_key_value_heads": 4, "head_dim": 32}
    folder = make_llama_folder(tmp_path / "tiny-qwen3", "qwen3", **shape)
    model = LoRATransformer.from_pretrained(folder, lora_r=4, adapt_feedforward=True)
    dense = model.base_fingerprint()
    model.prepare_training(storage="nf4")
    assert model.base_quantization == "nf4"
    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        start = model.eval()(idx)
    fingerprint = model.base_fingerprint()
    packed = {
        n: p.quantized_data.clone() for n, p in model.named_parameters() if type(p).__name__ == "NF4Tensor"
    }
    assert len(packed) == 2 * 7
    one_step(model, idx)
    assert (
        model.base_fingerprint() == fingerprint == dense
    )  # the full-precision base's, which it was made from
    for n, p in model.named_parameters():  # the 4-bit codes, bit for bit
        assert n not in packed or torch.equal(p.quantized_data, packed[n]), n
    with torch.no_grad():
        after = model(idx)
        with model.disable_adapter():
            assert_close_scaled(model(idx), start, 1e-5)  # B was 0: the start was the 4-bit base itself
    assert not torch.allclose(after, start, atol=1e-4)


def test_a_weighted_adapter_of_a_family_is_the_weighted_sum_of_updates(qwen3_folder, tmp_path):
    model = LoRATransformer.from_pretrained(
        qwen3_folder, lora_r=2, lora_targets="q,v", adapt_feedforward=True
    )
    model.eval()
    idx = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    for seed, name in ((3, "a"), (4, "b")):  # two adapters saved from the model, loaded back by name
        torch.manual_seed(seed)
        for _, layer in model.lora_layers():
            torch.nn.init.normal_(layer.lora_B, std=0.05)
        model.save_adapter(tmp_path / name)
    for name in ("a", "b"):
        model.load_adapter(tmp_path / name, name)
    updates = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        updates[name] = {n: layer.delta_weight() for n, layer in model.lora_layers()}
    assert not torch.equal(updates["a"]["blocks.0.attn.q_proj"], updates["b"]["blocks.0.attn.q_proj"])
    model.add_weighted_adapter({"a": 0.75, "b": -0.5}, "mix")
    model.set_adapter("mix")
    for n, layer in model.lora_layers():
        want = 0.75 * updates["a"][n] - 0.5 * updates["b"][n]
        assert_close_scaled(layer.delta_weight(), want, 1e-5, msg=n)
    unmerged, merged = unmerged_and_merged(model, idx)
    assert_close_scaled(merged, unmerged, 1e-5)


def test_classification_from_jsonl_on_a_family_trains_and_draws_its_pictures(qwen3_folder, tmp_path):
    pytest.importorskip("tokenizers")
    rows = [{"text": f"{word} is {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
            for i, word in enumerate(GPT2_TEXT.split()[:80])]  # fmt: skip
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = tmp_path / "runs"
    argv = ["--task", "jsonl", "--train_file", str(data), "--base_checkpoint", str(qwen3_folder), "--seq_len", "16",
            "--batch_size", "8", "--max_steps", "6", "--eval_every", "3", "--eval_batches", "1", "--device", "cpu",
            "--learning_rate", "1e-2", "--output_dir", str(runs), "--run_name", "cls"]  # fmt: skip
    assert main(argv) == 0
    run = runs / "cls"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["final_val_loss"] < metrics["base_val_loss"]
    assert metrics["metric_name"] == "accuracy" and metrics["final_metric"] > metrics["base_metric"]
    assert (run / "training_curves.png").read_bytes()[:8] == PNG_MAGIC
    model = LoRATransformer.from_pretrained(qwen3_folder, lora_r=0)
    model.load_adapter(run)
    assert model.cls_head is not None and model.cls_head.out_features == 2


def test_two_processes_on_a_family_train_the_one_process_adapter(tmp_path):
    folder = make_llama_folder(tmp_path / "tiny-llama")
    text = tmp_path / "my.txt"
    text.write_text(GPT2_TEXT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def run(launcher: list[str], batch: int, name: str) -> Path:
        argv = ["--task", "text", "--train_file", str(text), "--base_checkpoint", str(folder), "--seq_len", "16",
                "--batch_size", str(batch), "--max_steps", "3", "--eval_every", "3", "--eval_batches", "1",
                "--device", "cpu", "--adapt_feedforward", "--output_dir", str(tmp_path / "runs"), "--run_name", name]  # fmt: skip
        res = subprocess.run([*launcher, "lora/train_lora.py", *argv], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=180)  # fmt: skip
        assert res.returncode == 0, res.stderr
        return tmp_path / "runs" / name

    one = run([sys.executable], 8, "one")
    two = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], 4, "two"
    )
    x, y = (read_safetensors(f / "adapter_model.safetensors") for f in (one, two))
    assert x.keys() == y.keys() and len(x) == 2 * 5 * 2  # 2 layers x (q, v, gate, up, down) x (A, B)
    for k in x:
        assert_close_scaled(y[k], x[k], 1e-5, msg=k)
    assert not torch.equal(
        x["blocks.0.attn.q_proj.lora_B"], torch.zeros_like(x["blocks.0.attn.q_proj.lora_B"])
    )


def test_the_pictures_of_a_gated_projection_are_drawn(qwen3_folder, tmp_path):
    import importlib.util

    text = tmp_path / "my.txt"
    text.write_text(GPT2_TEXT)
    argv = ["--task", "text", "--train_file", str(text), "--base_checkpoint", str(qwen3_folder), "--seq_len", "16",
            "--batch_size", "8", "--max_steps", "2", "--eval_every", "2", "--eval_batches", "1", "--device", "cpu",
            "--lora_targets", "q,gate,down", "--output_dir", str(tmp_path / "runs"), "--run_name", "gated"]  # fmt: skip
    assert main(argv) == 0
    spec = importlib.util.spec_from_file_location("visualize_lora", ROOT / "scripts" / "visualize_lora.py")
    visualize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(visualize)
    out = tmp_path / "pictures"
    run = tmp_path / "runs" / "gated"
    assert visualize.main(["--run", str(run), "--layer", "1", "--proj", "down", "--out", str(out)]) == 0
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["module"] == "blocks.1.mlp.down_proj"
    assert (out / "weights.png").read_bytes()[:8] == PNG_MAGIC
    assert (
        visualize.main(["--run", str(run), "--proj", "up", "--out", str(out)]) == 2
    )  # not adapted: one line
