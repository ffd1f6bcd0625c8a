"""--fsdp through torchrun (Gloo, 2 CPU processes) on a Llama-layout base: the adapter of one process with the
same global batch while each process holds only its rows of the base; kill -9 of one process, then the run
resumed on one process without --fsdp; the refusals. And in this process (a process group of one): the sharded
model is the loaded one, and what trains is gathered whole."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import GPT2_TEXT, assert_close_scaled, make_llama_folder, torchrun_two

from lora.application import build_model
from lora.config import TrainConfig
from lora.errors import ConfigError
from lora.files import read_safetensors
from lora.fsdp import build_sharded_model, check_fsdp, gathered, is_sharded
from lora.pretrained import resolve_base
from lora.train_lora import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# The command line, reporting how much of the blocks' base each process holds; TEST_KILL_RANK kills itself (SIGKILL)
# once it has recorded step TEST_KILL_AT.
HARNESS = r"""
import os, signal, sys
import lora.application as app
import lora.trainer as trainer_module
from lora.train_lora import main

rank = os.environ["RANK"]
build = app.build_sharded_model
def report(*args, **kwargs):
    model, fingerprint = build(*args, **kwargs)
    blocks = [p for n, p in model.named_parameters() if n.startswith("blocks.") and not p.requires_grad]
    held, total = sum(p.to_local().numel() for p in blocks), sum(p.numel() for p in blocks)
    print(f"rank {rank} holds {held} of {total} block base values", file=sys.stderr)
    return model, fingerprint
app.build_sharded_model = report
if rank == os.environ.get("TEST_KILL_RANK"):
    record = trainer_module.Trainer._record
    def _record(self, *args):
        record(self, *args)
        if self.step == int(os.environ["TEST_KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
    trainer_module.Trainer._record = _record
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-block Llama folder whose MLP rows do not split evenly in two (97), its LM head tied to the
    embedding, and a text to train on."""
    root = tmp_path_factory.mktemp("fsdp")
    folder = make_llama_folder(
        root / "llama", intermediate_size=97, num_hidden_layers=3, tie_word_embeddings=True
    )
    text = root / "my.txt"
    text.write_text(GPT2_TEXT)
    return folder, text


def flags(llama: tuple[Path, Path], out: Path, batch: int, name: str) -> list[str]:
    folder, text = llama
    return ["--task", "text", "--train_file", str(text), "--base_checkpoint", str(folder), "--seq_len", "16",
            "--max_steps", "6", "--eval_every", "3", "--eval_batches", "1", "--device", "cpu", "--adapt_feedforward",
            "--use_dora", "--save_every", "2", "--batch_size", str(batch), "--output_dir", str(out),
            "--run_name", name]  # fmt: skip


def torchrun(tmp_path: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    return torchrun_two(tmp_path, HARNESS, argv, **env)


@pytest.fixture(scope="module")
def one_process(llama, tmp_path_factory) -> Path:
    """The single-process run with a global batch of 8: what the sharded runs must reproduce."""
    out = tmp_path_factory.mktemp("one")
    assert main(flags(llama, out, 8, "one")) == 0
    return out / "one"


def assert_same_adapter(folder: Path, reference: Path) -> None:
    x, y = (read_safetensors(f / "adapter_model.safetensors") for f in (folder, reference))
    # 3 blocks x (q, v, gate, up, down) x (A, B, DoRA's magnitude)
    assert x.keys() == y.keys() and len(x) == 3 * 5 * 3
    for k in x:
        assert_close_scaled(x[k], y[k], 1e-5, msg=k)


def test_fsdp_trains_the_one_process_adapter_with_each_process_holding_its_rows(llama, one_process, tmp_path):
    res = torchrun(
        tmp_path, [*flags(llama, tmp_path / "runs", 4, "two"), "--fsdp", "--gradient_checkpointing"]
    )
    assert res.returncode == 0, res.stderr
    assert "fully sharded (FSDP2): 2 processes (gloo), global batch 4 x 2 = 8 sequences a step" in res.stderr
    held = [int(res.stderr.split(f"rank {r} holds ")[1].split()[0]) for r in (0, 1)]
    total = int(res.stderr.split("rank 0 holds ")[1].split()[2])
    assert sum(held) == total and max(held) <= total // 2 + 3 * 2 * 64  # each its rows (97: one more row)
    assert res.stderr.count("done in") == 1 and [p.name for p in (tmp_path / "runs").glob("[!.]*")] == ["two"]
    folder = tmp_path / "runs" / "two"
    assert_same_adapter(folder, one_process)
    # the checkpoints hold whole tensors, the AdamW moments too: those of the single process
    a, b = (read_safetensors(f / "checkpoint-0000006.safetensors") for f in (folder, one_process))
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith("rng."):
            assert_close_scaled(a[k], b[k], 1e-5, msg=k)
    metrics, want = (json.loads((f / "metrics.json").read_text()) for f in (folder, one_process))
    assert (metrics["world_size"], metrics["global_batch_size"], metrics["steps"]) == (2, 8, 6)
    assert metrics["base_fingerprint"] == want["base_fingerprint"]  # hashed from the files, row by row
    assert metrics["final_val_loss"] == pytest.approx(want["final_val_loss"], abs=1e-5, rel=1e-5)


def test_kill_9_of_one_process_then_resume_on_one_process_without_fsdp(llama, one_process, tmp_path, capsys):
    res = torchrun(tmp_path, [*flags(llama, tmp_path / "runs", 4, "killed"), "--fsdp"], TEST_KILL_RANK="1",
                   TEST_KILL_AT="5")  # fmt: skip
    assert res.returncode != 0
    folder = tmp_path / "runs" / "killed"
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-0000002.safetensors",
                                                                   "checkpoint-0000004.safetensors"]  # fmt: skip
    assert not (folder / "adapter_model.safetensors").exists()
    # one process: the run's --fsdp is refused (one line, nothing written) until --no-fsdp
    assert main(["--resume", str(folder), "--batch_size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-fsdp resumes a --fsdp run on one process" in err
    assert main(["--resume", str(folder), "--batch_size", "8", "--no-fsdp"]) == 0
    assert_same_adapter(folder, one_process)


def test_fsdp_is_refused_where_it_cannot_work(llama, tmp_path, capsys):
    assert main([*flags(llama, tmp_path / "runs", 8, "alone"), "--fsdp"]) == 2
    assert "--fsdp shards the model across the processes of a torchrun; this is one process" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="method full trains every weight"):
        check_fsdp(TrainConfig(fsdp=True, method="full"), 2)
    with pytest.raises(ConfigError, match="--fsdp with quantize_base nf4"):
        check_fsdp(TrainConfig(fsdp=True, quantize_base="nf4"), 2)
    check_fsdp(TrainConfig(fsdp=True, quantize_base="bf16", gradient_checkpointing=True, compile=True), 2)
    assert torch.distributed.is_available()


@pytest.fixture
def process_group_of_one():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_the_sharded_model_is_the_loaded_one_and_gathers_what_trains(llama, process_group_of_one):
    """Built on the meta device and read row by row (a classifier: its head trains in the root unit; PiSSA and
    DoRA: a start derived from each whole weight), it has the fingerprint, the random draws, the trainable
    tensors and the outputs of the model loaded whole. After an evaluation, which leaves the root gathered,
    the trainable tensors are gathered whole, and the shards put back after."""
    cfg = TrainConfig(task="jsonl", train_file="x.jsonl", base_checkpoint=str(llama[0]), lora_init="pissa",
                      use_dora=True, lora_r=4)  # fmt: skip
    source = resolve_base(llama[0])
    torch.manual_seed(0)
    plain = build_model(cfg, source, 3)
    drawn = torch.get_rng_state()
    torch.manual_seed(0)
    model, fingerprint = build_sharded_model(cfg, source, 3, torch.device("cpu"), "none")
    assert is_sharded(model) and fingerprint == plain.base_fingerprint()
    assert torch.equal(torch.get_rng_state(), drawn)  # the same random draws: the same batches and dropout
    x = torch.randint(0, 300, (2, 8))
    model.eval()
    with torch.no_grad():
        assert_close_scaled(model(x), plain.eval()(x), 1e-6)
    with gathered(model):
        trains = {n: p for n, p in model.named_parameters() if p.requires_grad}
        want = {n: p for n, p in plain.named_parameters() if p.requires_grad}
        assert trains.keys() == want.keys() and "cls_head.weight" in trains
        for n, p in trains.items():
            assert type(p) is torch.nn.Parameter
            assert_close_scaled(p, want[n], 0, msg=n)
    assert type(model.cls_head.weight).__name__ == "DTensor"  # the shards back in place
