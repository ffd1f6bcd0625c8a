"""Hostile but realistic input: every case ends in one line, the documented exit code, nothing written,
and bounded time and memory. The inputs are made here (YAML bombs, FIFOs, hand-edited JSON, ...)."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora.lora_transformer import LoRATransformer
from lora.train_lora import main

ROOT = Path(__file__).resolve().parents[1]


def _bomb() -> str:
    """A "billion laughs": nine levels, each a list of nine of the previous (9**9 strings when expanded)."""
    lines, previous = [], '"lol"'
    for name in "abcdefghi":
        lines.append(f"{name}: &{name} [{', '.join([previous] * 9)}]")
        previous = f"*{name}"
    return "\n".join(lines) + "\n"


BOMB = _bomb()
DEEP = "lora_r: " + "[" * 10_000 + "]" * 10_000 + "\n"

# The YAML loader alone, in a fresh process: its time, the peak of what it allocated (tracemalloc) and
# how much the process's resident memory (VmRSS) grew across it: not the whole, which is mostly torch's
# import (about 250 MiB with the CPU build, 490 with the CUDA one).
MEASURE = """
import sys, time, tracemalloc
from lora.config import load_yaml
def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) // 1024
before = rss_mb()
def attempt():
    try:
        load_yaml(sys.argv[1])
    except Exception as e:
        return f"{type(e).__name__} {e}"
t = time.perf_counter()
print(attempt())
seconds = time.perf_counter() - t
tracemalloc.start()  # a second pass for the allocations (tracemalloc slows Python down)
attempt()
peak = tracemalloc.get_traced_memory()[1]
print(seconds, peak // 2**20, rss_mb() - before)
"""


def script(name: str):
    """Import ``scripts/<name>.py`` as a module, to call its ``main`` in-process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(capsys, argv, *needles, code=2, prog="") -> str:
    """``train_lora.py`` (``prog``: ``scripts/<prog>``) refuses ``argv`` in one line with ``needles``."""
    run = main if not prog else script(prog.removesuffix(".py")).main
    assert run([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    lines = err.splitlines()  # progress messages may come first; the error is the one last line
    prefix = f"{prog}: error: " if prog else "error: "
    assert "Traceback" not in err and lines[-1].startswith(prefix) and err.count("error") == 1, err
    for needle in needles:
        assert needle in lines[-1], (needle, err)
    assert len(lines[-1]) < 400  # values are quoted shortened, never echoed whole
    return lines[-1]


@pytest.mark.parametrize(("name", "text", "needle"), [
    ("alias bomb", BOMB, "YAML aliases (*a) are not allowed"),
    ("deep nesting", DEEP, "nested more than 16 levels deep"),
])  # fmt: skip
def test_yaml_bombs_are_refused_in_bounded_time_and_memory(name, text, needle, tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    res = subprocess.run([sys.executable, "-c", MEASURE, str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    error, measured = res.stdout.strip().splitlines()
    seconds, allocated_mb, rss_growth_mb = measured.split()
    assert error.startswith("ConfigError") and needle in error, error
    assert float(seconds) < 1.0 and int(allocated_mb) < 10 and int(rss_growth_mb) < 50, measured


def test_a_key_set_twice_names_the_key(tmp_path, capsys, flags):
    path = tmp_path / "twice.yaml"
    path.write_text("lora_r: 4\nlearning_rate: 0.01\nlora_r: 8\n")
    refused(capsys, [*flags, "--config", str(path)], f"{path}: key 'lora_r' is set twice (line 3)")


@pytest.mark.parametrize("kind", ["fifo", "device", "too large"])
def test_data_and_config_paths_must_be_bounded_regular_files(kind, tmp_path, capsys, flags):
    if kind == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)  # reading it would block forever: nobody writes
        needle = "not a regular file"
    elif kind == "device":
        path, needle = Path("/dev/zero"), "not a regular file"  # reading it would never end
    else:
        path = tmp_path / "big.yaml"
        path.write_bytes(b"#" * (1 << 20) + b"\nlora_r: 4\n")
        needle = "more than the 1,048,576 a config file may have"
    t = time.perf_counter()
    refused(capsys, [*flags, "--config", str(path)], needle)
    if kind != "too large":
        text_flags = [f for f in flags if f not in ("--num_examples", "512")]
        refused(capsys, [*text_flags, "--task", "text", "--seq_len", "16", "--train_file", str(path)], needle)
    assert time.perf_counter() - t < 5
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("argv", "needle"), [
    (["--seed", str(2**64)], "seed must be in [0, 2**63), got 18446744073709551616"),
    (["--learning_rate", "nan"], "learning_rate must be a finite number, got nan"),
    (["--lora_alpha", "inf"], "lora_alpha must be a finite number, got inf"),
    (["--run_name", "a\x00b"], "run_name must not contain a NUL byte"),
    (["--train_file", "a\x00b"], "train_file must not contain a NUL byte"),
    (["--task", "x" * 100_000], "(100,002 characters)"),
    (["--run_name", "."], "run_name must be a plain folder name"),
    (["--run_name", " "], "run_name must be a plain folder name"),
    (["--run_name", "a\nb"], "run_name must be a plain folder name"),
    (["--run_name", ".hidden"], "run_name must be a plain folder name"),
    (["--task", "text", "--train_file", "t.txt", "--val_file", ""], "val_file is empty: name a file"),
    (["--base_checkpoint", ""], "base_checkpoint is empty"),
])  # fmt: skip
def test_bad_values_are_one_line_and_shortened(argv, needle, capsys, flags, tmp_path):
    refused(capsys, [*flags, *argv], needle)
    assert not (tmp_path / "runs").exists()


def test_what_cannot_fit_in_memory_is_refused_with_the_estimate(capsys, tmp_path):
    t = time.perf_counter()
    refused(capsys, ["--output_dir", str(tmp_path / "runs"), "--num_examples", str(10**10)],
            "this run would need about", "data 4.0 TiB", "more than the")  # fmt: skip
    refused(capsys, ["--output_dir", str(tmp_path / "runs"), "--d_model", "100000", "--num_heads", "1"],
            "model 3.5 TiB")  # fmt: skip
    assert time.perf_counter() - t < 5
    assert not (tmp_path / "runs").exists()


def test_a_config_json_that_disagrees_with_its_weights_is_refused_before_allocating(
    base, tmp_path, capsys, flags
):
    edited = tmp_path / "edited"
    shutil.copytree(base, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "d_model": 16384, "num_heads": 1}))
    t = time.perf_counter()
    err = refused(capsys, [*flags, "--base_checkpoint", str(edited)], "cannot load the base model",
                  "wrong shapes: blocks.0.attn.k_proj.bias (32,) (expected (16384,))")  # fmt: skip
    assert time.perf_counter() - t < 2, err  # refused from the header: no 16384-wide model was built
    assert not (tmp_path / "runs").exists()


def test_a_base_with_nan_weights_is_refused_when_loaded_not_blamed_on_the_learning_rate(
    base, tmp_path, capsys, flags
):
    from lora.files import atomic_save_safetensors, read_safetensors

    damaged = tmp_path / "damaged"
    shutil.copytree(base, damaged)
    weights = read_safetensors(damaged / "model.safetensors")
    weights["blocks.0.mlp.fc1.weight"][0, :3] = float("nan")
    atomic_save_safetensors(weights, damaged / "model.safetensors")
    refused(capsys, [*flags, "--base_checkpoint", str(damaged)], "cannot load the base model",
            "non-finite values (nan or inf): blocks.0.mlp.fc1.weight has 3 of")  # fmt: skip
    assert not (tmp_path / "runs").exists()


def test_a_config_json_claiming_10_8_layers_is_refused_at_once(base, tmp_path, capsys, flags):
    edited = tmp_path / "edited"
    shutil.copytree(base, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "num_layers": 10**8}))
    t = time.perf_counter()
    refused(
        capsys,
        [*flags, "--base_checkpoint", str(edited)],
        "holds 1 blocks, but config.json says num_layers 100000000",
    )
    refused(capsys, [*flags, "--base_checkpoint", str(tmp_path / "runs"), "--num_layers", str(10**8)],
            "num_layers has no effect with --base_checkpoint")  # fmt: skip
    assert time.perf_counter() - t < 5
    refused(
        capsys,
        ["--output_dir", str(tmp_path / "runs"), "--num_layers", str(10**8)],
        "this run would need about",
    )
    assert time.perf_counter() - t < 10


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda c: {**c, "d_model": None}, "d_model must be a positive integer, got None"),
    (lambda c: {**c, "num_layers": "2"}, "num_layers must be a positive integer, got '2'"),
    (lambda c: {**c, "dropout": [0.1]}, "dropout must be a number in [0, 1), got [0.1]"),
    (lambda c: {**c, "vocab_size": -5}, "vocab_size must be a positive integer, got -5"),
    (lambda c: [c], "expected a JSON object, got list"),
])  # fmt: skip
def test_a_hand_edited_config_json_is_one_line(edit, needle, base, tmp_path, capsys, flags):
    edited = tmp_path / "edited"
    shutil.copytree(base, edited)
    (edited / "config.json").write_text(json.dumps(edit(json.loads((edited / "config.json").read_text()))))
    refused(capsys, [*flags, "--base_checkpoint", str(edited)], needle)


def test_integer_weights_are_refused_by_name_not_converted(base, tmp_path, capsys, flags):
    edited = tmp_path / "edited"
    shutil.copytree(base, edited)
    tensors = load_file(str(edited / "model.safetensors"))
    tensors["wte.weight"] = tensors["wte.weight"].to(torch.int64)
    save_file(tensors, str(edited / "model.safetensors"))
    refused(
        capsys,
        [*flags, "--base_checkpoint", str(edited)],
        "tensor wte.weight has dtype I64, expected floating point",
    )


@pytest.fixture
def finished(flags, tmp_path) -> Path:
    assert main([*flags, "--run_name", "done", "--save_every", "6"]) == 0
    return tmp_path / "runs" / "done"


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda c: {**c, "lora_r": "8"}, "lora_r must be an integer >= 0, got '8'"),
    (lambda c: {**c, "lora_targets": {"q": 1}}, "lora_targets must be a list of q, k, v, o"),
    (lambda c: {**c, "modules": [1, 2]}, "'modules' and 'base' must be JSON objects"),
    (lambda c: {**c, "num_classes": "two"}, "num_classes must be an integer >= 2 or null, got 'two'"),
    (lambda c: {**c, "modules": {m: {"r": -1} for m in c["modules"]}}, "lora_r must be an integer >= 0, got -1"),
])  # fmt: skip
def test_a_hand_edited_adapter_config_is_one_line(edit, needle, finished, base, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(finished, adapter)
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=r"adapter_config\.json") as info:
        LoRATransformer.from_pretrained(base).load_adapter(adapter)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_rank_0_tensor_in_an_adapter_is_one_line(finished, base, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(finished, adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    name = next(k for k in tensors if k.endswith("lora_A"))
    tensors[name] = torch.tensor(1.0)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=rf"wrong shapes: {name} \(\) \(expected \(8, 32\)\)"):
        LoRATransformer.from_pretrained(base).load_adapter(adapter)


@pytest.mark.parametrize(("module", "needle"), [
    ("blocks.0.attn.q_proj", "adapter_config.json: module 'blocks.0.attn.q_proj' claims rank 1000000000, but its "
                             "lora_A in adapter_model.safetensors has shape (8, 32), rank 8"),
    ("blocks.0.attn.k_proj", "adapter_model.safetensors lacks ['blocks.0.attn.k_proj.lora_A', "
                             "'blocks.0.attn.k_proj.lora_B'] listed in adapter_config.json"),
])  # fmt: skip
def test_an_adapter_claiming_rank_10_9_is_refused_before_allocating(module, needle, finished, base, tmp_path,
                                                                    capsys):  # fmt: skip
    """A module of the run (its factors in the file) or one it did not adapt (no factors) claims rank 10**9."""
    adapter = tmp_path / "adapter"
    shutil.copytree(finished, adapter)
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["modules"].setdefault(module, {"lora_alpha": 16.0})["r"] = 10**9  # (10**9, 32) float32: 128 GB
    path.write_text(json.dumps(config))
    t = time.perf_counter()
    refused(capsys, ["--base", base, "--adapter", adapter, "--prompt", "a", "--max_new_tokens", "1"], needle,
            prog="generate.py")  # fmt: skip
    refused(capsys, ["--adapter", adapter], needle, prog="inspect_adapter.py")
    assert time.perf_counter() - t < 10


@pytest.mark.parametrize("modules", ["kept", "dropped"])
def test_an_adapter_of_rank_0_is_refused_wherever_it_is_read(modules, finished, base, tmp_path, capsys):
    """Factors (0, in) and (out, 0) with lora_r 0: the modules kept at their rank, or dropped from the list."""
    adapter = tmp_path / "adapter"
    shutil.copytree(finished, adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    for name, t in tensors.items():
        tensors[name] = t[:0] if name.endswith("lora_A") else t[:, :0] if name.endswith("lora_B") else t
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "lora_r": 0, **({"modules": {}} if modules == "dropped" else {})}))
    needle = ("blocks.0.attn.q_proj.lora_A has shape (0, 32): module 'blocks.0.attn.q_proj' has rank 0, but a "
              "rank must be a positive integer")  # fmt: skip
    refused(capsys, ["--adapter", adapter], needle, prog="inspect_adapter.py")
    with pytest.raises(ValueError, match=re.escape(needle)):
        LoRATransformer.from_pretrained(base).load_adapter(adapter)


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("step", -3, "step must be an integer >= 0, got -3"),
    ("epoch", "1", "epoch must be an integer >= 0, got '1'"),
    ("history", [1, 2], "history must map names to lists"),
    ("param_names", {"a": 1}, "param_names must be lists of names"),
    ("rng", None, "rng must hold the python and numpy states"),
    ("epoch", 10**30, "epoch 1000000000000000000000000000000 and batch_in_epoch 6 cannot exceed step 6"),
    ("param_groups", [{"lr": "x", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}],
     "param_groups[0].lr is out of range or of the wrong type: 'x'"),
    ("param_groups", [{"lr": 1e-3, "betas": 5, "eps": 1e-8, "weight_decay": 0.0}],
     "param_groups[0].betas is out of range or of the wrong type: 5"),
    ("param_groups", [{"lr": 1e-3, "betas": [0.9, 0.999], "eps": None, "weight_decay": -1}],
     "param_groups[0].eps is out of range or of the wrong type: None"),
])  # fmt: skip
def test_a_hand_edited_checkpoint_header_is_one_line(key, value, needle, finished, tmp_path, capsys):
    from safetensors import safe_open

    checkpoint = next(finished.glob("checkpoint-*.safetensors"))
    with safe_open(str(checkpoint), framework="pt") as f:
        meta = f.metadata()
    state = json.loads(meta["trainer_state"])
    state[key] = value
    edited = tmp_path / "edited"
    shutil.copytree(finished, edited)
    target = edited / checkpoint.name
    save_file(load_file(str(checkpoint)), str(target), metadata={**meta, "trainer_state": json.dumps(state)})
    before = {p.name: p.read_bytes() for p in edited.iterdir()}
    refused(capsys, ["--resume", str(target)], f"checkpoint {target}: trainer_state {needle}")
    assert {p.name: p.read_bytes() for p in edited.iterdir()} == before


def test_sigterm_while_the_base_is_pretrained_exits_130_in_a_real_process(tmp_path):
    """From outside, as a job scheduler would: nothing half-pretrained is kept, no temporary folder."""
    out = tmp_path / "runs"
    argv = ["--d_model", "64", "--num_heads", "2", "--num_layers", "2", "--max_seq_len", "32",
            "--base_steps", "100000", "--num_examples", "512", "--batch_size", "32", "--device", "cpu",
            "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "lora/train_lora.py", *argv], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    err = ""
    for line in proc.stderr:  # wait until pretraining has started
        err += line
        if "pretraining one on" in line:
            break
    time.sleep(1.0)
    proc.terminate()
    err += proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err
    assert "Traceback" not in err and "interrupted while pretraining the base model" in err
    assert not list((out / "bases").glob("[!.]*")), "no base, no temporary folder"
