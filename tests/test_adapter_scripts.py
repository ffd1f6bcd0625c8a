"""scripts/generate.py, merge_adapter.py, inspect_adapter.py end to end on a tiny model."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close_scaled, load_script

from lora.config import GENERATED_TASKS, TASKS
from lora.data import cipher_prompt, cipher_task, cipher_text, is_cipher_prompt
from lora.files import read_safetensors
from lora.lora_transformer import LoRATransformer

ROOT = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 260, "d_model": 32, "num_heads": 4, "num_layers": 2, "max_seq_len": 32, "dropout": 0.0}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models; thread start-up would dominate


def script(name: str):
    return load_script(name)


def run(name: str, *args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """``base/``, ``other/`` (same shapes, other weights), adapters ``a/`` (q, v) and ``b/`` (q, k, v, o, MLP)."""
    root = tmp_path_factory.mktemp("scripts")
    torch.manual_seed(0)
    LoRATransformer(**TINY, lora_r=0).save_pretrained(root / "base")
    torch.manual_seed(1)
    LoRATransformer(**TINY, lora_r=0).save_pretrained(root / "other")
    for name, opts in (("a", {}), ("b", {"lora_r": 4, "lora_targets": "q,k,v,o", "adapt_feedforward": True})):
        model = LoRATransformer.from_pretrained(root / "base", **opts)
        with torch.no_grad():
            for _, layer in model.lora_layers():
                layer.lora_B.normal_(std=0.3)
        model.save_adapter(root / name, extra={"task": f"task-{name}"})
    return root


def greedy(folder: Path, adapter: Path | None, prompt: bytes, n: int) -> str:
    model = LoRATransformer.from_pretrained(folder, lora_r=0).eval()
    if adapter is not None:
        model.load_adapter(adapter)
    out = model.generate(torch.tensor([list(prompt)]), n, temperature=0)[0, len(prompt) :]
    return bytes(i for i in out.tolist() if i < 256).decode("utf-8", errors="replace")


def test_generate_shows_base_and_adapters_side_by_side(folders):
    res = run("generate", "--base", folders / "base", "--adapter", folders / "a", "--adapter", folders / "b",
              "--prompt", "héllo", "--max_new_tokens", "12", "--temperature", "0")  # fmt: skip
    assert res.returncode == 0, res.stderr
    sections = re.split(r"^=== (.+) ===$", res.stdout, flags=re.M)[1:]
    labels, texts = sections[0::2], [t.strip("\n") for t in sections[1::2]]
    assert labels == ["base", f"adapter {folders / 'a'}", f"adapter {folders / 'b'}"]
    for text, adapter in zip(texts, (None, folders / "a", folders / "b"), strict=True):
        assert text == "héllo" + greedy(folders / "base", adapter, "héllo".encode(), 12)
    assert len(set(texts)) == 3  # the adapters change the output


def test_generate_sampling_is_seeded(folders):
    gen = script("generate")
    args = ["--base", str(folders / "base"), "--prompt", "ab", "--max_new_tokens", "16", "--top_k", "50"]
    first = gen.run(gen.parse_args([*args, "--seed", "3"]))
    assert first == gen.run(gen.parse_args([*args, "--seed", "3"]))
    assert first != gen.run(gen.parse_args([*args, "--seed", "4"]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--base", "{root}/nowhere", "--prompt", "x"], "nowhere: no such model folder"),
        (["--base", "{root}/base", "--prompt", ""], "--prompt must not be empty"),
        (
            ["--base", "{root}/base", "--prompt", "x", "--temperature", "-1"],
            "--temperature must be a finite number >= 0",
        ),
        (
            ["--base", "{root}/base", "--prompt", "x", "--temperature", "nan"],
            "--temperature must be a finite number >= 0",
        ),
        (["--base", "{root}/base", "--prompt", "x", "--top_k", "0"], "--top_k must be >= 1, got 0"),
        (
            ["--base", "{root}/base", "--prompt", "x", "--top_k", "3", "--temperature", "0"],
            "--top_k has no effect with --temperature 0",
        ),
        (["--base", "{root}/base", "--prompt", "x", "--max_new_tokens", "1000"], "at most"),
        (["--base", "{root}/base", "--prompt", "\udcff"], "--prompt is not valid UTF-8 text"),
        (
            ["--base", "{root}/other", "--adapter", "{root}/a", "--prompt", "x", "--max_new_tokens", "4"],
            "other base weights",
        ),
    ],
)
def test_generate_bad_input_is_one_line_and_exit_2(folders, capsys, args, message):
    rc = script("generate").main([a.format(root=folders) for a in args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_warning_is_one_line_too(folders, capsys):
    """--force loads an adapter of other base weights with a warning: one line, not Python's two with the
    source line."""
    argv = ["--base", str(folders / "other"), "--adapter", str(folders / "a"), "--prompt", "x", "--max_new_tokens",
            "2", "--force"]  # fmt: skip
    assert script("generate").main(argv) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "warning" in line.lower()]
    assert (
        len(warning) == 1
        and warning[0].startswith("generate.py: warning: ")
        and "loaded anyway" in warning[0]
    )
    assert "UserWarning" not in err and "warnings.warn" not in err, err


@pytest.mark.parametrize("kind", GENERATED_TASKS)
def test_a_cipher_prompt_is_what_the_training_data_looks_like(kind):
    """Each training row's input is the cipher_prompt of its plain letters, and its last target the answer."""
    data = cipher_task(kind, 64, seed=3).train
    for x, y in zip(data.x.tolist(), data.y.tolist(), strict=True):
        text, plain = bytes(x).decode(), bytes(x).decode()[::2]
        assert len(plain) == 8 and cipher_prompt(kind, plain) == text and is_cipher_prompt(kind, text)
        assert cipher_text(kind, plain) == text + chr(y[-1])
    assert not is_cipher_prompt(kind, "hello") and not is_cipher_prompt(kind, "")
    with pytest.raises(ValueError, match="made of the letters a-z, got 'Hello'"):
        cipher_prompt(kind, "Hello")


def help_prompts(capsys) -> dict[str, str]:
    """``{task: what generate.py --help says to prompt it with}``."""
    with pytest.raises(SystemExit):
        script("generate").parse_args(["--help"])
    epilog = capsys.readouterr().out.split("prompts that work, task by task")[1]
    return dict(re.findall(r"^  (\w+) +(\S.*)$", epilog, flags=re.M))


def test_generate_help_shows_a_prompt_in_each_task_s_own_format(capsys):
    """--help names every task; the prompt it shows a cipher task is in the format of that task's training
    rows: letter pairs each of the data's own (plain, cipher) pairs, ending on a plain letter."""
    shown = help_prompts(capsys)
    assert set(TASKS) <= set(shown)
    for kind in GENERATED_TASKS:
        prompt = re.fullmatch(r"--prompt ([a-z]+) --max_new_tokens 1 --temperature 0", shown[kind]).group(1)
        rows = [bytes(x).decode() for x in cipher_task(kind, 512, seed=0).train.x.tolist()]
        pairs = {row[i : i + 2] for row in rows for i in range(0, 14, 2)}  # the data's (plain, cipher) pairs
        assert len(prompt) % 2 == 1 and all(prompt[i : i + 2] in pairs for i in range(0, len(prompt) - 1, 2))
    lines = script("generate").__doc__.replace("\\\n", " ").splitlines()  # the module docstring's commands
    checked = 0
    for command in (line for line in lines if line.strip().startswith("python scripts/generate.py")):
        adapters = " ".join(re.findall(r"--adapter (\S+)", command))
        prompt = re.search(r"--prompt (\S+)", command).group(1)
        for kind in (t for t in GENERATED_TASKS if t in adapters):
            assert is_cipher_prompt(kind, prompt), command
            checked += 1
    assert checked == 5  # rot13-lora-r8; multitask-rot13 and multitask-atbash, twice


def test_a_cipher_adapter_given_a_prompt_in_another_format_warns_in_one_line(folders, tmp_path, capsys):
    model = LoRATransformer.from_pretrained(folders / "base")
    model.save_adapter(tmp_path / "rot13", extra={"task": "rot13"})
    argv = ["--base", str(folders / "base"), "--adapter", str(tmp_path / "rot13"), "--max_new_tokens", "1",
            "--temperature", "0"]  # fmt: skip
    assert script("generate").main([*argv, "--prompt", "hello"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("generate.py: warning: the adapter ")
    assert "was trained on rot13" in warning[0] and "'hello' is not in that format" in warning[0]
    assert f"--prompt {cipher_prompt('rot13', 'hello')} --max_new_tokens 1" in warning[0]
    assert script("generate").main([*argv, "--prompt", "huerlylyo"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_merge_adapter_writes_an_equivalent_plain_model(folders, tmp_path):
    res = run(
        "merge_adapter", "--base", folders / "base", "--adapter", folders / "b", "--out", tmp_path / "m"
    )
    assert res.returncode == 0, res.stderr
    found = re.search(
        r"max \|merged - unmerged\| logits on a random batch: (\S+) \(max \|logit\| (\S+);", res.stdout
    )
    assert found, res.stdout
    diff, largest = float(found.group(1)), float(found.group(2))
    assert diff <= 1e-5 * max(1.0, largest)  # rounding grows with the logits' size
    assert not any("lora_" in k for k in read_safetensors(tmp_path / "m" / "model.safetensors"))
    merged = LoRATransformer.from_pretrained(tmp_path / "m", lora_r=0).eval()
    model = LoRATransformer.from_pretrained(folders / "base", lora_r=0).eval()
    model.load_adapter(folders / "b")
    idx = torch.randint(0, 260, (3, 32))
    assert_close_scaled(merged(idx), model(idx), 1e-5)

    again = run(
        "merge_adapter", "--base", folders / "base", "--adapter", folders / "b", "--out", tmp_path / "m"
    )
    assert again.returncode == 2 and "already holds a model; pass --overwrite" in again.stderr


def test_merge_adapter_refuses_above_tolerance_and_writes_nothing(folders, tmp_path, capsys):
    merge = script("merge_adapter")
    out = tmp_path / "m"
    rc = merge.main(["--base", str(folders / "base"), "--adapter", str(folders / "a"), "--out", str(out),
                     "--tolerance", "1e-30"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "> tolerance 1e-30 x" in err and "Traceback" not in err
    assert not out.exists()
    rc = merge.main(["--base", str(folders / "other"), "--adapter", str(folders / "a"), "--out", str(out)])
    assert rc == 2 and "--force" in capsys.readouterr().err and not out.exists()
    before = {p: p.read_bytes() for p in folders.rglob("*") if p.is_file()}
    for extra, message in (
        (["--tolerance", "inf"], "--tolerance must be a finite number > 0, got inf"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (
            ["--out", str(folders / "base"), "--overwrite"],
            "is the --base folder: the merged model would replace it",
        ),
        (["--out", str(folders / "a"), "--overwrite"], "is the --adapter folder"),
    ):
        argv = ["--base", str(folders / "base"), "--adapter", str(folders / "a"), "--out", str(out), *extra]
        assert merge.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists() and {p: p.read_bytes() for p in folders.rglob("*") if p.is_file()} == before


def test_inspect_adapter_reports_modules_norms_and_fit(folders):
    res = run("inspect_adapter", "--adapter", folders / "b", "--base", folders / "base")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "task-b" in out and "adapter_model.safetensors" in out
    assert re.search(r"base .*: fits: architecture and shapes match, fingerprint [0-9a-f]{16} matches", out)
    tensors = read_safetensors(folders / "b" / "adapter_model.safetensors")
    A, B = tensors["blocks.1.mlp.fc1.lora_A"], tensors["blocks.1.mlp.fc1.lora_B"]  # (4, 32), (128, 4)
    norm = torch.linalg.matrix_norm(B @ A).item()
    row = re.search(r"^blocks\.1\.mlp\.fc1\s+(\d+)\s+([\d,]+)\s+(\S+)\s+(\S+)$", out, flags=re.M)
    assert row.group(1) == "4" and row.group(2) == f"{4 * (32 + 128):,}"
    assert float(row.group(3)) == pytest.approx(norm, rel=1e-3)
    assert float(row.group(4)) == pytest.approx(norm * 16 / 4, rel=1e-3)  # scaling = alpha / r
    total = 2 * (4 * 4 * (32 + 32) + 2 * 4 * (32 + 128))  # layers x (attention q k v o + MLP fc1 fc2)
    assert re.search(rf"^total\s+{total:,}$", out, flags=re.M)


def test_inspect_adapter_says_when_it_does_not_fit(folders, tmp_path, capsys):
    inspect = script("inspect_adapter")
    assert inspect.main(["--adapter", str(folders / "a"), "--base", str(folders / "other")]) == 1
    assert "shapes fit, but adapter was trained on other base weights" in capsys.readouterr().out
    torch.manual_seed(0)
    LoRATransformer(**{**TINY, "d_model": 64}, lora_r=0).save_pretrained(tmp_path / "wide")
    assert inspect.main(["--adapter", str(folders / "a"), "--base", str(tmp_path / "wide")]) == 1
    assert (
        "does not fit: adapter was trained on a base of another architecture: d_model"
        in capsys.readouterr().out
    )
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{")
    assert inspect.main(["--adapter", str(tmp_path / "broken")]) == 2
    assert "adapter_config.json: not valid JSON" in capsys.readouterr().err


def test_generation_interrupted_keeps_its_text(folders, capsys, monkeypatch):
    """SIGTERM (or Ctrl-C) after 7 of 20 tokens: those 7 are printed, exit 130, no traceback."""
    gen = script("generate")
    real, calls = LoRATransformer.generate, []

    def stop_at_call_8(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoRATransformer, "generate", stop_at_call_8)
    args = ["--base", str(folders / "base"), "--prompt", "ab", "--max_new_tokens", "20", "--temperature", "0"]
    assert gen.main(args) == 130
    out, err = capsys.readouterr()
    assert err == "generate.py: interrupted after 7 tokens\n"
    monkeypatch.undo()
    full = gen.run(gen.parse_args([*args[:5], "7", *args[6:]]))[0][1]
    assert out == f"=== base ===\nab{full}\n\n"  # the same 7 tokens an uninterrupted run gives


SCRIPTS = ["generate", "inspect_adapter", "merge_adapter", "export_peft", "multitask_demo", "benchmark",
           "visualize_lora", "compare_methods", "sweep"]  # fmt: skip


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_s_usage_error_is_one_line_with_a_pointer_to_help(name):
    res = run(name, "--no-such-option")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"{name}.py: error: ") and res.stderr.endswith("(see --help)\n"), res.stderr
