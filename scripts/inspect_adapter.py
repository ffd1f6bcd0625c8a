"""Show what an adapter folder holds, and whether it fits a given base.

Prints the adapter's settings, its files' sizes and, per module, the rank, the parameter count
``r (in + out)``, ``||B A||_F`` and ``scaling ||B A||_F`` (the size of the update the adapter adds to
``W0``). With ``--base`` it checks the architecture, the tensor shapes and the base fingerprint; the exit
status is then 1 if the adapter does not fit (0 if it fits, 2 on bad input).

    python scripts/inspect_adapter.py --adapter runs/rot13-lora-r8
    python scripts/inspect_adapter.py --adapter runs/code-lora-r8 --base runs/bases/english-d256-h4-l2-s128-steps800-seed0
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/inspect_adapter.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch is imported: one line, exit 130
        from lora.errors import exit_on_signals

        exit_on_signals()

import torch

from lora.config import CommandLineParser
from lora.errors import guarded
from lora.formats import AdapterFolder, read_adapter_folder
from lora.lora_transformer import LoRATransformer

_SHOWN = (
    "lora_r",
    "lora_alpha",
    "scaling",
    "lora_dropout",
    "lora_targets",
    "adapt_feedforward",
    "use_rslora",
    "use_dora",
    "lora_init",
    "base_quantization",
)


def module_rows(folder: AdapterFolder) -> list[tuple[str, int, int, float, float]]:
    """``(module, r, parameters, ||B A||_F, scaling ||B A||_F)`` per adapted module: the trained parameters
    (DoRA's magnitudes included, PiSSA/OLoRA's frozen initial factors not), and the whole update's norm
    (``B A - B0 A0`` after a PiSSA/OLoRA start)."""
    rows = []
    for name, spec in sorted(folder.to_adapter().layers.items()):
        norm = torch.linalg.matrix_norm(spec.delta_weight()).item() / spec.scaling  # ||B A||_F of (out, in)
        trained = sum(t.numel() for t in (spec.lora_A, spec.lora_B, spec.lora_magnitude) if t is not None)
        rows.append((name, spec.r, trained, norm, spec.scaling * norm))
    return rows


def fits(base: str, folder: AdapterFolder) -> tuple[bool, str]:
    """``(fits, explanation)``: architecture and tensor shapes, then the base fingerprint."""
    model = LoRATransformer.from_pretrained(base, lora_r=0, num_classes=None)
    try:
        warnings = model.check_adapter_fits(folder, force=True)
        model.adapter_from_folder(folder)
    except ValueError as e:
        return False, f"does not fit: {e}"
    if warnings:
        return (
            False,
            f"shapes fit, but {warnings[0].removesuffix('; loaded anyway (force)')}; load only with --force",
        )
    return True, f"fits: architecture and shapes match, fingerprint {folder.base_fingerprint} matches"


def report(adapter: str, base: str | None) -> tuple[bool, list[str]]:
    folder = read_adapter_folder(adapter)
    config = folder.config
    lines = [f"adapter: {folder.path}"]
    lines += [f"  {k:<18} {config.get(k)}" for k in _SHOWN]
    lines.append(f"  {'num_classes':<18} {folder.num_classes}")
    lines.append(f"  {'base':<18} {folder.base}")
    lines.append(f"  {'base_fingerprint':<18} {folder.base_fingerprint}")
    lines.append(f"  {'version':<18} {config.get('version')}")
    lines += [f"  {k:<18} {v}" for k, v in sorted(folder.extra.items())]
    for path in (folder.weights_path, folder.config_path):
        lines.append(f"  {path.name:<28} {path.stat().st_size:>10,} bytes")

    rows = module_rows(folder)
    width = max([len("module"), *(len(r[0]) for r in rows)])
    lines.append(
        f"\n{'module':<{width}}  {'r':>3}  {'params':>8}  {'||BA||_F':>10}  {'scaling*||BA||_F':>16}"
    )
    for name, r, n, norm, scaled in rows:
        lines.append(f"{name:<{width}}  {r:>3}  {n:>8,}  {norm:>10.4g}  {scaled:>16.4g}")
    head = sum(v.numel() for k, v in folder.tensors.items() if k.startswith("cls_head."))
    total = sum(r[2] for r in rows)
    lines.append(
        f"{'total':<{width}}  {'':>3}  {total:>8,}"
        + (f"  (+ {head:,} in the classification head)" if head else "")
    )
    ok = True
    if base is not None:
        ok, text = fits(base, folder)
        lines.append(f"\nbase {base}: {text}")
    return ok, lines


def main(argv: Sequence[str] | None = None) -> int:
    p = CommandLineParser(prog="inspect_adapter.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--base", default=None, help="model folder to check the adapter against")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)

    def body() -> int:
        ok, lines = report(args.adapter, args.base)
        print("\n".join(lines))
        return 0 if ok else 1

    return guarded("inspect_adapter.py", body, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
