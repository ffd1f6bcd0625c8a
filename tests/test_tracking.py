"""Following a run (lora/tracking.py): ``--log_to tensorboard`` writes event files that TensorBoard's own reader
loads with the run's numbers, a resumed run's steps shown once, the gradient norm the one the step clipped;
without the package the run is refused before anything is written; history.csv holds history.json's rows."""

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora.config import resolve_config
from lora.errors import ConfigError
from lora.lora_transformer import LoRATransformer
from lora.tracking import history_csv, settings_table
from lora.train_lora import main as train
from lora.trainer import LoRATrainer, get_lr
from tests.conftest import ON_BASE_FLAGS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
FLOAT32 = 1e-6  # TensorBoard keeps scalars as float32: 2**-24 of the value, rounded up


def events(run: Path) -> EventAccumulator:
    """The run's TensorBoard events, every one of them (no sampling), read by TensorBoard's own reader."""
    found = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    return found.Reload()


def scalars(found: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    points = found.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


def assert_float32_close(actual: list[float], expected: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), rtol=FLOAT32, atol=0)  # fmt: skip


@pytest.fixture(scope="module")
def tracked(base, tmp_path_factory) -> Path:
    """A tiny rot13 run on the random base with --log_to tensorboard (12 steps, evaluated every 4)."""
    out = tmp_path_factory.mktemp("tracked")
    argv = [*ON_BASE_FLAGS, "--base_checkpoint", str(base), "--output_dir", str(out), "--run_name", "tb",
            "--log_to", "tensorboard"]  # fmt: skip
    assert train(argv) == 0
    return out / "tb"


def test_the_event_files_hold_the_run_s_losses_learning_rates_and_evaluations(tracked):
    history = json.loads((tracked / "history.json").read_text())
    found = events(tracked)
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "val/loss",
            "val/exact_match"} <= set(found.Tags()["scalars"])  # fmt: skip
    steps, losses = scalars(found, "train/loss")
    assert steps == history["step"] == list(range(1, 13))
    assert_float32_close(losses, history["train_loss"])
    assert_float32_close(scalars(found, "train/learning_rate")[1], history["lr"])
    assert_float32_close(scalars(found, "train/tokens_per_s")[1], history["tokens_per_s"])
    steps, norms = scalars(found, "train/grad_norm")
    assert steps == history["step"] and all(n > 0 for n in norms)
    evaluated = [i for i, v in enumerate(history["val_loss"]) if v is not None]
    assert [history["step"][i] for i in evaluated] == [4, 8, 12]
    steps, val = scalars(found, "val/loss")
    assert steps == [4, 8, 12]
    assert_float32_close(val, [history["val_loss"][i] for i in evaluated])
    assert_float32_close(scalars(found, "val/exact_match")[1], [history["metric"][i] for i in evaluated])
    # the resolved settings as a Markdown table, the one of config.yaml's values
    (text,) = found.Tensors("settings/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert "| learning_rate | 0.003 |" in table and "| log_to | tensorboard |" in table
    assert table.count("\n") + 1 == 2 + len(resolve_config().to_dict())


def test_history_csv_holds_history_json_s_rows(tracked):
    history = json.loads((tracked / "history.json").read_text())
    with open(tracked / "history.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(history)
    assert len(rows) == 1 + len(history["step"]) == 13
    for i, row in enumerate(rows[1:]):
        for key, cell in zip(rows[0], row, strict=True):
            value = history[key][i]
            expected = "" if value is None else value
            read = cell if cell == "" else (int(cell) if key == "step" else float(cell))
            assert read == expected, (i, key, cell, value)  # exactly: both are the float's repr
    assert sum(cell != "" for cell in (row[rows[0].index("val_loss")] for row in rows[1:])) == 3


def test_history_csv_of_a_hand_made_history():
    history = {"step": [1, 2], "train_loss": [0.1, 2.5], "val_loss": [None, 1 / 3]}
    assert history_csv(history) == f"step,train_loss,val_loss\n1,0.1,\n2,2.5,{1 / 3!r}\n"
    with pytest.raises(ValueError, match="differ in length"):
        history_csv({"step": [1, 2], "train_loss": [0.1]})
    assert settings_table({"lora_targets": ["q", "v"], "run_name": "a|b"}).splitlines()[2:] == [
        "| lora_targets | q,v |", "| run_name | a\\|b |"]  # fmt: skip


def test_a_resumed_run_logs_each_step_once(flags, tmp_path):
    """Trained to step 6 (checkpoints at 3 and 6), then resumed from step 3's checkpoint to step 8: TensorBoard
    shows steps 1 ... 8 once each (the first session's 4 ... 6 purged), with the resumed history's losses. The
    resumed run takes log_to from the run's config.yaml (the YAML key)."""
    tracked = ["--log_to", "tensorboard", "--save_every", "3"]
    assert train([*flags, *tracked, "--run_name", "r", "--max_steps", "6"]) == 0
    run = tmp_path / "runs" / "r"
    first = json.loads((run / "history.json").read_text())
    assert train(["--resume", str(run / "checkpoint-0000003.safetensors"), "--max_steps", "8"]) == 0
    history = json.loads((run / "history.json").read_text())
    assert history["step"] == list(range(1, 9))
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    found = events(run)
    steps, losses = scalars(found, "train/loss")
    assert steps == history["step"]
    assert_float32_close(losses, history["train_loss"])
    # an exact resume: steps 4 ... 6 trained again have the first session's losses (only a count shows twice)
    torch.testing.assert_close(history["train_loss"][:6], first["train_loss"], rtol=1e-5, atol=0)
    assert scalars(found, "val/loss")[0] == [4, 8]
    assert [e.step for e in found.Tensors("settings/text_summary")] == [0, 3]  # each session's settings


def test_the_logged_gradient_norm_is_the_step_s_before_clipping(tmp_path):
    """The Python API: a LoRATrainer with log_to and run_dir logs, at step 1, the L2 norm of the gradient of
    the first batch's mean loss over the trainable tensors, computed here by hand (before clipping to 1e-3)."""
    torch.manual_seed(0)
    model = LoRATransformer(64, d_model=16, num_heads=2, num_layers=1, max_seq_len=8, lora_r=2, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)  # a B that is not 0: A's gradient is not 0 either
    g = torch.Generator().manual_seed(1)
    batches = [(x, torch.roll(x, -1, 1)) for x in torch.randint(0, 64, (3, 4, 8), generator=g)]
    reference = copy.deepcopy(model)
    reference.configure_lora_training()
    x, y = batches[0]
    F.cross_entropy(reference(x).reshape(-1, 64), y.reshape(-1)).backward()
    trained = [p.grad for p in reference.parameters() if p.requires_grad]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in trained])).item()
    trainer = LoRATrainer(model, batches, batches[:1], max_steps=3, eval_every=3, warmup_steps=0, grad_clip=1e-3,
                          device="cpu", run_dir=tmp_path, log_to="tensorboard", quiet=True)  # fmt: skip
    trainer.train()
    found = events(tmp_path)
    steps, norms = scalars(found, "train/grad_norm")
    assert steps == [1, 2, 3] and expected > 1e-2
    assert norms[0] == pytest.approx(expected, rel=1e-5)
    assert_float32_close(scalars(found, "train/learning_rate")[1], [get_lr(s, 3e-3, 0, 3) for s in (1, 2, 3)])
    assert_float32_close(scalars(found, "val/loss")[1], [trainer.history["val_loss"][-1]])
    assert scalars(found, "val/bits_per_byte")[0] == [3]


def test_log_to_is_checked_and_needs_a_run_folder(tmp_path):
    assert resolve_config({"log_to": "tensorboard"}).log_to == "tensorboard"
    with pytest.raises(ConfigError, match="log_to must be one of none, tensorboard, got 'wandb'"):
        resolve_config(overrides={"log_to": "wandb"})
    with pytest.raises(ConfigError, match="log_to must be str"):
        resolve_config({"log_to": 1})
    model = LoRATransformer(64, d_model=16, num_heads=2, num_layers=1, max_seq_len=8, lora_r=2, dropout=0.0)
    batches = [(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))]
    with pytest.raises(ValueError, match="log_to tensorboard writes into the run folder: give run_dir"):
        LoRATrainer(model, batches, batches, max_steps=1, device="cpu", log_to="tensorboard")


def test_bad_log_to_on_the_command_line_is_one_line(flags, tmp_path, capsys):
    assert train([*flags, "--log_to", "wandb"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "log_to must be one of none, tensorboard, got 'wandb'" in err, err
    assert not (tmp_path / "runs").exists()


def test_without_the_tensorboard_package_the_run_is_refused_before_anything_is_written(flags, tmp_path):
    """The package hidden (``sys.modules['tensorboard'] = None``: its import fails, as when not installed): exit
    2, one line that says what to install, and no output folder."""
    hide = "import sys; sys.modules['tensorboard'] = None; from lora.train_lora import main; sys.exit(main())"
    res = subprocess.run([sys.executable, "-c", hide, *flags, "--log_to", "tensorboard"], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert "log_to tensorboard needs the tensorboard package, which is not installed: pip install " \
           "'lora-transformer[tensorboard]'" in res.stderr  # fmt: skip
    assert not (tmp_path / "runs").exists()
    # the same command with the package: it runs (so the refusal above was the package's absence)
    assert train([*flags, "--log_to", "tensorboard", "--max_steps", "1", "--eval_every", "1"]) == 0
