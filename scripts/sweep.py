"""The LoRA paper's tables on a laptop: metric against rank and target matrices, several seeds a cell.

    python scripts/sweep.py --mode rank --seeds 0,1        # q+v and q+k+v+o at r = 1 ... 64 (the paper's Table 6)
    python scripts/sweep.py --mode budget --seeds 0,1      # one budget over 1, 2 or 4 matrix types (Table 5)
    python scripts/sweep.py --mode grid --ranks 1,2,4,8 --targets q,v,qv,qkvo --mlp both
    python scripts/sweep.py --mode grid --ranks 8 --targets qv --learning_rates 1e-3,3e-3,1e-2
    python scripts/sweep.py --mode rank --config configs/code.yaml --max_steps 100
    python scripts/sweep.py --mode variants --max_steps 100   # LoRA, Gaussian, PiSSA, OLoRA, DoRA, LoRA+, nf4

Any ``train_lora.py`` option sets the shared settings. ``lora_alpha`` follows the rank (``alpha = 2 r``,
the default's scaling of 2), so cells differ in rank and targets only; grid mode's ``--learning_rates`` adds
the peak learning rate as an axis (every rank and target set at each). Every cell is a normal run (its
folder under ``<output_dir>/sweep-<mode>/runs/``, on the shared base); results.json is written after
each cell, and an interrupted sweep resumes where it stopped (finished cells are not run again; a sweep
with other shared settings is refused rather than mixed in).
Writes ``<output_dir>/sweep-<mode>/``: results.json, table.md (mean and spread over seeds),
metric_vs_rank.png and heatmap.png (target set x rank), and report.html (every cell's run, linking to its
own report). The variants mode compares the LoRA variants
(:data:`VARIANTS`) at the shared rank and targets (``lora_alpha`` as given): table.md only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/sweep.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch is imported: one line, exit 130
        from lora.errors import exit_on_signals

        exit_on_signals()

from tqdm.auto import tqdm

from lora.application import run, say
from lora.base_model import ensure_base
from lora.config import CommandLineParser, TrainConfig, load_config_and_flags
from lora.errors import LoRAError, guarded, quote
from lora.figures import heatmap, lines
from lora.files import atomic_write_bytes
from lora.report import write_summary_report
from lora.run_folder import output_root
from lora.trainer import resolve_device

RANK_RANKS = (1, 2, 4, 8, 16, 32, 64)
BUDGET = (("q", 8), ("k", 8), ("v", 8), ("o", 8), ("qk", 4), ("qv", 4), ("qkvo", 2))  # same parameters each
# the variants mode: each one's settings beside plain LoRA's (Kaiming A, B = 0)
VARIANTS = {
    "LoRA (kaiming)": {},
    "gaussian init": {"lora_init": "gaussian"},
    "PiSSA init": {"lora_init": "pissa"},
    "OLoRA init": {"lora_init": "olora"},
    "DoRA": {"use_dora": True},
    "LoRA+ (ratio 16)": {"lora_plus_ratio": 16.0},
    "nf4 base (QLoRA)": {"quantize_base": "nf4"},
}
# what the variants set, at plain LoRA's values: each cell starts from these
VARIANT_DEFAULTS = {k: getattr(TrainConfig(), k) for settings in VARIANTS.values() for k in settings}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One configuration of the sweep: target set (letters of q, k, v, o), MLP too or not, rank, seed, and the
    learning rate (``None``: the shared one)."""

    targets: str
    mlp: bool
    r: int
    seed: int
    variant: str | None = None  # a key of VARIANTS (the variants mode)
    lr: float | None = None  # grid mode's --learning_rates

    @property
    def key(self) -> str:
        kind = "" if self.variant is None else "-" + "".join(c for c in self.variant if c.isalnum()).lower()
        lr = "" if self.lr is None else f"-lr{self.lr:g}"
        return f"{self.targets}{'+mlp' if self.mlp else ''}-r{self.r}{lr}{kind}-s{self.seed}"

    @property
    def label(self) -> str:
        return self.variant or "+".join(self.targets) + (" + MLP" if self.mlp else "")


def cells(mode: str, ranks: Sequence[int], targets: Sequence[str], mlp: Sequence[bool], seeds: Sequence[int],
          shared: TrainConfig | None = None, learning_rates: Sequence[float | None] = (None,)) -> list[Cell]:  # fmt: skip
    if mode == "variants":  # at the shared rank and targets
        t, m, r = "".join(shared.lora_targets), shared.adapt_feedforward, shared.lora_r
        return [Cell(t, m, r, s, v) for v in VARIANTS for s in seeds]
    if mode == "rank":
        return [Cell(t, False, r, s) for t in ("qv", "qkvo") for r in ranks for s in seeds]
    if mode == "budget":
        return [Cell(t, False, r, s) for t, r in BUDGET for s in seeds]
    return [Cell(t, m, r, s, lr=lr) for t in targets for m in mlp for r in ranks for lr in learning_rates
            for s in seeds]  # fmt: skip


def cell_config(shared: TrainConfig, cell: Cell, root: Path, base: Path) -> TrainConfig:
    """The run of one cell: the shared settings with the cell's targets, rank (alpha = 2 r), seed and learning
    rate if it has one; a variant cell keeps the shared alpha and adds its variant's settings."""
    alpha = shared.lora_alpha if cell.variant is not None else 2.0 * cell.r
    variant = {**VARIANT_DEFAULTS, **VARIANTS[cell.variant]} if cell.variant is not None else {}
    if cell.lr is not None:
        variant["learning_rate"] = cell.lr
    return dataclasses.replace(
        shared, lora_targets=list(cell.targets), adapt_feedforward=cell.mlp, lora_r=cell.r,
        lora_alpha=alpha, seed=cell.seed, run_name=cell.key, output_dir=str(root / "runs"),
        overwrite=True, resume=None, base_checkpoint=str(base), **variant,
    ).validate()  # fmt: skip


Summary = dict[tuple[str, int, float | None], tuple[float, float, int]]


def summarise(results: dict[str, dict], todo: list[Cell]) -> Summary:
    """``(label, r, lr) -> (mean, spread, params)`` of the metric over the seeds (spread: the standard deviation, 0
    for one; ``lr`` the cell's learning rate, ``None`` for the shared one)."""
    groups: dict[tuple[str, int, float | None], list[dict]] = {}
    for cell in todo:
        if cell.key in results:
            groups.setdefault((cell.label, cell.r, cell.lr), []).append(results[cell.key])
    out = {}
    for key, found in groups.items():
        values = [f["metric"] for f in found]
        out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                    found[0]["trainable_params"])  # fmt: skip
    return out


def write_variants_table(folder: Path, results: dict[str, dict], todo: list[Cell], metric: str) -> None:
    """table.md of the variants mode: per variant the metric and validation loss, mean and spread over seeds,
    the trainable parameters and the run's peak memory."""
    rows = [f"| variant | trainable | {metric} (mean ± sd) | val loss (mean ± sd) | peak memory (MiB) | seeds |",
            "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for variant in VARIANTS:
        found = [results[c.key] for c in todo if c.variant == variant and c.key in results]
        if not found:
            continue

        def stat(key: str, runs: list[dict] = found) -> str:
            values = [f[key] for f in runs if f.get(key) is not None]
            if not values:
                return "n/a"
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.fmean(values):.4f} ± {spread:.4f}"

        peaks = [f["peak_memory_mb"] for f in found if f.get("peak_memory_mb") is not None]
        peak = f"{max(peaks):,.0f}" if peaks else "n/a"
        rows.append(f"| {variant} | {found[0]['trainable_params']:,} | {stat('metric')} | {stat('val_loss')} | "
                    f"{peak} | {len(found)} |")  # fmt: skip
    atomic_write_bytes(folder / "table.md", ("\n".join(rows) + "\n").encode())


def write_reports(
    folder: Path, summary: Summary, metric: str, mode: str, seeds: int, learning_rate: float
) -> None:
    """table.md (a row per target set, rank and learning rate: ``learning_rate`` where a cell has none of its
    own), and metric_vs_rank.png and heatmap.png with a line and a row per target set (and learning rate)."""
    lines_md = [
        f"| targets | r | learning rate | trainable | {metric} (mean) | spread over {seeds} seeds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (label, r, lr), (mean, spread, params) in summary.items():
        lines_md.append(f"| {label} | {r} | {learning_rate if lr is None else lr:g} | {params:,} | {mean:.4f} | "
                        f"{spread:.4f} |")  # fmt: skip
    atomic_write_bytes(folder / "table.md", ("\n".join(lines_md) + "\n").encode())
    # a line (and a heatmap row) per target set, and learning rate where the sweep has several
    by_line = {(lab if lr is None else f"{lab}, lr {lr:g}", r): v for (lab, r, lr), v in summary.items()}
    labels = list(dict.fromkeys(label for label, _ in by_line))
    ranks = sorted({r for _, r in by_line})
    series = {}
    for label in labels:
        points = sorted((r, m, s) for (lab, r), (m, s, _) in by_line.items() if lab == label)
        series[label] = ([p[0] for p in points], [p[1] for p in points], [p[2] for p in points])
    atomic_write_bytes(folder / "metric_vs_rank.png", lines(
        series, f"sweep ({mode}): {metric} against rank, mean and spread over {seeds} seeds", "rank r (log scale)",
        f"{metric} (validation)", logx=True))  # fmt: skip
    grid = [[by_line.get((label, r), (float("nan"),))[0] for r in ranks] for label in labels]
    atomic_write_bytes(folder / "heatmap.png", heatmap(
        grid, labels, [str(r) for r in ranks], f"sweep ({mode}): {metric}, mean over {seeds} seeds",
        "rank r", "adapted matrices", metric))  # fmt: skip


# what a cell sets itself (or what changes no result: debug, log_to); every other setting is the sweep's,
# recorded in results.json (and learning_rate too, unless the cells set it: --learning_rates)
PER_CELL = ("lora_r", "lora_alpha", "lora_targets", "adapt_feedforward", "seed", "run_name", "output_dir",
            "overwrite", "resume", "base_checkpoint", "debug", "log_to",
            *{k for settings in VARIANTS.values() for k in settings})  # fmt: skip


def sweep(shared: TrainConfig, mode: str, todo: list[Cell]) -> Path:
    root = output_root(shared.output_dir)
    folder = root / f"sweep-{mode}"
    results_path = folder / "results.json"
    per_cell = (*PER_CELL, "learning_rate") if any(c.lr is not None for c in todo) else PER_CELL
    settings = {k: v for k, v in shared.to_saved().items() if k not in per_cell}
    saved = (
        json.loads(results_path.read_text())
        if results_path.is_file()
        else {"settings": settings, "cells": {}}
    )
    if saved.get("settings") != settings:  # resuming another sweep's results would mix two experiments
        differ = sorted(k for k in settings if saved.get("settings", {}).get(k) != settings[k])
        raise LoRAError(f"{results_path} holds a sweep made with other settings ({', '.join(differ) or 'unknown'}): "
                        "use another --output_dir, or delete it to start afresh")  # fmt: skip
    results = saved["cells"]
    base = ensure_base(shared, resolve_device(shared.device), say)
    with tqdm(todo, desc=f"sweep {mode}", unit="cell") as bar:
        for cell in bar:
            if cell.key in results:  # finished before an interruption: not run again
                continue
            bar.set_postfix_str(cell.key)
            cfg = cell_config(shared, cell, folder, base)
            metrics = run(cfg)
            results[cell.key] = {"metric": metrics["final_metric"], "metric_name": metrics["metric_name"],
                                 "learning_rate": cfg.learning_rate,
                                 "trainable_params": metrics["trainable_params"], "steps": metrics["steps"],
                                 "val_loss": metrics.get("final_val_loss"),
                                 "peak_memory_mb": metrics.get("peak_memory_mb")}  # fmt: skip
            atomic_write_bytes(results_path, (json.dumps(saved, indent=2) + "\n").encode())
    metric = next(iter(results.values()))["metric_name"] if results else "metric"
    if mode == "variants":
        write_variants_table(folder, results, todo, metric)
    else:
        write_reports(folder, summarise(results, todo), metric, mode, len({c.seed for c in todo}),
                      shared.learning_rate)  # fmt: skip
    write_summary_report(folder, f"sweep ({mode})", {c.key: folder / "runs" / c.key for c in todo},
                         ["metric_vs_rank.png", "heatmap.png"])  # fmt: skip
    return folder


# the sweep's own flags, and the modes that use each
MODE_FLAGS = {"ranks": ("rank", "grid"), "targets": ("grid",), "mlp": ("grid",), "learning_rates": ("grid",)}
# what each mode's cells set themselves (so the same option given for the runs would be ignored)
MODE_SETS = {
    "rank": "its cells set the rank (alpha = 2 r) and targets (q+v, q+k+v+o) and take the seeds of --seeds",
    "budget": "its cells set the rank (alpha = 2 r) and targets of one budget and take the seeds of --seeds",
    "grid": "its cells set the rank (alpha = 2 r) and targets (--ranks, --targets, --mlp), with --learning_rates "
            "the learning rate, and take the seeds of --seeds",
    "variants": "its cells set the variants themselves at the shared --lora_r and --lora_targets and take the "
                "seeds of --seeds",
}  # fmt: skip
CELL_KEYS = ("lora_r", "lora_alpha", "lora_targets", "adapt_feedforward")  # set per cell but in variants mode


def ignored_options(mode: str, shared: TrainConfig, flags: frozenset[str],
                    own_given: dict[str, bool]) -> tuple[list[str], list[str]]:  # fmt: skip
    """What ``mode``'s cells would override: ``(flags given on the command line, refused: --name each;
    keys a preset YAML set away from their defaults, reported and ignored)``."""
    default = TrainConfig()
    cell = list(VARIANT_DEFAULTS) if mode == "variants" else list(CELL_KEYS)
    keys = ["seed", "run_name", "resume", *cell]
    if own_given.get("learning_rates") and mode in MODE_FLAGS["learning_rates"]:
        keys.append("learning_rate")
    refused = [f"--{k}" for k in keys if k in flags]
    refused += [f"--{k}" for k, modes in MODE_FLAGS.items() if own_given[k] and mode not in modes]
    moot = [k for k in keys if k not in flags and getattr(shared, k) != getattr(default, k)]
    return refused, moot


def _ints(text: str, name: str, low: int) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``: at least one, each once, none below ``low``."""
    try:
        values = list(dict.fromkeys(int(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise LoRAError(f"--{name} must be comma-separated integers, got {quote(text)}") from None
    if not values or min(values) < low:
        raise LoRAError(f"--{name} must list integers >= {low}, got {quote(text)}")
    return values


def _learning_rates(text: str | None) -> list[float | None]:
    """``"1e-3,3e-3"`` -> ``[0.001, 0.003]``: at least one, each once, every one a finite number > 0; ``None``
    (not given) -> ``[None]``: the shared learning rate."""
    if text is None:
        return [None]
    try:
        values = list(dict.fromkeys(float(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise LoRAError(f"--learning_rates must be comma-separated numbers, got {quote(text)}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise LoRAError(f"--learning_rates must list finite numbers > 0, got {quote(text)}")
    shown = [f"{v:g}" for v in values]  # as the cells' names write them: two alike would share one cell
    if same := next((s for s in shown if shown.count(s) > 1), None):
        raise LoRAError(f"--learning_rates lists two rates that both read {same} (6 significant digits): "
                        f"give rates that differ there")  # fmt: skip
    return values


def main(argv: Sequence[str] | None = None) -> int:
    p = CommandLineParser(prog="sweep.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="Any option of train_lora.py applies too: python lora/train_lora.py --help")  # fmt: skip
    p.add_argument("--mode", choices=("rank", "budget", "grid", "variants"), default="rank")
    p.add_argument("--ranks", default=",".join(map(str, RANK_RANKS)), help="grid and rank modes")
    p.add_argument(
        "--targets", default="q,k,v,o,qv,qkvo", help="grid mode: target sets, letters of q, k, v, o"
    )
    p.add_argument(
        "--mlp", choices=("no", "yes", "both"), default="no", help="grid mode: the MLP adapted too"
    )
    p.add_argument("--learning_rates", default=None,
                   help="grid mode: peak learning rates, each cell at each, e.g. 1e-3,3e-3,1e-2 (default: the "
                        "shared --learning_rate)")  # fmt: skip
    p.add_argument("--seeds", default="0,1,2")
    own, rest = p.parse_known_args(argv)

    def body() -> int:
        shared, flags = load_config_and_flags(rest, prog="sweep.py")
        targets = list(dict.fromkeys(t.strip() for t in own.targets.split(",") if t.strip()))
        bad = [t for t in targets if set(t) - set("qkvo") or len(set(t)) != len(t)]
        if bad or not targets:
            raise LoRAError(
                f"--targets must be sets of the letters q, k, v, o, each letter once, got {quote(own.targets)}"
            )
        mlp = {"no": [False], "yes": [True], "both": [False, True]}[own.mlp]
        given = {k: getattr(own, k) != p.get_default(k) for k in MODE_FLAGS}
        ignored, moot = ignored_options(own.mode, shared, flags, given)
        if ignored:
            raise LoRAError(f"{', '.join(ignored)} has no effect with --mode {own.mode}: {MODE_SETS[own.mode]}; "
                            "drop it")  # fmt: skip
        if moot:  # a preset's (configs/code.yaml sets the targets): the sweep's cells are the experiment
            warnings.warn(f"the config sets {', '.join(moot)}, which --mode {own.mode} sets per cell; ignored",
                          stacklevel=1)  # fmt: skip
        todo = cells(own.mode, _ints(own.ranks, "ranks", 1), targets, mlp, _ints(own.seeds, "seeds", 0), shared,
                     _learning_rates(own.learning_rates))  # fmt: skip
        folder = sweep(shared, own.mode, todo)
        print((folder / "table.md").read_text(), end="")
        pictures = "" if own.mode == "variants" else ", metric_vs_rank.png, heatmap.png"
        print(f"wrote results.json, table.md{pictures} and report.html to {folder}")
        return 0

    return guarded("sweep.py", body, "--debug" in rest)


if __name__ == "__main__":
    raise SystemExit(main())
