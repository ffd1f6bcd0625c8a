"""Data parallelism through torchrun (Gloo, 2 CPU processes): the same adapter as one process with the same
global batch, rank 0 alone writing, a failure in one rank stopping both with its message, and a stop in one
rank checkpointing once, then resuming on one process."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ON_BASE_FLAGS, TORCHRUN_ENV, assert_close_scaled, torchrun_two

from lora.data import BatchLoader, TaskData
from lora.distributed import Distributed, from_environment
from lora.errors import ConfigError
from lora.files import read_safetensors

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# The command line with planted trouble: TEST_FAIL_RANK fails at TEST_FAIL_AT ("data": a corrupt file seen by
# that rank only, or step N: a write error); TEST_STOP_RANK gets a Ctrl-C of its own after step TEST_STOP_AT.
HARNESS = r"""
import os, signal, sys
import lora.application as app
import lora.trainer as trainer_module
from lora.errors import DataError
from lora.train_lora import main

rank = os.environ["RANK"]
if rank == os.environ.get("TEST_FAIL_RANK"):
    at = os.environ["TEST_FAIL_AT"]
    if at == "fingerprint":  # as if this process had other base weights
        app.LoRATransformer.base_fingerprint = lambda self: "0123456789abcdef"
    elif at == "data":
        def load_task(cfg, **kw):
            raise DataError(f"shard.jsonl line 7: invalid JSON (seen by rank {rank} only)")
        app.load_task = load_task
    else:
        original, calls = trainer_module.batch_loss, [0]
        def batch_loss(*args):
            calls[0] += 1
            if calls[0] == int(at):
                raise OSError(28, "No space left on device")
            return original(*args)
        trainer_module.batch_loss = batch_loss
if rank == os.environ.get("TEST_STOP_RANK"):
    record = trainer_module.Trainer._record
    def _record(self, *args):
        record(self, *args)
        if self.step == int(os.environ["TEST_STOP_AT"]):
            self._stop_signal = signal.SIGINT
    trainer_module.Trainer._record = _record
if os.environ.get("TEST_COUNT_EXCHANGES"):  # count DDP's gradient all-reduces (one per bucket and exchange)
    import atexit, inspect
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    DDP, exchanges = trainer_module.DistributedDataParallel, [0]
    class Counted(DDP):
        __signature__ = inspect.signature(DDP)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            def hook(group, bucket):
                exchanges[0] += 1
                return allreduce_hook(group, bucket)
            self.register_comm_hook(None, hook)
    trainer_module.DistributedDataParallel = Counted
    atexit.register(lambda: print(f"rank {rank}: {exchanges[0]} gradient exchanges", file=sys.stderr))
sys.exit(main(sys.argv[1:]))
"""


def flags(base: Path, out: Path, batch: int, name: str) -> list[str]:
    return [*ON_BASE_FLAGS, "--base_checkpoint", str(base), "--output_dir", str(out), "--batch_size", str(batch),
            "--run_name", name, "--save_every", "4"]  # fmt: skip


def torchrun(tmp_path: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    return torchrun_two(tmp_path, HARNESS, argv, **env)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(folder / "adapter_model.safetensors")


def assert_close_adapters(a: Path, b: Path, tol: float = 1e-5) -> None:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys()
    for k in x:
        assert_close_scaled(x[k], y[k], tol, msg=k)


@pytest.fixture(scope="module")
def one_process(base, tmp_path_factory) -> Path:
    """The single-process run with a global batch of 32: what the data-parallel runs must reproduce."""
    out = tmp_path_factory.mktemp("one")
    res = subprocess.run([sys.executable, "lora/train_lora.py", *flags(base, out, 32, "one")], cwd=ROOT, env=TORCHRUN_ENV,
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return out / "one"


def test_two_processes_train_the_single_process_adapter_and_rank_0_alone_writes(base, one_process, tmp_path):
    res = torchrun(tmp_path, [*flags(base, tmp_path / "runs", 16, "two"), "--log_to", "tensorboard"])
    assert res.returncode == 0, res.stderr
    assert "data parallel: 2 processes (gloo), global batch 16 x 2 = 32 sequences a step" in res.stderr
    assert res.stderr.count("done in") == 1  # one voice
    assert [p.name for p in (tmp_path / "runs").glob("[!.]*")] == ["two"]
    # and one writer of TensorBoard's events (the file names hold the writing process's id)
    assert len(list((tmp_path / "runs" / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert_close_adapters(tmp_path / "runs" / "two", one_process)
    metrics = json.loads((tmp_path / "runs" / "two" / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["global_batch_size"]) == (2, 32)
    one = json.loads((one_process / "metrics.json").read_text())
    # evaluation agrees (within 1e-5 x max(1, |loss|))
    assert metrics["final_val_loss"] == pytest.approx(one["final_val_loss"], abs=1e-5, rel=1e-5)
    # and so do the evaluations during training, on --eval_batches 2 global batches: the same 64 rows
    two_history, one_history = (json.loads((f / "history.json").read_text()) for f in (tmp_path / "runs" / "two", one_process))  # fmt: skip
    evaluated = [i for i, v in enumerate(one_history["val_loss"]) if v is not None]
    assert len(evaluated) == 3 and [two_history["val_loss"][i] for i in evaluated] == pytest.approx(
        [one_history["val_loss"][i] for i in evaluated], abs=1e-5, rel=1e-5
    )


def test_accumulating_micro_batches_on_two_processes_trains_the_single_process_adapter(
    base, one_process, tmp_path
):
    """2 processes x batch 4 x 4 micro-batches = the one-process batch of 32: the same adapter within 1e-6, with
    one gradient exchange per update (none in the first three micro-batches' backward), and the same on one
    process with 8 x 4."""
    from lora.train_lora import main

    res = torchrun(tmp_path, [*flags(base, tmp_path / "runs", 4, "two"), "--grad_accum_steps", "4"],
                   TEST_COUNT_EXCHANGES="1")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "rank 0: 12 gradient exchanges" in res.stderr and "rank 1: 12 gradient exchanges" in res.stderr
    assert main([*flags(base, tmp_path / "runs", 8, "one"), "--grad_accum_steps", "4"]) == 0
    for name in ("two", "one"):
        folder = tmp_path / "runs" / name
        assert_close_adapters(folder, one_process, 1e-6)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert (metrics["steps"], metrics["grad_accum_steps"], metrics["effective_batch_size"]) == (12, 4, 32)
        history, want = (json.loads((f / "history.json").read_text()) for f in (folder, one_process))
        assert (
            history["step"] == want["step"]
            and history["lr"] == want["lr"]
            and history["epoch"] == want["epoch"]
        )
        assert_close_scaled(torch.tensor(history["train_loss"]), torch.tensor(want["train_loss"]), 1e-6)


@pytest.mark.parametrize(("at", "message"), [
    ("data", "error: rank 1: shard.jsonl line 7: invalid JSON (seen by rank 1 only)"),
    ("3", "error: rank 1: I/O: No space left on device"),
    ("fingerprint", "error: rank 0: the base's fingerprint differs between processes: rank 0 has "),
])  # fmt: skip
def test_a_failure_in_one_rank_stops_both_with_its_message(base, tmp_path, at, message):
    start = time.monotonic()
    res = torchrun(tmp_path, flags(base, tmp_path / "runs", 16, "fails"), TEST_FAIL_RANK="1", TEST_FAIL_AT=at)
    assert time.monotonic() - start < 60
    assert res.returncode != 0
    assert res.stderr.count("error: ") == 1 and message in res.stderr, res.stderr
    assert not list((tmp_path / "runs").glob("[!.]*")) if (tmp_path / "runs").exists() else True


def test_a_stop_in_one_rank_checkpoints_once_and_resumes_on_one_process(base, one_process, tmp_path, capsys):
    from lora.train_lora import main

    res = torchrun(
        tmp_path, flags(base, tmp_path / "runs", 16, "stopped"), TEST_STOP_RANK="1", TEST_STOP_AT="5"
    )
    folder = tmp_path / "runs" / "stopped"
    assert "interrupted; checkpoint" in res.stderr and res.stderr.count("resume with: torchrun") == 1, (
        res.stderr
    )
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-0000004.safetensors",
                                                                   "checkpoint-0000006.safetensors"]  # fmt: skip
    assert main(["--resume", str(folder)]) == 2  # one process with the old batch: another global batch
    assert "global batch of 32 (batch_size 16 x 2 processes); with 1 process(es) pass --batch_size 32" in (
        capsys.readouterr().err
    )
    assert main(["--resume", str(folder), "--batch_size", "32"]) == 0
    assert_close_adapters(folder, one_process)


def test_a_global_batch_is_the_single_process_batch_split_by_rank():
    data = TaskData(torch.arange(40).view(40, 1), torch.arange(40).view(40, 1))
    whole = list(BatchLoader(data, 8, seed=3).batches(epoch=1))
    shards = [list(BatchLoader(data, 4, seed=3, rank=r, world_size=2).batches(epoch=1)) for r in (0, 1)]
    assert len(whole) == len(shards[0]) == len(shards[1]) == 5
    for b, batch in enumerate(whole):
        assert torch.equal(torch.cat([shards[0][b]["x"], shards[1][b]["x"]]), batch["x"])
    evals = [list(BatchLoader(data, 8, shuffle=False, rank=r, world_size=2).batches(limit=2)) for r in (0, 1)]
    assert [b["x"][0, 0].item() for b in evals[0]] == [0, 16] and [b["x"][0, 0].item() for b in evals[1]] == [
        8,
        24,
    ]


def test_evaluation_reads_the_same_rows_whatever_the_number_of_processes():
    """``eval_batches`` counts global batches (``batch_size x processes`` rows), so a 2 x 8 run scores the rows a
    1 x 16 run scores, and its history matches the one-process run it may be resumed as."""
    data = TaskData(torch.arange(100).view(100, 1), torch.arange(100).view(100, 1))
    for limit, rows in ((3, 48), (None, 100), (10, 100)):
        one = torch.cat([b["x"] for b in BatchLoader(data, 16, shuffle=False).batches(limit=limit)])
        two = [BatchLoader(data, 8, shuffle=False, rank=r, world_size=2).batches(limit=limit) for r in (0, 1)]
        shards = torch.cat([b["x"] for shard in two for b in shard])
        assert one.flatten().tolist() == list(range(rows))
        assert sorted(shards.flatten().tolist()) == list(range(rows)), limit


def test_torchrun_variables_are_read_and_checked():
    assert from_environment({}) == Distributed()
    assert from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Distributed(1, 2, 1)
    with pytest.raises(ConfigError, match="expected 0 <= RANK < WORLD_SIZE"):
        from_environment({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="must be integers"):
        from_environment({"RANK": "x", "WORLD_SIZE": "2"})
