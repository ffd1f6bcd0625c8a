"""The multi-task demonstration: two adapters on one base, switched in one model."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = """d_model: 32
num_heads: 2
num_layers: 1
max_seq_len: 32
base_steps: 60
max_steps: 30
num_examples: 512
batch_size: 32
eval_every: 10
device: cpu
"""


def test_two_adapters_share_one_base_and_switch_back(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY + "task: rot13\n")  # as configs/rot13.yaml names it: the demo sets it per run
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "scripts/multitask_demo.py", "--config", str(cfg), "--output_dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "multitask_demo.py: warning: the config sets task, which the demo sets for each run; ignored" in (
        proc.stderr
    )
    summary = json.loads((out / "multitask" / "multitask.json").read_text())
    assert summary["base_unchanged"] and summary["each_adapter_gets_its_score_back"]
    assert sorted(summary["adapters_loaded"]) == ["atbash", "rot13"]
    for task in ("rot13", "atbash"):
        assert summary["exact_match"][task][task] == summary["at_end_of_training"][task]
        assert summary["adapter_bytes"][task] < summary["base_bytes"] / 4
    assert len(list((out / "bases").glob("[!.]*"))) == 1  # one base, pretrained once, shared
    assert "| + rot13 adapter |" in (out / "multitask" / "multitask.md").read_text()


def demo_script():
    """``scripts/multitask_demo.py`` as a module, to call its ``main`` in-process."""
    spec = importlib.util.spec_from_file_location("multitask_demo", ROOT / "scripts" / "multitask_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_the_demo_refuses_before_training_what_it_would_ignore_or_replace(tmp_path, capsys):
    """Full fine-tuning and an earlier demo's runs: refused, nothing written."""
    demo = demo_script()
    out = tmp_path / "runs"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY + "method: full\n")
    assert demo.main(["--config", str(cfg), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the demo trains adapters: drop method" in err, err
    assert not out.exists()
    (out / "multitask-atbash").mkdir(parents=True)
    (tmp_path / "c.yaml").write_text(TINY)
    assert demo.main(["--config", str(tmp_path / "c.yaml"), "--output_dir", str(out)]) == 2
    assert "multitask-atbash exists (an earlier demo): pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["multitask-atbash"]


@pytest.mark.parametrize(("file", "needle"), [
    ("runs/multitask", "cannot create the folder {out}/multitask: it exists and is not a folder"),
    ("runs", "cannot create the folder {out}/multitask-rot13: {out} exists and is not a folder"),
])  # fmt: skip
def test_a_file_where_a_folder_must_go_is_refused_before_training(file, needle, tmp_path, capsys):
    """The summary's folder (written after both runs) or the output folder is a file: refused, nothing written."""
    out, cfg = tmp_path / "runs", tmp_path / "c.yaml"
    cfg.write_text(TINY)
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert demo_script().main(["--config", str(cfg), "--output_dir", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err == f"multitask_demo.py: error: {needle.format(out=out)}\n", err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / file).read_text() == "mine"
