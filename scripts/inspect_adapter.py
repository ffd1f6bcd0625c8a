"""Show what an adapter folder holds, and whether it fits a given base.

Prints the adapter's settings, its files' sizes and, per module, the rank, the parameter count
``r (in + out)``, ``||B A||_F`` and ``scaling ||B A||_F`` (the size of the update the adapter adds to
``W0``). With ``--base`` it checks the architecture, the tensor shapes and the base fingerprint; the exit
status is then 1 if the adapter does not fit (0 if it fits, 2 on bad input).

    python scripts/inspect_adapter.py --adapter runs/rot13-lora-r8
    python scripts/inspect_adapter.py --adapter runs/code-lora-r8 --base runs/bases/english-d256-h4-l2-s128-steps800-seed0
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/inspect_adapter.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lora.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    check_adapter_fits,
    parse_adapter,
    read_adapter,
)
from lora.lora_transformer import LoRATransformer

_SHOWN = (
    "lora_r",
    "lora_alpha",
    "scaling",
    "lora_dropout",
    "lora_targets",
    "adapt_feedforward",
    "use_rslora",
)


def module_rows(config: dict, tensors: dict[str, torch.Tensor]) -> list[tuple[str, int, int, float, float]]:
    """``(module, r, parameters, ||B A||_F, scaling ||B A||_F)`` per adapted module."""
    rows = []
    for name, spec in sorted(config["modules"].items()):
        missing = [k for k in (f"{name}.lora_A", f"{name}.lora_B") if k not in tensors]
        if missing:
            raise ValueError(f"{ADAPTER_WEIGHTS_NAME} lacks {missing} listed in {ADAPTER_CONFIG_NAME}")
        A, B = tensors[f"{name}.lora_A"].float(), tensors[f"{name}.lora_B"].float()  # (r, in), (out, r)
        r = A.shape[0]
        alpha = float(spec.get("lora_alpha", config["lora_alpha"]))
        scaling = alpha / (math.sqrt(r) if config["use_rslora"] else r)
        norm = torch.linalg.matrix_norm(B @ A).item()  # Frobenius norm of the (out, in) update
        rows.append((name, r, A.numel() + B.numel(), norm, scaling * norm))
    return rows


def fits(base: str, config: dict, tensors: dict[str, torch.Tensor], folder: Path) -> tuple[bool, str]:
    """``(fits, explanation)``: architecture and tensor shapes, then the base fingerprint."""
    model = LoRATransformer.from_pretrained(base, lora_r=0, num_classes=None)
    try:
        warnings = check_adapter_fits(model, config, force=True)
        parse_adapter(model, config, tensors, folder)
    except ValueError as e:
        return False, f"does not fit: {e}"
    if warnings:
        return (
            False,
            f"shapes fit, but {warnings[0].removesuffix('; loaded anyway (force)')}; load only with --force",
        )
    return True, f"fits: architecture and shapes match, fingerprint {config['base_fingerprint']} matches"


def report(adapter: str, base: str | None) -> tuple[bool, list[str]]:
    folder = Path(adapter)
    config, tensors = read_adapter(folder)
    lines = [f"adapter: {folder}"]
    lines += [f"  {k:<18} {config.get(k)}" for k in _SHOWN]
    lines.append(f"  {'num_classes':<18} {config.get('num_classes')}")
    lines.append(f"  {'base':<18} {config['base']}")
    lines.append(f"  {'base_fingerprint':<18} {config['base_fingerprint']}")
    lines.append(f"  {'version':<18} {config.get('version')}")
    reserved = {*_SHOWN, "num_classes", "base", "base_fingerprint", "version", "modules", "adapter_name"}
    lines += [f"  {k:<18} {config[k]}" for k in sorted(config) if k not in reserved]
    for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
        lines.append(f"  {name:<28} {(folder / name).stat().st_size:>10,} bytes")

    rows = module_rows(config, tensors)
    width = max([len("module"), *(len(r[0]) for r in rows)])
    lines.append(
        f"\n{'module':<{width}}  {'r':>3}  {'params':>8}  {'||BA||_F':>10}  {'scaling*||BA||_F':>16}"
    )
    for name, r, n, norm, scaled in rows:
        lines.append(f"{name:<{width}}  {r:>3}  {n:>8,}  {norm:>10.4g}  {scaled:>16.4g}")
    head = sum(v.numel() for k, v in tensors.items() if k.startswith("cls_head."))
    total = sum(r[2] for r in rows)
    lines.append(
        f"{'total':<{width}}  {'':>3}  {total:>8,}"
        + (f"  (+ {head:,} in the classification head)" if head else "")
    )
    ok = True
    if base is not None:
        ok, text = fits(base, config, tensors, folder)
        lines.append(f"\nbase {base}: {text}")
    return ok, lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--base", default=None, help="model folder to check the adapter against")
    args = p.parse_args(argv)
    try:
        ok, lines = report(args.adapter, args.base)
    except (ValueError, RuntimeError) as e:
        print(f"inspect_adapter.py: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
