"""Several adapters in one batch: each row of a batch computed with its own adapter of the same base.

As PEFT's ``adapter_names``: with row ``i`` given adapter ``n_i`` (``None``: the base), every LoRA layer computes::

    y_i = x_i W0^T + b + s_n (x_i A_n^T) B_n^T        for the rows i of adapter n;   y_i = x_i W0^T + b   for the base's

The base product is one ``(B, ..., in) @ W0^T`` for the whole batch; each adapter then adds its skinny update to
its own rows only (rows grouped by adapter: one ``index_select`` and one ``index_add`` per adapter and layer,
:meth:`LoRALinear.rows_adapted <lora.lora_layer.LoRALinear.rows_adapted>`). A module one adapter does not target
adds nothing to its rows, so adapters with different targets mix. Row ``i`` equals adapter ``n_i`` run alone,
to float rounding (the sums are taken in another order).

Refused, in one line, before anything changes: a merged model (its weights hold one adapter), a DoRA adapter
(its row norms rescale the base output of its rows: not computed here), a classification adapter (a mixed batch
generates text). Within the block the attention's fused q/k/v path is off (it knows one adapter per layer).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from lora.adapter import Adapter
from lora.lora_layer import lora_modules

__all__ = ["adapters_per_row", "check_mixable"]


def check_mixable(model: nn.Module, adapters: Mapping[str | None, Adapter | None]) -> None:
    """Refuse (``ValueError``, one line) what a mixed batch cannot compute exactly: see the module docstring."""
    if any(layer.merged for _, layer in lora_modules(model)):
        raise ValueError("per-row adapters need an unmerged model (its merged weights hold one adapter): "
                         "unmerge_lora() first")  # fmt: skip
    for name, adapter in adapters.items():
        if adapter is None:
            continue
        if adapter.cls_head is not None:
            raise ValueError(f"adapter {name!r} is a classification adapter: a mixed batch generates text")
        if any(spec.lora_magnitude is not None for spec in adapter.layers.values()):
            raise ValueError(f"adapter {name!r} uses DoRA, whose row norms a mixed batch does not compute: "
                             "run it on its own (set_adapter)")  # fmt: skip


@contextmanager
def adapters_per_row(
    model: nn.Module, adapters: Mapping[str | None, Adapter | None], names: Sequence[str | None]
) -> Iterator[None]:
    """Within the block row ``i`` of every batch (of ``len(names)`` rows) is computed with ``adapters[names[i]]``
    (``None``: the base). Every LoRA layer of ``model`` is put in its per-row mode and the fused q/k/v path
    turned off; both are restored in ``finally``. The layers' own (active) adapter is left untouched."""
    check_mixable(model, adapters)
    device = next(model.parameters()).device
    rows = {
        n: torch.tensor([i for i, m in enumerate(names) if m == n], device=device)
        for n in dict.fromkeys(names)
    }
    fused = getattr(model, "fused_qkv", None)
    with ExitStack() as stack:
        for module, layer in lora_modules(model):
            groups = []
            for n, index in rows.items():
                spec = None if adapters[n] is None else adapters[n].layers.get(module)
                if spec is not None:  # (A (r, in), B (out, r)) of the whole update
                    groups.append((index, *spec.factors(), spec.scaling))
            stack.enter_context(layer.rows_adapted(len(names), groups))
        try:
            if fused is not None:
                model.fused_qkv = False
            yield
        finally:
            if fused is not None:
                model.fused_qkv = fused
