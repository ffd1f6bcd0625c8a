"""One command, three methods: the frozen base, LoRA and full fine-tuning on the same task, data, steps and
seed, side by side.

    python scripts/compare_methods.py                                   # the default task (ROT13)
    python scripts/compare_methods.py --config configs/code.yaml --max_steps 100
    python scripts/compare_methods.py --lora_r 4 --full_learning_rate 3e-4

Any ``train_lora.py`` option applies to both runs (LoRA options only to LoRA); full fine-tuning takes
``--full_learning_rate`` (default 1e-3, as configs/full_finetune.yaml: every weight moves, so a gentler
rate). Each run is a fresh process, so its peak memory is its own. Writes ``<output_dir>/compare/``:
comparison.md, comparison.csv, comparison.png (the validation curves overlaid) and report.html (linking to
each run's own report), and the two run
folders ``<output_dir>/compare-lora`` and ``<output_dir>/compare-full`` (an earlier comparison is replaced
only with ``--overwrite``). Every setting of both runs is checked before either starts.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/compare_methods.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch is imported: one line, exit 130
        from lora.errors import exit_on_signals

        exit_on_signals()

import yaml

from lora.config import CommandLineParser, TrainConfig, load_config_and_flags
from lora.errors import LoRAError, guarded
from lora.figures import lines
from lora.files import atomic_write_bytes
from lora.formats import ADAPTER_WEIGHTS_NAME, WEIGHTS_NAME
from lora.report import write_summary_report
from lora.run_folder import output_root, refuse_replacing, refuse_uncreatable

ROOT = Path(__file__).resolve().parents[1]
# runs a TrainConfig saved as YAML; its LoRA settings simply do not apply to method full
DRIVER = """
import sys, yaml
from lora.application import run
from lora.config import TrainConfig
from lora.errors import guarded
body = lambda: run(TrainConfig(**yaml.safe_load(open(sys.argv[1]))).validate()) and 0
sys.exit(guarded("", body))
"""
COLUMNS = (
    "method",
    "final metric",
    "trainable params",
    "bytes stored",
    "step (ms)",
    "tokens/s",
    "peak RSS (MiB)",
)


def run_method(cfg: TrainConfig, folder: Path) -> dict:
    """Train ``cfg`` in a fresh process; its metrics, history and peak resident memory (from ``wait4``)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    spec = folder.parent / f".{folder.name}.yaml"
    spec.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(spec)], cwd=Path.cwd(),
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    spec.unlink(missing_ok=True)
    if os.waitstatus_to_exitcode(status) != 0:
        raise LoRAError(f"the {cfg.method} run failed (exit {os.waitstatus_to_exitcode(status)}); see above")
    metrics = json.loads((folder / "metrics.json").read_text())
    history = json.loads((folder / "history.json").read_text())
    return {"metrics": metrics, "history": history, "peak_rss_mib": usage.ru_maxrss / 1024}


def table_rows(lora: dict, full: dict, lora_dir: Path, full_dir: Path) -> list[dict]:
    """The comparison table: one row per method."""

    def row(name: str, result: dict, stored: int) -> dict:
        m, h = result["metrics"], result["history"]
        return {"method": name, "final metric": m["final_metric"], "trainable params": m["trainable_params"],
                "bytes stored": stored, "step (ms)": 1000 * h["elapsed_s"][-1] / m["steps"],
                "tokens/s": m["tokens_per_s"], "peak RSS (MiB)": result["peak_rss_mib"]}  # fmt: skip

    base = {"method": "frozen base", "final metric": lora["metrics"]["base_metric"], "trainable params": 0,
            "bytes stored": 0, "step (ms)": None, "tokens/s": None, "peak RSS (MiB)": None}  # fmt: skip
    return [base, row("LoRA", lora, (lora_dir / ADAPTER_WEIGHTS_NAME).stat().st_size),
            row("full fine-tuning", full, (full_dir / "model" / WEIGHTS_NAME).stat().st_size)]  # fmt: skip


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4f}" if value < 10 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


OWN_KEYS = {"method": "lora", "run_name": None, "resume": None}  # what the script sets for its two runs


def plan(cfg: TrainConfig, full_learning_rate: float,
         flags: frozenset[str] = frozenset()) -> tuple[TrainConfig, TrainConfig]:  # fmt: skip
    """The two runs' settings, every one checked before either trains: the LoRA run and full fine-tuning at
    ``full_learning_rate``, named ``compare-lora`` and ``compare-full``; earlier ones are replaced only with
    ``--overwrite``. The method, run name and resume are the script's: refused as ``flags`` (given on the
    command line), reported and ignored when a preset YAML sets them."""
    given = [k for k, own in OWN_KEYS.items() if getattr(cfg, k) != own]
    if refused := [k for k in given if k in flags]:
        raise LoRAError(f"the runs are LoRA's and full fine-tuning's, compare-lora and compare-full, started "
                        f"afresh: drop --{refused[0]}")  # fmt: skip
    if given:
        warnings.warn(f"the config sets {', '.join(given)}, which the comparison sets itself; ignored",
                      stacklevel=1)  # fmt: skip
    lora_cfg = dataclasses.replace(cfg, **{**OWN_KEYS, "run_name": "compare-lora"}).validate()
    full_cfg = dataclasses.replace(lora_cfg, method="full", run_name="compare-full",
                                   learning_rate=full_learning_rate)  # fmt: skip
    try:
        full_cfg.validate()
    except LoRAError as e:  # it is the script's own flag that set it
        raise LoRAError(str(e).replace("learning_rate", "full_learning_rate", 1)) from None
    root = output_root(cfg.output_dir)
    refuse_replacing([root / "compare-lora", root / "compare-full"], cfg.overwrite, "an earlier comparison")
    refuse_uncreatable(
        [root / "compare-lora", root / "compare-full", root / "compare"]
    )  # (compare: written last)
    return lora_cfg, full_cfg


def compare(cfg: TrainConfig, full_learning_rate: float,
            flags: frozenset[str] = frozenset()) -> tuple[list[dict], Path]:  # fmt: skip
    root = output_root(cfg.output_dir)
    lora_cfg, full_cfg = plan(cfg, full_learning_rate, flags)
    lora = run_method(lora_cfg, root / "compare-lora")
    full = run_method(full_cfg, root / "compare-full")
    rows = table_rows(lora, full, root / "compare-lora", root / "compare-full")
    metric = lora["metrics"]["metric_name"]
    out = root / "compare"
    header = "| " + " | ".join(COLUMNS) + " |\n|---|" + "---:|" * (len(COLUMNS) - 1) + "\n"
    md = header + "".join("| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |\n" for r in rows)
    md += (f"\nTask {lora['metrics']['task']}, metric {metric}, {lora['metrics']['steps']} steps, seed {cfg.seed}; "
           f"learning rate {cfg.learning_rate:g} (LoRA) and {full_learning_rate:g} (full). Bytes stored: what a "
           "run adds beside the shared base (the adapter file, or the whole model).\n")  # fmt: skip
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    curves = {}
    for name, result in (("LoRA", lora), ("full fine-tuning", full)):
        h = result["history"]
        points = [(s, v) for s, v in zip(h["step"], h["metric"], strict=True) if v is not None]
        curves[name] = ([s for s, _ in points], [v for _, v in points], None)
    png = lines(curves, f"{lora['metrics']['task']}: the frozen base, LoRA and full fine-tuning",
                "optimizer step", f"{metric} (validation)", hlines={"frozen base": lora["metrics"]["base_metric"]})  # fmt: skip
    atomic_write_bytes(out / "comparison.md", md.encode())
    atomic_write_bytes(out / "comparison.csv", buffer.getvalue().encode())
    atomic_write_bytes(out / "comparison.png", png)
    write_summary_report(out, f"{lora['metrics']['task']}: the frozen base, LoRA and full fine-tuning",
                         {"LoRA": root / "compare-lora", "full fine-tuning": root / "compare-full"},
                         ["comparison.png"], md.split("\n\n")[-1].strip())  # fmt: skip
    return rows, out


def main(argv: Sequence[str] | None = None) -> int:
    p = CommandLineParser(prog="compare_methods.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="Any option of train_lora.py applies too: python lora/train_lora.py --help")  # fmt: skip
    p.add_argument("--full_learning_rate", type=float, default=1e-3, help="learning rate of full fine-tuning")
    own, rest = p.parse_known_args(argv)

    def body() -> int:
        cfg, flags = load_config_and_flags(rest, prog="compare_methods.py")
        _, out = compare(cfg, own.full_learning_rate, flags)
        print((out / "comparison.md").read_text(), end="")
        print(f"wrote comparison.md, comparison.csv, comparison.png and report.html to {out}")
        return 0

    return guarded("compare_methods.py", body, "--debug" in rest)


if __name__ == "__main__":
    raise SystemExit(main())
