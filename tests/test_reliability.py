"""Fault injection for lora/train_lora.py: bad input, kill -9 and exact resume, SIGINT, NaN, crafted pickles.

Every bad input must end in one ``error: ...`` line naming the problem, exit code 2, no traceback, and no
change to any existing run folder. A run killed at any step and resumed must end bit-for-bit where the
uninterrupted run ends. Runs use a random (not pretrained) tiny base, so nothing here pretrains.
"""

import importlib.util
import json
import multiprocessing
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import lora.train_lora as tl
import lora.trainer as trainer_module
from lora.checkpoint import find_latest, read_trainer_state
from lora.files import file_lock, read_safetensors
from lora.lora_transformer import LoRATransformer
from lora.train_lora import main
from tests.conftest import ON_BASE_FLAGS, TINY_FLAGS, task_flags

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # tiny models: one thread is fastest
HISTORY_KEYS = ("step", "epoch", "train_loss", "val_loss", "metric", "lr")  # all but the timings
PAUSE = 0.05  # seconds the harness sleeps after each step, so that a kill can land at a chosen step

# The CLI with test hooks, run as `python -c HARNESS <flags>`: TEST_STEP_PAUSE prints "step N" after each
# step and sleeps; TEST_DIE_WRITING=N kills the process (SIGKILL) halfway through writing checkpoint N;
# TEST_DIE_MICRO=N kills it in the forward of its N-th training micro-batch.
HARNESS = r"""
import os, signal, sys, time
import lora.train_lora as tl
import lora.trainer as trainer_module
pause = float(os.environ.get("TEST_STEP_PAUSE", "0"))
if pause:
    record = trainer_module.Trainer._record
    def _record(self, *args):
        record(self, *args)
        print(f"step {self.step}", flush=True)
        time.sleep(pause)
    trainer_module.Trainer._record = _record
die = os.environ.get("TEST_DIE_WRITING")
if die:
    fsync = os.fsync
    def _fsync(fd):
        if f"checkpoint-{int(die):07d}" in os.readlink(f"/proc/self/fd/{fd}"):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        fsync(fd)
    os.fsync = _fsync
micro = os.environ.get("TEST_DIE_MICRO")
if micro:  # SIGKILL in the forward of training micro-batch N (counted from this process's start)
    import torch
    real, calls = trainer_module.batch_loss, [0]
    def batch_loss(*args, **kwargs):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == int(micro):
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    trainer_module.batch_loss = batch_loss
sys.exit(tl.main())
"""

# several epochs of 3 batches, ending mid-epoch; dropout everywhere so that restoring the RNG matters
RESUME_FLAGS = ["--num_examples", "96", "--epochs", "5", "--max_steps", "14", "--eval_every", "3",
                "--save_every", "1", "--keep_checkpoints", "3", "--lora_dropout", "0.1", "--dropout", "0.1"]  # fmt: skip
pytestmark = pytest.mark.usefixtures("one_thread")


class Evil:
    """Unpickling this creates the file ``path``: the payload a crafted checkpoint would carry."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, base) -> Path:
    """A finished run folder (adapter, two checkpoints) that the bad inputs below must leave alone."""
    root = tmp_path_factory.mktemp("finished") / "runs"
    assert main([*ON_BASE_FLAGS, "--output_dir", str(root), "--base_checkpoint", str(base), "--run_name", "done",
                 "--save_every", "4"]) == 0  # fmt: skip
    return root / "done"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys, *needles: str, alone: bool = True) -> str:
    """The error line; ``alone``: it is all of stderr (else the last line, after progress messages)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum("error" in line for line in lines) == 1, err
    if alone:
        assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def at_training_step(monkeypatch, step: int, action) -> None:
    """Make training step ``step`` (of every run from now on, counted together) call ``action(loss)`` and
    use what it returns as that step's loss."""
    real, calls = trainer_module.batch_loss, []

    def patched(*args, **kwargs):
        loss, n, logits = real(*args, **kwargs)
        if torch.is_grad_enabled():  # a training step, not an evaluation
            calls.append(1)
            if len(calls) == step:
                loss = action(loss)
        return loss, n, logits

    monkeypatch.setattr(trainer_module, "batch_loss", patched)


def sigterm(loss: torch.Tensor) -> torch.Tensor:
    os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step still completes
    return loss


def nan(loss: torch.Tensor) -> torch.Tensor:
    return loss * float("nan")


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(folder / "adapter_model.safetensors")


def assert_same_run(folder: Path, reference: Path, note: str = "") -> None:
    """Bit-for-bit the same trainable weights and the same history (timings excepted)."""
    got, want = adapter_tensors(folder), adapter_tensors(reference)
    assert got.keys() == want.keys(), note
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, (note, differ)
    h, r = (json.loads((f / "history.json").read_text()) for f in (folder, reference))
    assert max(r["epoch"]) > 4 and len(r["step"]) == 14  # several epochs, ending mid-epoch
    for key in HISTORY_KEYS:
        assert h[key] == r[key], (note, key)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no traceback, nothing written

CONFIG_CASES = {
    "misspelled key": ("lora_rank: 4\n", [], ["unknown key 'lora_rank'", "did you mean 'lora_r'?", "{yaml}"]),
    "unknown key": ("zzz: 1\n", [], ["unknown key 'zzz'", "{yaml}"]),
    "wrong type int": ("lora_r: 4.5\n", [], ["lora_r must be int, got 4.5"]),
    "wrong type float": ("learning_rate: fast\n", [], ["learning_rate must be float, got 'fast'"]),
    "wrong type list": ("lora_targets: 5\n", [], ["lora_targets must be", "got 5"]),
    "wrong type bool": ("overwrite: maybe\n", [], ["overwrite must be bool, got 'maybe'"]),
    "yaml syntax": ("lora_r: 4\nlora_alpha: [8\n", [], ["YAML syntax error in {yaml}", "line 3"]),
    "yaml tab": ("lora_r: 4\n\tlora_alpha: 8\n", [], ["YAML syntax error in {yaml} line 2"]),
    "empty yaml": ("", [], ["config file {yaml} is empty"]),
    "yaml list": ("- lora_r\n- 4\n", [], ["{yaml} must be a mapping", "list"]),
    "yaml scalar": ("lora_r\n", [], ["{yaml} must be a mapping", "str"]),
    "missing yaml": (None, [], ["config file not found: {yaml}"]),
    "lora_r 0": (None, ["--lora_r", "0"], ["lora_r must be >= 1", "got 0"]),
    "lora_alpha 0": (None, ["--lora_alpha", "0"], ["lora_alpha must be > 0 and finite, got 0.0"]),
    "lora_alpha < 0": ("lora_alpha: -2\n", [], ["lora_alpha must be > 0 and finite, got -2.0"]),
    "lora_dropout 1": (None, ["--lora_dropout", "1"], ["lora_dropout must be in [0, 1), got 1.0"]),
    "lora_dropout < 0": (None, ["--lora_dropout", "-0.1"], ["lora_dropout must be in [0, 1), got -0.1"]),
    "dropout 1.5": (None, ["--dropout", "1.5"], ["dropout must be in [0, 1), got 1.5"]),
    "learning_rate 0": (None, ["--learning_rate", "0"], ["learning_rate must be > 0, got 0.0"]),
    "learning_rate < 0": ("learning_rate: -1e-3\n", [], ["learning_rate must be > 0, got -0.001"]),
    "epochs 0": (None, ["--epochs", "0"], ["epochs must be >= 1, got 0"]),
    "batch_size 0": (None, ["--batch_size", "0"], ["batch_size must be >= 1, got 0"]),
    "grad_accum_steps 0": (None, ["--grad_accum_steps", "0"], ["grad_accum_steps must be >= 1, got 0"]),
    "grad_accum_steps 1.5": ("grad_accum_steps: 1.5\n", [], ["grad_accum_steps must be int, got 1.5"]),
    "early_stopping_patience -1": (
        None,
        ["--early_stopping_patience", "-1"],
        ["early_stopping_patience must be >= 0 (0: off), got -1"],
    ),
    "early stopping, one evaluation": (
        None,
        ["--early_stopping_patience", "1", "--eval_every", "12"],
        [
            "early_stopping_patience has no effect: --max_steps 12 with --eval_every 12 evaluates 1 time(s)",
            "--eval_every",
        ],
    ),
    "d_model % heads": (None, ["--d_model", "30", "--num_heads", "4"], ["d_model (30)", "num_heads (4)"]),
    "lora_targets": (
        None,
        ["--lora_targets", "q,x"],
        ["lora_targets", "unknown target 'x'", "q, k, v, o (attention)"],
    ),
    "seq_len > max": (
        None,
        ["--task", "text", "--train_file", "t.txt", "--seq_len", "64"],
        ["seq_len (64) must not exceed max_seq_len (32)"],
    ),
    "max_seq_len < cipher": (
        None,
        ["--max_seq_len", "8"],
        ["max_seq_len (8) must be at least 15 for task rot13"],
    ),
    "run_name /": (None, ["--run_name", "a/b"], ["run_name", "'a/b'"]),
    "run_name \\": (None, ["--run_name", "a\\b"], ["run_name", "'a\\\\b'"]),
    "run_name ..": (None, ["--run_name", ".."], ["run_name", "'..'"]),
    "flag over bad yaml": ("lora_r: 0\n", ["--lora_alpha", "0"], ["lora_r must be >= 1"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=list(CONFIG_CASES))
def test_bad_configuration_is_one_line_exit_2(case, tiny_flags, tmp_path, capsys):
    text, extra, needles = CONFIG_CASES[case]
    yaml_path = tmp_path / "config.yaml"
    if text is not None:
        yaml_path.write_text(text)
    config = ["--config", str(yaml_path)] if text is not None or case == "missing yaml" else []
    assert main([*tiny_flags, *config, *extra]) == 2
    one_error_line(capsys, *(n.format(yaml=yaml_path) for n in needles))
    assert not (tmp_path / "runs").exists()  # nothing written


DATA_CASES = {  # name: (task, file content or None for a missing file, expected parts of the message)
    "missing text": ("text", None, ["data file not found: {path}"]),
    "empty text": ("text", b"  \n\n", ["data file is empty: {path}"]),
    "binary text": ("text", b"line one\nline two\n\x00\x01\x02", ["{path} line 3", "binary"]),
    "latin-1 text": (
        "text",
        "ok\nstill ok\ncaf\u00e9\n".encode("latin-1"),
        ["{path} line 3", "not UTF-8", "0xe9"],
    ),
    "too little text": ("text", b"just a few words\n", ["{path}", "too little", "seq_len 16"]),
    "jsonl bad json": (
        "jsonl",
        b'{"text": "a", "label": 0}\n{"text": "b", "label": 1\n',
        ["{path} line 2", "invalid JSON"],
    ),
    "jsonl not object": (
        "jsonl",
        b'{"text": "a", "label": 0}\n[1, 2]\n',
        ["{path} line 2", '"text" and "label"'],
    ),
    "jsonl no label": (
        "jsonl",
        b'{"text": "a", "label": 0}\n\n{"text": "b"}\n',
        ["{path} line 3", '"label"'],
    ),
    "jsonl text type": ("jsonl", b'{"text": 7, "label": 0}\n', ["{path} line 1", '"text" must be a string']),
    "jsonl label list": (
        "jsonl",
        b'{"text": "a", "label": [1]}\n',
        ["{path} line 1", '"label" must be', "[1]"],
    ),
    "jsonl label bool": ("jsonl", b'{"text": "a", "label": true}\n', ["{path} line 1", "True"]),
    "jsonl label float": ("jsonl", b'{"text": "a", "label": 0.5}\n', ["{path} line 1", "0.5"]),
    "jsonl mixed labels": (
        "jsonl",
        b'{"text": "a", "label": 0}\n{"text": "b", "label": "x"}\n',
        ["{path} line 2", "same type"],
    ),
    "jsonl < one batch": (
        "jsonl",
        b"".join(b'{"text": "t%d", "label": %d}\n' % (i, i % 2) for i in range(10)),
        ["fewer than one batch", "batch_size 32"],
    ),
}


@pytest.mark.parametrize("case", DATA_CASES, ids=list(DATA_CASES))
def test_bad_data_is_one_line_exit_2(case, tiny_flags, tmp_path, capsys):
    task, content, needles = DATA_CASES[case]
    path = tmp_path / ("data.txt" if task == "text" else "data.jsonl")
    if content is not None:
        path.write_bytes(content)
    assert main([*task_flags(tiny_flags, task), "--train_file", str(path)]) == 2
    one_error_line(capsys, *(n.format(path=path) for n in needles))
    assert not (tmp_path / "runs").exists()


def test_data_smaller_than_one_batch_and_a_folder_as_data(tiny_flags, tmp_path, capsys):
    assert main([*tiny_flags, "--num_examples", "10"]) == 2
    one_error_line(capsys, "task rot13 has 10 sequences, fewer than one batch (batch_size 32)")
    assert main([*tiny_flags, "--num_examples", "100", "--grad_accum_steps", "4"]) == 2
    one_error_line(
        capsys, "task rot13 has 100 sequences, fewer than one batch (batch_size 32 x grad_accum_steps 4)"
    )
    assert main([*task_flags(tiny_flags, "text"), "--train_file", str(tmp_path)]) == 2
    one_error_line(capsys, f"data file is a folder, expected a file: {tmp_path}")


def test_usage_errors_are_one_line_exit_2(tiny_flags, capsys):
    for argv, needle in ((["--lora_r", "four"], "argument --lora_r: invalid int value: 'four'"),
                         (["--lora_rank", "4"], "unrecognized arguments: --lora_rank 4; did you mean --lora_r?"),
                         (["--lora_alpha"], "argument --lora_alpha: expected one argument")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main([*tiny_flags, *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("train_lora.py: error: ") and needle in err, err


def test_a_missing_device_is_one_line_exit_2(tiny_flags, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*tiny_flags, "--device", "cuda"]) == 2
    one_error_line(capsys, "device cuda", "no CUDA GPU is available", "--device cpu")
    assert not (tmp_path / "runs").exists()


def test_an_output_folder_that_cannot_be_written(flags, tiny_flags, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("mkdir under me fails, even for root\n")
    assert main([*flags, "--output_dir", str(blocker / "runs")]) == 2
    one_error_line(capsys, f"cannot create the folder {blocker / 'runs'}: {blocker} exists and is not a folder",
                   alone=False)  # fmt: skip
    # without a base yet: refused before minutes of pretraining, not after
    assert main([*tiny_flags, "--output_dir", str(blocker / "runs")]) == 2
    one_error_line(
        capsys, f"cannot create the folder {blocker / 'runs'}: {blocker} exists and is not a folder"
    )


def test_a_write_failing_mid_run_is_one_line_and_keeps_the_checkpoints(flags, tmp_path, capsys, monkeypatch):
    replace = os.replace

    def disk_full(src, dst):
        if "checkpoint-0000006" in str(dst):
            raise OSError(28, "No space left on device", str(src))
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full)
    assert main([*flags, "--run_name", "full-disk", "--save_every", "2", "--keep_checkpoints", "5"]) == 1
    one_error_line(capsys, "No space left on device", alone=False)
    folder = tmp_path / "runs" / "full-disk"
    assert sorted(p.name for p in folder.glob("*checkpoint*")) == [
        "checkpoint-0000002.safetensors",
        "checkpoint-0000004.safetensors",
    ]
    monkeypatch.undo()
    assert main(["--resume", str(folder)]) == 0  # the space is back: the run continues from step 4
    assert json.loads((folder / "history.json").read_text())["step"] == list(range(1, 13))


# ---------------------------------------------------------------------------------------------------------
# Bad files: checkpoints, bases, adapters


def test_bad_checkpoints_are_one_line_and_damage_nothing(finished, tmp_path, capsys):
    before = snapshot(finished)
    good = find_latest(finished).read_bytes()
    truncated, garbage = tmp_path / "cut.safetensors", tmp_path / "junk.safetensors"
    truncated.write_bytes(good[: len(good) * 2 // 3])
    garbage.write_bytes(b"\xff" * 8 + good[8:])
    cases = [
        (["--resume", str(tmp_path / "nope.safetensors")], ["checkpoint not found", "nope.safetensors"]),
        (["--resume", str(tmp_path)], [f"no checkpoint to resume from in {tmp_path}"]),
        (["--resume", str(truncated)], [str(truncated), "truncated or corrupted"]),
        (["--resume", str(garbage)], [str(garbage), "truncated or corrupted"]),
        (["--resume", str(finished / "adapter_model.safetensors")], ["is not a training checkpoint"]),
    ]
    for argv, needles in cases:
        assert main(argv) == 2, argv
        one_error_line(capsys, *needles)
    # resuming with settings that would train something else: refused before anything is loaded
    for flag, value, was in (
        ("--lora_r", "4", "8"),
        ("--task", "atbash", "'rot13'"),
        ("--learning_rate", "0.1", "0.003"),
    ):
        assert main(["--resume", str(finished), flag, value]) == 2
        one_error_line(capsys, f"--resume {finished} was trained with {flag[2:]} {was}", f"drop {flag}")
    # a --max_steps below the checkpoint's step would train nothing and rewrite the outputs
    at = read_trainer_state(find_latest(finished))["step"]
    assert main(["--resume", str(finished), "--max_steps", str(at - 1)]) == 2
    one_error_line(capsys, f"it is at step {at}, past --max_steps {at - 1}: give a larger --max_steps")
    # a checkpoint taken out of its run folder: its settings cannot be checked, so refused before anything
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(find_latest(finished), alone)
    assert main(["--resume", str(alone), "--task", "atbash"]) == 2
    one_error_line(capsys, "no config.yaml beside it", "cannot be checked")
    assert sorted(p.name for p in alone.iterdir()) == [find_latest(finished).name]
    # a checkpoint whose run folder was hand-edited to another shape: refused when loading
    edited = tmp_path / "edited"
    shutil.copytree(finished, edited)
    (edited / "config.yaml").write_text(
        (edited / "config.yaml").read_text().replace("lora_r: 8", "lora_r: 4")
    )
    assert main(["--resume", str(edited)]) == 2
    one_error_line(capsys, "q_proj.lora_A (8, 32) (expected (4, 32))", alone=False)
    # a checkpoint resumed on another base (same shapes, other weights: the base folder was replaced)
    fingerprint = json.loads((finished / "adapter_config.json").read_text())["base_fingerprint"]
    assert read_trainer_state(find_latest(finished))["base_fingerprint"] == fingerprint
    torch.manual_seed(1)
    other = tmp_path / "other-base"
    LoRATransformer(256, d_model=32, num_heads=2, num_layers=1, max_seq_len=32, lora_r=0).save_pretrained(
        other
    )
    moved = tmp_path / "moved"
    shutil.copytree(finished, moved)
    config = (moved / "config.yaml").read_text()
    base_line = next(line for line in config.splitlines() if line.startswith("base_checkpoint:"))
    (moved / "config.yaml").write_text(config.replace(base_line, f"base_checkpoint: {other}"))
    assert main(["--resume", str(moved)]) == 2
    one_error_line(capsys, "was trained on other base weights", f"fingerprint {fingerprint}", alone=False)
    assert snapshot(finished) == before
    assert sorted(p.name for p in finished.parent.glob("[!.]*")) == ["done"]


def test_later_errors_damage_no_run_folder(finished, base, capsys, monkeypatch):
    """Even with --overwrite, a run that stops on bad input leaves the existing folder as it was."""
    before = snapshot(finished)
    same = [*ON_BASE_FLAGS, "--output_dir", str(finished.parent), "--run_name", "done", "--overwrite"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, needle in (
        ([*same, "--base_checkpoint", str(base.parent / "missing")], "base checkpoint not found"),
        ([*same, "--base_checkpoint", str(base), "--lora_alpha", "0"], "lora_alpha must be > 0"),
        ([*same, "--base_checkpoint", str(base), "--device", "cuda"], "device cuda"),
        (["--resume", str(finished), "--task", "text", "--train_file", "missing.txt"], "data file not found"),
        (["--resume", str(finished), "--device", "cuda"], "device cuda"),
    ):
        assert main(argv) == 2
        one_error_line(capsys, needle, alone=False)
        assert snapshot(finished) == before, argv
        assert sorted(p.name for p in finished.parent.glob("[!.]*")) == ["done"]


def test_bad_base_models_are_one_line_exit_2(base, flags, tmp_path, capsys):
    import shutil

    def broken(name: str, file: str, data: bytes) -> Path:
        folder = tmp_path / name
        shutil.copytree(base, folder)
        (folder / file).write_bytes(data)
        return folder

    weights = (base / "model.safetensors").read_bytes()
    cases = {
        "truncated": (broken("cut", "model.safetensors", weights[:-100]), "not a readable safetensors file"),
        "garbage": (broken("junk", "model.safetensors", os.urandom(64)), "not a readable safetensors file"),
        "bad json": (broken("json", "config.json", b"{not json"), "not valid JSON"),
        "other shape": (
            broken(
                "shape",
                "config.json",
                (base / "config.json").read_bytes().replace(b'"d_model": 32', b'"d_model": 64'),
            ),
            "model.safetensors",
        ),
    }
    for name, (folder, needle) in cases.items():
        assert main([*flags, "--base_checkpoint", str(folder)]) == 2, name
        one_error_line(capsys, "cannot load the base model", str(folder), needle, alone=False)
    assert main([*flags, "--base_checkpoint", str(tmp_path / "none")]) == 2
    one_error_line(capsys, f"base checkpoint not found: {tmp_path / 'none'}")
    # a base shorter than the data's sequences: caught by the plan, before the data are read
    text = tmp_path / "t.txt"
    text.write_text("some words of English text. " * 200)
    argv = [*task_flags(flags, "text"), "--train_file", str(text)]
    assert main([*argv, "--seq_len", "48"]) == 2
    one_error_line(capsys, "seq_len 48 exceeds the base model's max_seq_len 32", alone=False)
    assert not (tmp_path / "runs").exists()


def generate_script():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_bad_adapters_are_one_line_exit_2(finished, base, tmp_path, capsys):
    import shutil

    generate = generate_script()

    def adapter_copy(name: str, file: str | None = None, data: bytes = b"") -> Path:
        folder = tmp_path / name
        shutil.copytree(finished, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
        if file:
            (folder / file).write_bytes(data)
        return folder

    weights = (finished / "adapter_model.safetensors").read_bytes()
    torch.manual_seed(1)
    other_base = tmp_path / "other-base"  # same shapes, other weights
    LoRATransformer(256, d_model=32, num_heads=2, num_layers=1, max_seq_len=32, lora_r=0).save_pretrained(
        other_base
    )
    wide_base = tmp_path / "wide-base"  # another architecture
    LoRATransformer(256, d_model=64, num_heads=2, num_layers=1, max_seq_len=32, lora_r=0).save_pretrained(
        wide_base
    )
    cases = [
        (base, tmp_path / "no-adapter", "no such adapter folder"),
        (
            base,
            adapter_copy("cut", "adapter_model.safetensors", weights[: len(weights) // 2]),
            "not a readable",
        ),
        (base, adapter_copy("junk", "adapter_config.json", b"\x00\xff"), "not valid JSON"),
        (other_base, finished, "other base weights"),
        (wide_base, finished, "another architecture"),
    ]
    for base_folder, adapter, needle in cases:
        assert generate(["--base", str(base_folder), "--adapter", str(adapter), "--prompt", "ab",
                         "--max_new_tokens", "2"]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("generate.py: error: "), err
        assert needle in err, (needle, err)


# ---------------------------------------------------------------------------------------------------------
# Security: a crafted pickle is never executed


def test_crafted_pickles_are_refused_unexecuted(finished, base, flags, tmp_path, capsys):
    import shutil

    marker = tmp_path / "PWNED"
    payloads = {"pickle": pickle.dumps(Evil(marker))}
    torch.save({"weights": Evil(marker)}, tmp_path / "evil.pt")  # what torch.load(weights_only=False) runs
    payloads["torch"] = (tmp_path / "evil.pt").read_bytes()
    for kind, payload in payloads.items():
        checkpoint = tmp_path / f"{kind}.safetensors"
        checkpoint.write_bytes(payload)
        assert main(["--resume", str(checkpoint)]) == 2
        one_error_line(capsys, str(checkpoint), "truncated or corrupted")

        run = tmp_path / f"run-{kind}"  # a real run folder whose newest checkpoint is the payload
        shutil.copytree(finished, run)
        (run / "checkpoint-9999999.safetensors").write_bytes(payload)
        assert main(["--resume", str(run)]) == 2
        one_error_line(capsys, "checkpoint-9999999.safetensors", "truncated or corrupted")

        evil_base = tmp_path / f"base-{kind}"
        shutil.copytree(base, evil_base)
        (evil_base / "model.safetensors").write_bytes(payload)
        assert main([*flags, "--base_checkpoint", str(evil_base)]) == 2
        one_error_line(capsys, "cannot load the base model", "not a readable safetensors file", alone=False)

        adapter = tmp_path / f"adapter-{kind}"
        shutil.copytree(finished, adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
        (adapter / "adapter_model.safetensors").write_bytes(payload)
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            LoRATransformer.from_pretrained(base).load_adapter(adapter)
        assert generate_script()(["--base", str(base), "--adapter", str(adapter), "--prompt", "a",
                                  "--max_new_tokens", "2"]) == 2  # fmt: skip
        assert "not a readable safetensors file" in capsys.readouterr().err
    assert not marker.exists()
    pickle.loads(payloads["pickle"])  # the payload is live: unpickling it does create the file
    assert marker.exists()


def test_no_code_path_unpickles():
    """Nothing in the package or the scripts uses pickle, an unsafe YAML loader or a full torch.load."""
    for path in [*(ROOT / "lora").glob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        source = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(pickle|dill|cloudpickle|marshal)\b", source, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            assert "weights_only=True" in call, (path, call)
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(", source), path
        assert "eval(" not in source.replace(".eval(", "") and "exec(" not in source, path


# ---------------------------------------------------------------------------------------------------------
# Divergence


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    flags, tmp_path, capsys, monkeypatch
):
    at_training_step(monkeypatch, 5, nan)
    assert main([*flags, "--run_name", "nan", "--save_every", "2"]) == 3
    line = one_error_line(capsys, "loss is nan at step 5", alone=False)
    folder = tmp_path / "runs" / "nan"
    assert f"the last good checkpoint is {folder / 'checkpoint-0000004.safetensors'}" in line
    assert find_latest(folder).name == "checkpoint-0000004.safetensors"
    assert not (folder / "adapter_model.safetensors").exists()  # no diverged weights written as the result
    monkeypatch.undo()
    assert main(["--resume", str(folder)]) == 0  # and that checkpoint is good


def test_a_non_finite_gradient_stops_even_without_clipping(flags, tmp_path, capsys, monkeypatch):
    real, calls = trainer_module.batch_loss, []

    def nan_gradient_at_step_3(forward, *args, **kwargs):
        loss, n, logits = real(forward, *args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:  # a finite loss whose gradient is 0 * inf = nan
                p = next(p for p in forward.parameters() if p.requires_grad)
                loss = loss + 0 * torch.sqrt(p.sum() - p.sum())
        return loss, n, logits

    monkeypatch.setattr(trainer_module, "batch_loss", nan_gradient_at_step_3)
    assert main([*flags, "--run_name", "nan-grad", "--save_every", "1", "--grad_clip", "0"]) == 3
    one_error_line(capsys, "gradient norm is nan at step 3", "checkpoint-0000002", alone=False)
    latest = find_latest(tmp_path / "runs" / "nan-grad")
    assert latest.name == "checkpoint-0000002.safetensors"
    tensors = read_safetensors(latest)
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith(("model.", "optim.")))


# ---------------------------------------------------------------------------------------------------------
# Kill -9, SIGINT and exact resume (subprocesses)


def start(argv: list[str], log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HARNESS, *argv], cwd=ROOT, env={**ENV, **env},
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)  # fmt: skip


def wait_for_step(proc: subprocess.Popen, step: int, log: Path) -> None:
    for line in proc.stdout:
        if line.strip() == f"step {step}":
            return
    proc.wait()
    raise AssertionError(
        f"the run ended (rc {proc.returncode}) before step {step}:\n{log.read_text()[-2000:]}"
    )


def finish(proc: subprocess.Popen, log: Path, expected: int) -> None:
    proc.stdout.read()
    assert proc.wait(timeout=120) == expected, log.read_text()[-2000:]


def uninterrupted(tmp_path_factory, base: Path, folder: str, flags: list[str]) -> Path:
    """The run with ``flags`` on ``base``, not interrupted: what the interrupted ones must reproduce."""
    root = tmp_path_factory.mktemp(folder)
    argv = [
        *ON_BASE_FLAGS,
        *flags,
        "--output_dir",
        str(root),
        "--base_checkpoint",
        str(base),
        "--run_name",
        "ref",
    ]
    finish(start(argv, root / "log"), root / "log", 0)
    return root / "ref"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base) -> Path:
    """The uninterrupted run that every interrupted one must reproduce."""
    return uninterrupted(tmp_path_factory, base, "reference", RESUME_FLAGS)


def test_kill_9_at_random_steps_then_resume_is_bit_exact(reference, flags, tmp_path):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    first, second, third = sorted(rng.sample(range(2, 13), 3))  # of 14 steps, 3 per epoch
    delays = rng.uniform(0, PAUSE), rng.uniform(0, PAUSE)
    note = f"seed {seed}: kills at steps {first} (mid-write), {second}, {third}"
    folder, log = tmp_path / "runs" / "killed", tmp_path / "log"
    argv = [*flags, *RESUME_FLAGS, "--run_name", "killed"]

    # 1. killed halfway through writing checkpoint `first`: the previous one stays whole and loadable
    finish(start(argv, log, TEST_DIE_WRITING=str(first)), log, -signal.SIGKILL)
    partial = list(folder.glob(f".checkpoint-{first:07d}.safetensors.*.tmp"))
    assert len(partial) == 1 and not (folder / f"checkpoint-{first:07d}.safetensors").exists(), note
    assert read_trainer_state(find_latest(folder))["step"] == first - 1, note

    # 2.-3. kill -9 from outside, a random moment after steps `second` and `third` (mid-step, mid-write...)
    for step, delay in ((second, delays[0]), (third, delays[1])):
        proc = start(["--resume", str(folder)], log, TEST_STEP_PAUSE=str(PAUSE))
        wait_for_step(proc, step, log)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        finish(proc, log, -signal.SIGKILL)
        assert not (folder / "metrics.json").exists(), note

    # 4. the last resume runs to the end and matches the uninterrupted run exactly
    finish(start(["--resume", str(folder)], log), log, 0)
    assert_same_run(folder, reference, note)
    assert not list(folder.glob(".*.tmp")), "the stale temporary file is cleaned up"


# the same 3 updates an epoch, each from 2 micro-batches of 16
ACCUM_FLAGS = [*RESUME_FLAGS, "--batch_size", "16", "--grad_accum_steps", "2"]


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory, base) -> Path:
    """The uninterrupted run with gradient accumulation that the interrupted ones must reproduce."""
    return uninterrupted(tmp_path_factory, base, "accumulated", ACCUM_FLAGS)


def test_kill_9_mid_accumulation_then_resume_is_bit_exact(accumulated, flags, tmp_path, capsys):
    """Killed in the second micro-batch of an update (its first one's gradients already added up): the run
    resumes from the last update's checkpoint and ends as the uninterrupted run, bit for bit. A resume that
    would change the rows of an update is refused."""
    seed = random.randrange(10**6)
    update = random.Random(seed).randrange(2, 12)
    folder, log, note = (
        tmp_path / "runs" / "killed",
        tmp_path / "log",
        f"seed {seed}: killed in update {update}",
    )
    finish(start([*flags, *ACCUM_FLAGS, "--run_name", "killed"], log, TEST_DIE_MICRO=str(2 * update)), log,
           -signal.SIGKILL)  # fmt: skip
    assert read_trainer_state(find_latest(folder))["step"] == update - 1, note
    assert main(["--resume", str(folder), "--grad_accum_steps", "4"]) == 2
    one_error_line(capsys, "it was trained with a global batch of 32 (batch_size 16 x 1 process x grad_accum_steps "
                           "2); with 1 process(es) pass --batch_size 8 (with --grad_accum_steps 4) to keep it")  # fmt: skip
    finish(start(["--resume", str(folder)], log), log, 0)
    assert_same_run(folder, accumulated, note)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (metrics["grad_accum_steps"], metrics["effective_batch_size"], metrics["global_batch_size"]) == (
        2,
        32,
        16,
    )


def test_sigint_finishes_the_step_checkpoints_and_prints_the_resume_command(reference, flags, tmp_path):
    folder, log = tmp_path / "runs" / "stopped", tmp_path / "log"
    argv = [
        *flags,
        *RESUME_FLAGS,
        "--run_name",
        "stopped",
        "--save_every",
        "0",
    ]
    proc = start(argv, log, TEST_STEP_PAUSE=str(PAUSE))
    step = random.randrange(3, 11)
    wait_for_step(proc, step, log)
    proc.send_signal(signal.SIGINT)
    finish(proc, log, 130)
    err = log.read_text()
    assert "Traceback" not in err
    checkpoints = list(folder.glob("checkpoint-*.safetensors"))
    assert len(checkpoints) == 1  # --save_every 0: the interrupt wrote it
    stopped_at = read_trainer_state(checkpoints[0])["step"]
    assert stopped_at in (step, step + 1)  # the step under way was finished, not thrown away
    assert f"interrupted; checkpoint {checkpoints[0]}" in err
    command = f"python lora/train_lora.py --resume {folder}"
    assert f"resume with: {command}\n" in err, err[-1000:]

    resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {checkpoints[0]} at step {stopped_at}" in resumed.stderr
    assert_same_run(folder, reference)


def test_sigterm_in_process_checkpoints_and_exits_130(flags, tmp_path, capsys, monkeypatch):
    at_training_step(monkeypatch, 3, sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    assert main([*flags, "--run_name", "term"]) == 130
    assert signal.getsignal(signal.SIGTERM) is handler  # the trainer's handler is removed again
    err = capsys.readouterr().err
    folder = tmp_path / "runs" / "term"
    assert "SIGTERM: finishing this step" in err and "Traceback" not in err
    assert f"interrupted; checkpoint {folder / 'checkpoint-0000003.safetensors'}\n" in err
    assert f"resume with: {tl.resume_command(folder)}\n" in err and f"train_lora.py --resume {folder}" in err
    monkeypatch.undo()
    assert main(["--resume", str(folder)]) == 0
    assert json.loads((folder / "history.json").read_text())["step"] == list(range(1, 13))


def test_debug_shows_the_traceback(tiny_flags):
    from lora.errors import ConfigError

    with pytest.raises(ConfigError, match="lora_r must be >= 1"):
        main([*tiny_flags, "--lora_r", "0", "--debug"])


def test_an_interrupt_while_pretraining_the_base_exits_130_and_keeps_no_base(
    tiny_flags, tmp_path, capsys, monkeypatch
):
    at_training_step(monkeypatch, 2, sigterm)
    assert main(tiny_flags) == 130
    err = capsys.readouterr().err
    assert (
        "interrupted while pretraining the base model; nothing of it was saved" in err
        and "Traceback" not in err
    )
    assert "interrupted; no checkpoint was written" in err
    bases = tmp_path / "runs" / "bases"
    assert not bases.exists() or list(bases.iterdir()) == []  # (nor its lock file)


# ---------------------------------------------------------------------------------------------------------
# A run never destroys the one it replaces; runs at the same time never mix


def test_an_overwrite_that_diverges_leaves_the_previous_run_byte_for_byte(
    flags, tmp_path, capsys, monkeypatch
):
    assert main([*flags, "--run_name", "x"]) == 0
    folder = tmp_path / "runs" / "x"
    before = snapshot(folder)
    at_training_step(monkeypatch, 5, nan)
    assert main([*flags, "--run_name", "x", "--overwrite", "--max_steps", "8"]) == 3
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.parent.glob("[!.]*")) == ["x"]  # nothing of the failed run is left
    at_training_step(monkeypatch, 5, nan)  # counted afresh for the second run
    assert main([*flags, "--run_name", "x", "--overwrite", "--max_steps", "8", "--save_every", "2"]) == 3
    assert snapshot(folder) == before
    staged = sorted(folder.parent.glob("x.incomplete-*"))  # only what is needed to resume it
    assert len(staged) == 1 and sorted(p.name for p in staged[0].glob("checkpoint-*")) == [
        "checkpoint-0000002.safetensors", "checkpoint-0000004.safetensors"]  # fmt: skip
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["--resume", str(staged[0])]) == 0  # resumed and finished: it now replaces x
    assert not staged[0].exists() and f"outputs in {folder}" in capsys.readouterr().err
    assert json.loads((folder / "history.json").read_text())["step"] == list(range(1, 9))
    assert sorted(p.name for p in folder.parent.glob("[!.]*")) == ["x"]


def test_an_interrupted_overwrite_keeps_the_previous_run_until_it_is_resumed(
    flags, tmp_path, capsys, monkeypatch
):
    assert main([*flags, "--run_name", "x", "--max_steps", "4"]) == 0
    folder = tmp_path / "runs" / "x"
    before = snapshot(folder)
    at_training_step(monkeypatch, 3, sigterm)
    assert main([*flags, "--run_name", "x", "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert snapshot(folder) == before
    staged = next(folder.parent.glob("x.incomplete-*"))
    assert f"resume with: {tl.resume_command(staged)}" in err
    monkeypatch.undo()
    assert main(["--resume", str(staged)]) == 0
    assert json.loads((folder / "history.json").read_text())["step"] == list(range(1, 13))
    assert not staged.exists()


def test_resume_auto_finishes_an_interrupted_overwrite_in_the_run_s_own_name(
    flags, tmp_path, capsys, monkeypatch
):
    """--resume auto with the run's flags looks in the staged folder first; when it finishes, that folder
    replaces runs/<name> (it used to finish in the .incomplete folder and stay there)."""
    assert main([*flags, "--run_name", "x", "--max_steps", "4"]) == 0
    at_training_step(monkeypatch, 3, sigterm)
    assert main([*flags, "--run_name", "x", "--overwrite"]) == 130
    monkeypatch.undo()
    folder = tmp_path / "runs" / "x"
    assert main([*flags, "--run_name", "x", "--resume", "auto"]) == 0
    assert json.loads((folder / "history.json").read_text())["step"] == list(range(1, 13))
    assert not list(folder.parent.glob("x.incomplete-*"))


CONCURRENT = "import sys, lora.train_lora as t; sys.exit(t.main())"


def test_two_first_runs_at_once_pretrain_one_base_and_both_finish(tmp_path):
    out = tmp_path / "runs"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, *TINY_FLAGS, "--output_dir", str(out),
                               "--run_name", f"run{i}", "--base_steps", "60"],
                              cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True) for i in (1, 2)]  # fmt: skip
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sum("pretraining one on" in e for e in errs) == 1  # the other waited, then reused it
    assert sum("(reused)" in e for e in errs) == 1
    bases = out / "bases"
    assert [p.name for p in bases.glob("[!.]*")] == ["caesar-d32-h2-l1-s32-steps60-seed0"]
    assert not list(bases.glob("*.tmp")) and not list(out.glob("*.incomplete-*"))
    assert not list(out.rglob("*.lock"))  # the base's and the runs' lock files went with their locks
    for i in (1, 2):
        assert (out / f"run{i}" / "metrics.json").is_file()


@pytest.mark.parametrize("overwrite", [(False, False), (True, True), (False, True)],
                         ids=["new names", "overwrite", "one of each"])  # fmt: skip
def test_two_runs_of_one_name_at_once_never_mix_their_files(overwrite, flags, tmp_path):
    out = tmp_path / "runs"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, *flags, "--run_name", "same", "--max_steps", str(n),
                               *(["--overwrite"] if o else [])], cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
             for n, o in zip((9, 6), overwrite, strict=True)]  # fmt: skip
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    folders = sorted(p.name for p in out.glob("[!.]*"))
    if overwrite == (True, True):
        assert folders == ["same"]
    else:  # the plain run claims a name of its own (or, one of each, is replaced after it has finished)
        assert folders in (["same"], ["same", "same-2"]) if overwrite[1] else folders == ["same", "same-2"]
    assert not list(out.rglob("*.lock"))
    for name in folders:  # each folder holds one run: its config, history and metrics agree
        steps = yaml.safe_load((out / name / "config.yaml").read_text())["max_steps"]
        assert json.loads((out / name / "history.json").read_text())["step"][-1] == steps
        assert json.loads((out / name / "metrics.json").read_text())["steps"] == steps
        assert (out / name / "adapter_model.safetensors").is_file()


def _locker(path: str, counter: str, rounds: int, clash: str) -> None:
    """``rounds`` times: take the lock, then read, pause and rewrite ``counter`` (a lost update if another
    process is inside at the same time), with ``clash`` created exclusively while inside."""
    for _ in range(rounds):
        with file_lock(path):
            try:
                fd = os.open(clash, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                os._exit(3)  # two processes hold the lock at once
            value = int(Path(counter).read_text())
            time.sleep(0.0005)
            Path(counter).write_text(str(value + 1))
            os.close(fd)
            os.unlink(clash)
    os._exit(0)


def test_a_lock_file_goes_with_its_lock_and_still_excludes(tmp_path):
    """The lock file exists while the lock is held and is gone after; processes racing for it (some waiting
    on a file the holder then removes) still hold it one at a time: no update of the counter is lost."""
    path, counter, clash = tmp_path / ".run.lock", tmp_path / "counter", tmp_path / "inside"
    waited = []
    with file_lock(path, on_wait=lambda: waited.append(1)):
        assert path.is_file()
    assert not path.exists() and not waited
    counter.write_text("0")
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_locker, args=(str(path), str(counter), 40, str(clash))) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    assert int(counter.read_text()) == 4 * 40
    assert not path.exists() and not clash.exists()
