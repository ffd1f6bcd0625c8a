"""Look inside a trained adapter: its matrices, the update's spectrum and size, its amplification of the
base, and (given a second adapter on the same base) how much the two adapters' subspaces overlap
(Hu et al. 2021, Section 7).

    python scripts/visualize_lora.py --run runs/rot13-lora-r8
    python scripts/visualize_lora.py --run runs/rot13-lora-r8 --layer 1 --proj v
    python scripts/visualize_lora.py --run runs/rot13-lora-r8 --other runs/rot13-lora-r64 --proj v

Writes into ``<run>/pictures/`` (or ``--out``): weights.png (W0, A, B and ΔW of one module), spectrum.png,
update_size.png, amplification.png, subspace_similarity.png (with ``--other``), and analysis.json; a run
folder's report.html is written again to show them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/visualize_lora.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch is imported: one line, exit 130
        from lora.errors import exit_on_signals

        exit_on_signals()

import torch

from lora.adapter import Adapter
from lora.analysis import (
    amplification_factor,
    numerical_rank,
    relative_update,
    singular_values,
    subspace_similarity,
)
from lora.config import CommandLineParser
from lora.errors import guarded
from lora.figures import bars, heatmap, spectra, weight_panels
from lora.files import atomic_write_bytes
from lora.formats import ADAPTER_CONFIG_NAME, read_adapter_folder
from lora.lora_transformer import LoRATransformer
from lora.model_config import TARGET_MODULES
from lora.report import write_run_report

# a projection's name (q, ..., o, fc1, fc2, gate, up, down; or its module's, q_proj ... down_proj) -> its module
PROJ_NAMES = {**TARGET_MODULES, **{m.rsplit(".", 1)[1]: m for m in TARGET_MODULES.values()}}


def load(run: Path, base: str | None) -> tuple[LoRATransformer, Adapter, str]:
    """The frozen base (no adapter), the run's adapter checked against it, and the base's fingerprint."""
    if not (run / ADAPTER_CONFIG_NAME).is_file():
        raise ValueError(f"{run} has no adapter ({ADAPTER_CONFIG_NAME}): give a LoRA run folder "
                         "(a full fine-tuning run has none)")  # fmt: skip
    folder = read_adapter_folder(run)
    base = base or folder.extra.get("base_checkpoint")
    if not base:
        raise ValueError(f"{run}: the adapter does not say which base it was trained on; pass --base")
    model = LoRATransformer.from_pretrained(base, lora_r=0, num_classes=None)
    model.check_adapter_fits(folder)
    return model, model.adapter_from_folder(folder), folder.base_fingerprint


def module_name(adapter: Adapter, layer: int | None, proj: str | None, run: Path) -> str:
    """The adapted module to draw: ``blocks.<layer>.attn.<proj>_proj`` (or ``.mlp.fc1``, ``.mlp.gate_proj``,
    ...); by default the first one the adapter has."""
    names = sorted(adapter.layers)
    if layer is None and proj is None:
        return names[0]
    if proj is not None and proj not in PROJ_NAMES:
        raise ValueError(f"--proj must be one of {', '.join(TARGET_MODULES)}, got {proj!r}")
    candidates = [n for n in names if (layer is None or n.startswith(f"blocks.{layer}."))
                  and (proj is None or n.endswith("." + PROJ_NAMES[proj]))]  # fmt: skip
    if not candidates:
        raise ValueError(f"{run}: no adapted module for layer {layer} and projection {proj}; the adapted "
                         f"modules are {', '.join(names)}")  # fmt: skip
    return candidates[0]


def analyse(model: LoRATransformer, adapter: Adapter) -> dict[str, dict]:
    """Per adapted module: r, the numerical rank of ΔW, ||ΔW||_F / ||W0||_F and the amplification factor."""
    out = {}
    for name, spec in sorted(adapter.layers.items()):
        w0, delta = model.get_submodule(name).weight, spec.delta_weight()
        out[name] = {"r": spec.r, "rank_of_delta": numerical_rank(delta),
                     "relative_update": relative_update(delta, w0),
                     "amplification": amplification_factor(delta, w0, spec.r)}  # fmt: skip
    return out


def draw(run: Path, other: Path | None, base: str | None, layer: int | None, proj: str | None,
         out: Path) -> dict:  # fmt: skip
    model, adapter, fingerprint = load(run, base)
    name = module_name(adapter, layer, proj, run)
    stats = analyse(model, adapter)
    spec = adapter.layers[name]
    w0 = model.get_submodule(name).weight
    spectrum = {n: (singular_values(s.delta_weight()).numpy(), singular_values(model.get_submodule(n).weight).numpy())
                for n, s in sorted(adapter.layers.items())}  # fmt: skip
    files = {
        "weights.png": weight_panels(w0, spec.lora_A, spec.lora_B, spec.delta_weight(), name, spec.scaling),
        "spectrum.png": spectra(spectrum, spec.r),
        "update_size.png": bars(
            {n: v["relative_update"] for n, v in stats.items()},
            "How large the update is against the weight:\n||ΔW||_F / ||W0||_F per module",
            "||ΔW||_F / ||W0||_F",
        ),
        "amplification.png": bars(
            {n: v["amplification"] for n, v in stats.items()},
            "Amplification factor ||ΔW||_F / ||U^T W0 V^T||_F\n(Hu et al. 2021, Section 7.3; 1: no amplification)",
            "amplification factor",
            reference=1.0,
        ),
    }
    result = {"run": str(run), "module": name, "modules": stats}
    if other is not None:
        _, other_adapter, other_fingerprint = load(other, base)
        if other_fingerprint != fingerprint:
            raise ValueError(f"{run} and {other} were trained on different bases (fingerprints {fingerprint} "
                             f"and {other_fingerprint}): subspace similarity compares adapters of one base")  # fmt: skip
        if name not in other_adapter.layers:
            raise ValueError(
                f"{other} has no adapter on {name}; its modules are {', '.join(sorted(other_adapter.layers))}"
            )
        a1, a2 = spec.lora_A, other_adapter.layers[name].lora_A
        phi = subspace_similarity(a1, a2)
        r1, r2 = phi.shape
        files["subspace_similarity.png"] = heatmap(
            phi.numpy(), [str(i) for i in range(1, r1 + 1)], [str(j) for j in range(1, r2 + 1)],
            f"{name}: φ(i, j) = ||U_i^T U_j||_F^2 / min(i, j) between A (r={r1}) and A (r={r2})",
            f"j (top directions of {other.name})", f"i (top directions of {run.name})", "subspace similarity φ",
            vmin=0.0, vmax=1.0, annotate=r1 * r2 <= 100,
        )  # fmt: skip
        result["subspace_similarity"] = {"other": str(other), "phi_top_row": phi[0].tolist(),
                                         "phi_diagonal": phi.diagonal().tolist()}  # fmt: skip
    for file, png in files.items():
        atomic_write_bytes(out / file, png)
    atomic_write_bytes(out / "analysis.json", (json.dumps(result, indent=2) + "\n").encode())
    result["files"] = sorted(files)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = CommandLineParser(prog="visualize_lora.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a LoRA run folder (or any adapter folder)")
    p.add_argument(
        "--other", default=None, help="a second adapter on the same base, for the subspace similarity"
    )
    p.add_argument("--base", default=None, help="the base model folder (default: the one the adapter names)")
    p.add_argument("--layer", type=int, default=None, help="block index of the module to draw")
    p.add_argument(
        "--proj", default=None, help=f"projection of the module to draw: {', '.join(TARGET_MODULES)}"
    )
    p.add_argument("--out", default=None, help="folder for the pictures (default: <run>/pictures)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)

    def body() -> int:
        run = Path(args.run)
        out = Path(args.out) if args.out else run / "pictures"
        result = draw(run, Path(args.other) if args.other else None, args.base, args.layer, args.proj, out)
        print(f"{'module':<24} {'r':>3} {'rank(ΔW)':>8} {'||ΔW||/||W0||':>14} {'amplification':>13}")
        for name, v in result["modules"].items():
            print(
                f"{name:<24} {v['r']:>3} {v['rank_of_delta']:>8} {v['relative_update']:>14.4f} {v['amplification']:>13.2f}"
            )
        print(f"wrote {', '.join(result['files'])} and analysis.json to {out}")
        if args.out is None and (run / "metrics.json").is_file():  # a run folder: its report shows them now
            print(f"updated {write_run_report(run)}")
        return 0

    with torch.no_grad():
        return guarded("visualize_lora.py", body, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
