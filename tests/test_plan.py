"""The run plan: every input resolved once and checked before anything is read, made or written.

One run from a given base folder opens its ``config.json`` once and computes the base's fingerprint once;
refusals come before the data file is opened; a GPT-2 folder with only ``pytorch_model.bin`` trains.
"""

import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import GPT2_TEXT, task_flags

from lora.lora_transformer import LoRATransformer
from lora.train_lora import main

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["--seq_len", "16", "--batch_size", "8", "--max_steps", "2", "--eval_every", "2", "--eval_batches", "1",
       "--device", "cpu"]  # fmt: skip

_WATCHED: dict[str, list[str]] = {}  # resolved path -> what opened it, while a test watches


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCHED and isinstance(args[0], (str, Path)):
        path = str(Path(args[0]).resolve())
        if path in _WATCHED:
            _WATCHED[path].append(event)


sys.addaudithook(_audit)  # (a hook cannot be removed: it watches only while _WATCHED names files)


@contextmanager
def opens(*paths: Path):
    """Count every ``open()`` of ``paths`` (Python's audit event: builtins, pathlib and io alike)."""
    _WATCHED.update({str(p.resolve()): [] for p in paths})
    try:
        yield {p: _WATCHED[str(p.resolve())] for p in paths}
    finally:
        _WATCHED.clear()


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "my.txt"
    path.write_text(GPT2_TEXT)
    return path


def test_the_audit_hook_sees_opens(tmp_path):
    """The counting can fail: a read of the file is seen, whichever way it is opened."""
    path = tmp_path / "f.json"
    path.write_text("{}")
    with opens(path) as seen:
        path.read_text()
        with open(path) as f:
            f.read()
    assert len(seen[path]) == 2


def test_a_run_from_a_given_base_reads_its_config_once_and_fingerprints_it_once(
    gpt2_folder, text, tmp_path, monkeypatch
):
    pytest.importorskip("tokenizers")
    calls = []
    fingerprint = LoRATransformer.base_fingerprint
    monkeypatch.setattr(
        LoRATransformer, "base_fingerprint", lambda self: calls.append(1) or fingerprint(self)
    )
    argv = [*RUN, "--task", "text", "--train_file", str(text), "--base_checkpoint", str(gpt2_folder),
            "--output_dir", str(tmp_path / "runs")]  # fmt: skip
    with opens(gpt2_folder / "config.json", gpt2_folder / "model.safetensors") as seen:
        assert main(argv) == 0
    assert len(seen[gpt2_folder / "config.json"]) == 1
    assert len(calls) == 1  # the run's fingerprint, recorded in the adapter and metrics alike
    folder = tmp_path / "runs" / "text-lora-r8"
    assert json.loads((folder / "metrics.json").read_text())["base_fingerprint"] == fingerprint(
        LoRATransformer.from_gpt2(gpt2_folder, lora_r=0)
    )


def test_a_gpt2_folder_with_only_pytorch_model_bin_trains_and_its_adapter_loads_back(
    gpt2_folder, text, tmp_path
):
    pytest.importorskip("tokenizers")
    folder = tmp_path / "bin-only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(gpt2_folder / name, folder)
    state = LoRATransformer.from_gpt2(gpt2_folder, lora_r=0)  # the same weights, saved as GPT-2's .bin
    from safetensors.torch import load_file

    torch.save(load_file(gpt2_folder / "model.safetensors"), folder / "pytorch_model.bin")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin", "tokenizer.json"]
    argv = [*RUN, "--task", "text", "--train_file", str(text), "--base_checkpoint", str(folder),
            "--output_dir", str(tmp_path / "runs"), "--run_name", "bin"]  # fmt: skip
    assert main(argv) == 0
    model = LoRATransformer.from_gpt2(folder, lora_r=0)
    assert model.base_fingerprint() == state.base_fingerprint()
    model.load_adapter(tmp_path / "runs" / "bin")
    assert model.active_adapter == "default" and any(True for _ in model.lora_layers())
    trained = json.loads((tmp_path / "runs" / "bin" / "metrics.json").read_text())
    assert trained["steps"] == 2 and trained["base_fingerprint"] == state.base_fingerprint()


def test_a_resume_with_other_settings_is_refused_before_the_data_file_is_read(
    flags, base, text, tmp_path, capsys
):
    runs = tmp_path / "runs"
    argv = [*task_flags(flags, "text"), "--train_file", str(text), "--max_steps", "2", "--save_every", "1",
            "--run_name", "r"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    with opens(text) as seen:  # the run's config.yaml names the data file: the resumed run would read it
        assert main(["--resume", str(runs / "r"), "--lora_r", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "lora_r" in err, err
    assert seen[text] == []


def test_a_seq_len_longer_than_the_base_allows_is_refused_before_the_data_file_is_read(
    flags, base, text, tmp_path, capsys
):
    limit = json.loads((base / "config.json").read_text())["max_seq_len"]
    with opens(text) as seen:
        assert main([*task_flags(flags, "text"), "--train_file", str(text), "--seq_len", str(limit + 1)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"seq_len {limit + 1} exceeds the base model's max_seq_len {limit}" in err
    assert seen[text] == []
    assert not (tmp_path / "runs").exists()


def test_an_output_dir_that_is_a_file_is_refused_at_once_with_a_given_base(flags, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    argv = [*flags[: flags.index("--output_dir")], *flags[flags.index("--output_dir") + 2 :]]
    assert main([*argv, "--output_dir", str(blocker)]) == 2  # it spun at full CPU, never ending
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and f"cannot create the folder {blocker}: it exists and is not a folder" in err
    ), err
    assert blocker.read_text() == "not a folder\n"


def test_the_plan_resolves_every_input_and_writes_nothing(gpt2_folder, text, tmp_path):
    pytest.importorskip("tokenizers")
    from lora.config import load_config
    from lora.plan import plan_run

    runs = tmp_path / "runs"
    cfg = load_config([*RUN, "--task", "text", "--train_file", str(text), "--base_checkpoint", str(gpt2_folder),
                       "--output_dir", str(runs), "--run_name", "p"])  # fmt: skip
    plan = plan_run(cfg, torch.device("cpu"))
    assert plan.base.importer == "gpt2" and plan.base.folder == gpt2_folder and not plan.make_base
    assert plan.architecture == LoRATransformer.from_gpt2(gpt2_folder, lora_r=0).config
    assert {k for k in plan.base.header if k.startswith("blocks.0.attn.")} >= {"blocks.0.attn.q_proj.weight"}
    assert plan.base.tokenizer_files == (gpt2_folder / "tokenizer.json",)
    assert plan.tokenizer.vocab_size == 300 and plan.storage == "none" and plan.resume is None
    assert plan.final == runs / "p" and set(plan.memory) == {"model", "data", "activations"}
    assert all(v > 0 for v in plan.memory.values())
    assert not runs.exists()  # a plan writes nothing
