"""Two adapters, two tasks, one frozen base: train both, then switch between them in one model.

    python scripts/multitask_demo.py                 # trains rot13 and atbash adapters on the Caesar base
    python scripts/multitask_demo.py --config configs/default.yaml --output_dir runs

Both runs share the base that ``train_lora.py`` pretrains once (``runs/bases/caesar-...``). The demo then
loads that base a single time, loads both adapters onto it, and scores every (adapter, task) pair: each
adapter gives its own task its accuracy back, the base stays bit-for-bit the same (its fingerprint is
checked before and after), and each adapter file is a small fraction of the base's size. It writes
``multitask.json`` and ``multitask.md`` into ``<output_dir>/multitask/``. Both runs' settings are checked
before either trains; earlier ``multitask-*`` runs are replaced only with ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/multitask_demo.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch is imported: one line, exit 130
        from lora.errors import exit_on_signals

        exit_on_signals()

from lora.application import run
from lora.config import CommandLineParser, load_yaml, resolve_config
from lora.data import BatchLoader, load_task
from lora.errors import ConfigError, guarded
from lora.files import atomic_write_bytes
from lora.lora_transformer import LoRATransformer
from lora.run_folder import refuse_replacing, refuse_uncreatable
from lora.trainer import evaluate_model

TASKS = ("rot13", "atbash")
OWN_KEYS = ("task", "run_name", "output_dir", "overwrite", "resume")  # set by the demo for each run


def main(argv: Sequence[str] | None = None) -> int:
    p = CommandLineParser(prog="multitask_demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML settings shared by both runs (model size, steps, ...)")
    p.add_argument("--output_dir", default="runs", help="where the runs and the summary go (default: runs)")
    p.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier demo")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)
    body = lambda: _demo(load_yaml(args.config) if args.config else {}, Path(args.output_dir), args.overwrite)  # noqa: E731
    return guarded("multitask_demo.py", body, args.debug)


def plan(shared: dict, out_dir: Path, overwrite: bool) -> dict:
    """Each task's settings, all checked before anything trains: ``{task: TrainConfig}``. The keys the demo
    sets for each run are taken from a preset YAML with a one-line warning (configs/rot13.yaml names its
    task), full fine-tuning is refused, earlier ``multitask-*`` runs are replaced only with ``overwrite``, and
    the runs' and the summary's folders must be creatable."""
    moot = [key for key in OWN_KEYS if key in shared]
    if moot:
        warnings.warn(
            f"the config sets {', '.join(moot)}, which the demo sets for each run; ignored", stacklevel=1
        )
    shared = {k: v for k, v in shared.items() if k not in OWN_KEYS}
    configs = {task: resolve_config({**shared, "task": task, "run_name": f"multitask-{task}",
                                     "overwrite": overwrite, "output_dir": str(out_dir)})
               for task in TASKS}  # fmt: skip
    if any(cfg.method != "lora" for cfg in configs.values()):
        raise ConfigError("the demo trains adapters: drop method from the YAML (or set it to lora)")
    runs = [out_dir / f"multitask-{t}" for t in TASKS]
    refuse_replacing(runs, overwrite, "an earlier demo")
    refuse_uncreatable([*runs, out_dir / "multitask"])  # the summary is written after both have trained
    return configs


def _demo(shared: dict, out_dir: Path, overwrite: bool = False) -> int:
    runs = {}
    for task, cfg in plan(shared, out_dir, overwrite).items():  # each adapter on the same (cached) base
        metrics = run(cfg)
        runs[task] = (cfg, out_dir / f"multitask-{task}", metrics)

    base_dir = Path(runs[TASKS[0]][2]["base_checkpoint"])
    model = LoRATransformer.from_pretrained(base_dir, lora_r=0).eval()
    before = model.base_fingerprint()
    for task in TASKS:
        model.load_adapter(runs[task][1], task)
    rows: dict[str, dict[str, float]] = {}
    loaders = {t: BatchLoader(load_task(runs[t][0]).val, runs[t][0].batch_size, shuffle=False) for t in TASKS}
    for name in ("base", *TASKS):
        if name != "base":
            model.set_adapter(name)  # no reload of the base: only the small LoRA tensors change
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            rows[name] = {t: evaluate_model(model, loaders[t], "exact_match")["metric"] for t in TASKS}
    after = model.base_fingerprint()

    base_bytes = (base_dir / "model.safetensors").stat().st_size
    sizes = {t: (runs[t][1] / "adapter_model.safetensors").stat().st_size for t in TASKS}
    summary = {"base_checkpoint": str(base_dir), "base_fingerprint_before": before, "base_fingerprint_after": after,
               "base_unchanged": before == after, "exact_match": rows, "base_bytes": base_bytes,
               "adapter_bytes": sizes, "adapters_loaded": model.list_adapters(),
               "at_end_of_training": {t: runs[t][2]["final_metric"] for t in TASKS}}  # fmt: skip
    lines = [f"| model on the base | {' | '.join(f'{t} exact match' for t in TASKS)} |",
             "|---|" + "---:|" * len(TASKS)]  # fmt: skip
    for name, scores in rows.items():
        label = "frozen base (Caesar)" if name == "base" else f"+ {name} adapter"
        lines.append(f"| {label} | " + " | ".join(f"{100 * scores[t]:.1f}%" for t in TASKS) + " |")
    back = all(rows[t][t] == runs[t][2]["final_metric"] for t in TASKS)
    summary["each_adapter_gets_its_score_back"] = back
    lines += ["", f"each adapter, switched in, scores exactly what it scored at the end of its training: {back}",
              f"base weights unchanged after switching: {before == after} (fingerprint {after})",
              f"base model.safetensors: {base_bytes:,} bytes; "
              + "; ".join(f"{t} adapter: {sizes[t]:,} bytes ({100 * sizes[t] / base_bytes:.2f}% of the base)"
                          for t in TASKS)]  # fmt: skip
    folder = out_dir / "multitask"
    atomic_write_bytes(folder / "multitask.json", (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write_bytes(folder / "multitask.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0 if before == after and back else 1


if __name__ == "__main__":
    sys.exit(main())
