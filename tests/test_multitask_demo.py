"""The multi-task demonstration: two adapters on one base, switched in one model."""

import json
import subprocess
import sys
from pathlib import Path

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
    cfg.write_text(TINY)
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "scripts/multitask_demo.py", "--config", str(cfg), "--output_dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "multitask" / "multitask.json").read_text())
    assert summary["base_unchanged"] and summary["each_adapter_gets_its_score_back"]
    assert sorted(summary["adapters_loaded"]) == ["atbash", "rot13"]
    for task in ("rot13", "atbash"):
        assert summary["exact_match"][task][task] == summary["at_end_of_training"][task]
        assert summary["adapter_bytes"][task] < summary["base_bytes"] / 4
    assert len(list((out / "bases").glob("[!.]*"))) == 1  # one base, pretrained once, shared
    assert "| + rot13 adapter |" in (out / "multitask" / "multitask.md").read_text()
