"""The training application: CLI end to end, configuration precedence and errors, the trainer."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lora.config import TrainConfig, load_config
from lora.data import BatchLoader, load_task
from lora.lora_transformer import LoRATransformer
from lora.train_lora import LoRATrainer, Trainer, get_lr, main
from tests.conftest import task_flags

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = {"config.yaml", "history.json", "metrics.json", "training_curves.png", "adapter_config.json",
             "adapter_model.safetensors", "samples.txt"}  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_cli_end_to_end_writes_the_run_folder(tiny_flags, tmp_path):
    proc = subprocess.run(
        [sys.executable, "lora/train_lora.py", *tiny_flags, "--run_name", "e2e"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "runs" / "e2e"
    assert RUN_FILES <= {p.name for p in folder.iterdir()}
    assert (folder / "training_curves.png").read_bytes()[:8] == PNG_MAGIC
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("method", "metric_name", "higher_is_better", "base_metric", "final_metric", "total_params",
                "trainable_params", "reduction_factor", "wall_time_s", "tokens_per_s"):  # fmt: skip
        assert key in metrics, key
    assert metrics["method"] == "lora" and metrics["metric_name"] == "exact_match" and metrics["steps"] == 12
    assert metrics["trainable_params"] == 1 * 2 * 8 * (32 + 32)
    assert metrics["total_params"] / metrics["trainable_params"] == pytest.approx(metrics["reduction_factor"])
    history = json.loads((folder / "history.json").read_text())
    assert history["step"] == list(range(1, 13)) and len(history["train_loss"]) == 12
    assert sum(v is not None for v in history["val_loss"]) == 3  # steps 4, 8, 12
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["max_steps"] == 12 and saved["run_name"] == "e2e"
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["lora_r"] == 8 and adapter["lora_targets"] == ["q", "v"] and adapter["base_fingerprint"]
    bases = list((tmp_path / "runs" / "bases").iterdir())
    assert len(bases) == 1 and (bases[0] / "model.safetensors").is_file()
    assert "pretraining" in proc.stderr

    # a second run reuses the base and never overwrites the first run folder
    again = subprocess.run([sys.executable, "-m", "lora.train_lora", *tiny_flags, "--run_name", "e2e"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "(reused)" in again.stderr and "pretraining" not in again.stderr
    assert (tmp_path / "runs" / "e2e-2" / "metrics.json").is_file()
    assert json.loads((folder / "metrics.json").read_text()) == metrics


def test_help_lists_every_flag_with_its_default():
    proc = subprocess.run([sys.executable, "train_lora.py", "--help"], cwd=ROOT / "lora",
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0
    for name in TrainConfig().to_dict():
        assert f"--{name}" in proc.stdout, name
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "LoRA rank r (default: 8)" in text and "of q,k,v,o (default: q,v)" in text


def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_r: 4\nlora_alpha: 8\nlearning_rate: 1e-4\nlora_targets: [q, k]\n")
    cfg = load_config(["--config", str(path), "--lora_alpha", "32"])
    assert cfg.lora_r == 4  # YAML over the default
    assert cfg.lora_alpha == 32.0  # flag over YAML
    assert cfg.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as a string: still a float
    assert cfg.lora_targets == ["q", "k"]
    assert cfg.batch_size == TrainConfig().batch_size  # untouched default
    assert load_config(["--lora_targets", "q,k,v,o", "--adapt_feedforward"]).lora_targets == [
        "q",
        "k",
        "v",
        "o",
    ]
    assert load_config(["--adapt_feedforward"]).adapt_feedforward is True


def test_unknown_key_and_wrong_type_are_one_line_errors(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("lora_rank: 4\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: unknown key 'lora_rank' in {path}; did you mean 'lora_r'?"
    path.write_text("lora_r: four\n")
    assert main(["--config", str(path)]) == 2
    assert "lora_r must be int, got 'four'" in capsys.readouterr().err


def test_get_lr_warmup_then_cosine_to_a_tenth():
    assert get_lr(1, 1.0, 10, 100) == pytest.approx(0.1)
    assert get_lr(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert get_lr(55, 1.0, 10, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert get_lr(100, 1.0, 10, 100) == pytest.approx(0.1)
    assert get_lr(50, 1.0, 0, 100, "constant") == 1.0


def _tiny_trainer(method: str = "lora", **kw) -> Trainer:
    cfg = TrainConfig(num_examples=512, batch_size=32)
    task = load_task(cfg, "caesar")
    torch.manual_seed(0)
    model = LoRATransformer(256, d_model=32, num_heads=2, num_layers=1, max_seq_len=32, dropout=0.0,
                            lora_r=0 if method == "full" else 4)  # fmt: skip
    kind = LoRATrainer if method == "lora" else Trainer
    return kind(model, BatchLoader(task.train, 32), BatchLoader(task.val, 32, shuffle=False),
                learning_rate=1e-2, device="cpu", eval_every=10, metric_name="exact_match", quiet=True, **kw)  # fmt: skip


def test_loss_decreases_on_a_tiny_task():
    trainer = _tiny_trainer("full", max_steps=60, warmup_steps=5)
    before = trainer.evaluate()["val_loss"]
    history = trainer.train()
    after = trainer.evaluate()["val_loss"]
    assert after < 0.5 * before
    assert sum(history["train_loss"][-5:]) < sum(history["train_loss"][:5])
    assert all(math.isfinite(v) for v in history["train_loss"])


def test_method_full_trains_every_parameter(tiny_flags, tmp_path):
    assert main([*tiny_flags, "--method", "full", "--run_name", "full"]) == 0
    folder = tmp_path / "runs" / "full"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["method"] == "full" and metrics["trainable_params"] == metrics["total_params"]
    assert metrics["reduction_factor"] == 1.0
    assert (folder / "model" / "model.safetensors").is_file()


def test_lora_run_leaves_the_base_file_untouched(tiny_flags, tmp_path):
    assert main([*tiny_flags, "--run_name", "a"]) == 0
    base = next((tmp_path / "runs" / "bases").iterdir()) / "model.safetensors"
    before = base.read_bytes(), os.stat(base).st_mtime_ns
    assert main([*tiny_flags, "--run_name", "b", "--max_steps", "3"]) == 0
    assert (base.read_bytes(), os.stat(base).st_mtime_ns) == before


def test_readme_configuration_table_lists_every_key():
    readme = (ROOT / "README.md").read_text()
    for name in TrainConfig().to_dict():
        assert f"| `{name}` / `--{name}` |" in readme, name


def test_own_text_file_language_modelling(tiny_flags, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    assert main([*task_flags(tiny_flags, "text"), "--train_file", str(text), "--run_name", "t"]) == 0
    folder = tmp_path / "runs" / "t"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["metric_name"] == "bits_per_byte" and metrics["higher_is_better"] is False
    assert metrics["final_metric"] < metrics["base_metric"]  # a repetitive text is quickly learned
    assert "--- adapted:" in (folder / "samples.txt").read_text()
    assert (tmp_path / "runs" / "bases").glob("english-*")


def test_own_jsonl_classification(tiny_flags, tmp_path):
    rows = [{"text": f"{'good great fine' if i % 2 else 'bad awful poor'} {i}", "label": ["neg", "pos"][i % 2]}
            for i in range(200)]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    flags = [
        *task_flags(tiny_flags, "jsonl"),
        "--train_file",
        str(data),
        "--run_name",
        "c",
        "--epochs",
        "10",
        "--max_steps",
        "40",
    ]
    assert main(flags) == 0
    folder = tmp_path / "runs" / "c"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["metric_name"] == "accuracy" and metrics["final_metric"] >= 0.9
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["num_classes"] == 2 and adapter["labels"] == ["neg", "pos"]
    assert not (folder / "samples.txt").exists()


def test_evaluate_accepts_a_forward_without_truth_value():
    """torch.compile's wrapper raises on len() (so on bool()); evaluate must not test its truth."""

    class Wrapped:
        def __init__(self, model):
            self.model = model

        def __call__(self, *args, **kwargs):
            return self.model(*args, **kwargs)

        def __len__(self):
            raise TypeError("no len()")

    trainer = _tiny_trainer("lora", max_steps=1)
    trainer.forward = Wrapped(trainer.model)
    assert 0.0 <= trainer.evaluate()["metric"] <= 1.0


def test_default_yaml_is_the_main_job_and_every_config_loads():
    assert load_config(["--config", str(ROOT / "configs" / "default.yaml")]) == TrainConfig()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        needs_data = yaml.safe_load(path.read_text()).get("task") in ("text", "jsonl")
        cfg = load_config(["--config", str(path), *(["--train_file", "x.txt"] if needs_data else [])])
        assert cfg.method in ("lora", "full"), path
