"""Pictures of what LoRA does: weight matrices and their low-rank update, spectra, sizes, subspace
similarity, and the charts of the method comparison and the rank sweep. Each function returns PNG bytes.

Every figure has a title, labelled axes and a legend or colour bar.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from lora.plotting import png_bytes

__all__ = ["bars", "heatmap", "lines", "spectra", "weight_panels"]


def _shape(t: torch.Tensor) -> str:
    return " x ".join(str(n) for n in t.shape)


def weight_panels(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, delta: torch.Tensor, name: str,
                  scaling: float) -> bytes:  # fmt: skip
    """``W0``, ``A``, ``B`` and ``ΔW = scaling B A`` side by side, with their shapes and parameter counts.

    ``W0`` and ``ΔW`` share one colour scale (the same units, so their sizes compare at a glance); ``A``
    and ``B`` each have their own.
    """
    w0, a, b, delta = (t.detach().float().cpu() for t in (w0, a, b, delta))
    shared = float(max(w0.abs().max(), delta.abs().max()))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.8), gridspec_kw={"width_ratios": [4, 4, 1.2, 4]})
    scale = "weight (W0 and ΔW: one scale)"
    panels = [  # matrix, title, colour limit, colour label, x label, y label
        (w0, f"W0, frozen: {_shape(w0)} = {w0.numel():,}", shared, scale, "input", "output"),
        (a, f"A: {_shape(a)} = {a.numel():,} (trained)", float(a.abs().max()) or 1.0, "A", "input", "rank direction"),
        (b, f"B: {_shape(b)} = {b.numel():,} (trained)", float(b.abs().max()) or 1.0, "B", "rank direction", "output"),
        (delta, f"ΔW = {scaling:g} B A: {_shape(delta)}, rank <= {a.shape[0]}", shared, scale, "input", "output"),
    ]  # fmt: skip
    for ax, (m, title, limit, label, xlabel, ylabel) in zip(axes, panels, strict=True):
        image = ax.imshow(
            m.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest"
        )
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        fig.colorbar(image, ax=ax, label=label, shrink=0.85)
    fig.suptitle(f"{name}: the frozen weight and the low-rank update LoRA trains "
                 f"({a.numel() + b.numel():,} numbers instead of {w0.numel():,})")  # fmt: skip
    return png_bytes(fig)


def spectra(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]], r: int) -> bytes:
    """Per module, the singular values of ``ΔW`` and of ``W0`` (each over its largest), log scale."""
    n = len(modules)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, (s_delta, s_w0)) in zip(axes.flat, modules.items(), strict=False):
        floor = 1e-12
        for s, style, colour, label in ((s_w0, "-", "gray", "W0"), (s_delta, "o-", "tab:red", "ΔW")):
            relative = s / s[0] if s[0] > 0 else np.zeros_like(s)  # an untrained adapter: ΔW = 0
            ax.semilogy(np.arange(1, len(s) + 1), np.maximum(relative, floor), style, markersize=2, color=colour,
                        label=label)  # fmt: skip
        ax.axvline(r, color="tab:blue", linestyle="--", label=f"r = {r}")
        ax.set(
            title=name,
            xlabel="index of the singular value",
            ylabel="singular value / largest",
            ylim=(floor, 2),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(
        "Singular values: ΔW uses at most r directions (the rest are float rounding); W0 uses them all"
    )
    return png_bytes(fig)


def bars(values: Mapping[str, float], title: str, ylabel: str, reference: float | None = None) -> bytes:
    """One bar per module (a horizontal line at ``reference`` if given)."""
    fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * len(values) + 2), 4.6))
    names = list(values)
    ax.bar(range(len(names)), [values[k] for k in names], color="tab:purple", label=ylabel)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label=f"{reference:g}")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set(title=title, xlabel="module", ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return png_bytes(fig)


def heatmap(matrix: np.ndarray | torch.Tensor, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
            xlabel: str, ylabel: str, colour_label: str, vmin: float | None = None, vmax: float | None = None,
            annotate: bool = True) -> bytes:  # fmt: skip
    """A labelled heatmap (the values written in the cells when ``annotate`` and there are few)."""
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(
        figsize=(min(12.0, max(5.0, 0.5 * m.shape[1] + 3)), min(8.0, max(3.5, 0.4 * m.shape[0] + 2)))
    )
    image = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    for axis, labels, set_ticks in ((1, col_labels, ax.set_xticks), (0, row_labels, ax.set_yticks)):
        every = max(1, m.shape[axis] // 16)  # at most about 16 labels an axis
        ticks = range(0, m.shape[axis], every)
        set_ticks(ticks, [labels[i] for i in ticks], fontsize=8)
    if annotate and m.size <= 200:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v < np.nanmean(m) else "black",
                )
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(image, ax=ax, label=colour_label)
    return png_bytes(fig)


def lines(series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]], title: str,
          xlabel: str, ylabel: str, logx: bool = False,
          hlines: Mapping[str, float] | None = None) -> bytes:  # fmt: skip
    """One line per series ``(x, y, spread or None)``; dashed horizontal lines for ``hlines``."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for label, (x, y, spread) in series.items():
        if spread is None:
            ax.plot(x, y, "o-", markersize=3, label=label)
        else:
            ax.errorbar(x, y, yerr=spread, fmt="o-", markersize=3, capsize=3, label=label)
    for label, value in (hlines or {}).items():
        ax.axhline(value, linestyle="--", color="gray", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return png_bytes(fig)
