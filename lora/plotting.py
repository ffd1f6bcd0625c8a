"""The training-curve figure: losses, the task metric and the learning rate against the step."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt

__all__ = ["png_bytes", "render_history"]

METRIC_LABELS = {
    "exact_match": "exact match (validation)",
    "accuracy": "accuracy (validation)",
    "bits_per_byte": "bits per byte (validation)",
    "bits_per_token": "bits per token (validation)",
}


def render_history(history: dict[str, list], title: str, metric_name: str,
                   base_metric: float | None = None) -> bytes:  # fmt: skip
    """A three-panel PNG (as bytes): train / validation loss, the metric (and the frozen base's), the lr."""
    fig, (ax_loss, ax_metric, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_loss.plot(history["step"], history["train_loss"], label="train", alpha=0.8)
    ev = [i for i, v in enumerate(history["val_loss"]) if v is not None]
    ev_steps = [history["step"][i] for i in ev]
    ax_loss.plot(ev_steps, [history["val_loss"][i] for i in ev], "o-", label="validation")
    ax_loss.set(xlabel="optimizer step", ylabel="cross-entropy loss (nats)", title="loss")
    ax_loss.legend()

    ax_metric.plot(ev_steps, [history["metric"][i] for i in ev], "o-", color="tab:green", label="adapted")
    if base_metric is not None:
        ax_metric.axhline(base_metric, color="gray", linestyle="--", label=f"frozen base ({base_metric:.3g})")
    ax_metric.set(
        xlabel="optimizer step", ylabel=METRIC_LABELS.get(metric_name, metric_name), title=metric_name
    )
    ax_metric.legend()

    ax_lr.plot(history["step"], history["lr"], color="tab:orange")
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate", title="learning-rate schedule")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))

    for ax in (ax_loss, ax_metric, ax_lr):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return png_bytes(fig)


def png_bytes(fig: plt.Figure, dpi: int = 100) -> bytes:
    """A finished figure as PNG bytes (laid out tightly); the figure is closed."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()
