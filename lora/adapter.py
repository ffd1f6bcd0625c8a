"""One adapter as data: its LoRA tensors per module, its classification head and its settings.

A model holds one active adapter in its ``LoRALinear`` layers and keeps the others as :class:`Adapter`
values; the disk format (``lora/formats.py``) reads and writes them. Nothing here touches a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lora.lora_layer import LORA_LEAVES, lora_scaling, whole_update
from lora.model_config import LoRAConfig, lora_targets_of

__all__ = ["Adapter", "LayerAdapter", "weighted_sum"]


@dataclass
class LayerAdapter:
    """One module's update ``scaling * B A`` with ``A: (r, in)``, ``B: (out, r)``.

    A PiSSA/OLoRA adapter also holds its initial factors ``lora_A0`` (r, in), ``lora_B0`` (out, r): its update
    is ``scaling * (B A - B0 A0)``. A DoRA adapter holds its magnitude ``lora_magnitude`` (out,), which
    rescales each output row of ``W0 + update`` to it (``lora/lora_layer.py``).
    """

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    lora_A: torch.Tensor  # noqa: N815 - the layer's own names
    lora_B: torch.Tensor  # noqa: N815
    lora_magnitude: torch.Tensor | None = None
    lora_A0: torch.Tensor | None = None  # noqa: N815
    lora_B0: torch.Tensor | None = None  # noqa: N815

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` whose product is the whole update's ``B A`` (``[A; A0]``, ``[B, -B0]`` with initial factors)."""
        return whole_update(self.lora_A, self.lora_B, self.lora_A0, self.lora_B0)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` (``- scaling * B0 A0``) in float32, ``(out, in)``; DoRA's rescaling is not in it."""
        a, b = self.factors()
        return (b.float() @ a.float()) * self.scaling

    def tensors(self, module: str) -> dict[str, torch.Tensor]:
        """``<module>.lora_A``, ``.lora_B`` and those of ``lora_magnitude``, ``lora_A0``, ``lora_B0`` it has."""
        return {f"{module}.{n}": getattr(self, n) for n in LORA_LEAVES if getattr(self, n) is not None}


@dataclass
class Adapter:
    """An adapter: ``layers`` by module name, an optional head (``weight`` (classes, d), ``bias``),
    its settings, and ``extra`` facts (task, run, labels, how it was made) that travel with it."""

    layers: dict[str, LayerAdapter]
    cls_head: dict[str, torch.Tensor] | None
    settings: LoRAConfig
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int | None:
        return None if self.cls_head is None else int(self.cls_head["weight"].shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file layout: ``<module>.lora_A``, ``<module>.lora_B`` (and ``.lora_magnitude``, ``.lora_A0``,
        ``.lora_B0`` where the variant has them) and ``cls_head.weight|bias``."""
        out = {}
        for m, spec in self.layers.items():
            out.update(spec.tensors(m))
        for k, v in (self.cls_head or {}).items():
            out[f"cls_head.{k}"] = v
        return out


def weighted_sum(
    adapters: Mapping[str, Adapter], weights: Mapping[str, float], device: torch.device
) -> Adapter:
    """The adapter with ``ΔW = Σ_i w_i s_i B_i A_i`` exactly, by concatenating ranks.

    Per module ``A = [A_1; A_2; ...]`` ``(Σ r_i, in)`` and ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``
    ``(out, Σ r_i)`` with scaling 1 (``lora_alpha = r``, no rsLoRA), so ``B A = Σ w_i s_i B_i A_i``.
    Adapters with classification heads cannot be combined exactly and are refused.
    """
    if not weights:
        raise ValueError("a weighted sum needs at least one adapter and weight")
    heads = [n for n in weights if adapters[n].cls_head is not None]
    if heads:
        raise ValueError(f"adapters {heads} have classification heads, which cannot be combined exactly")
    dora = [n for n in weights if adapters[n].settings.use_dora]
    if dora:
        raise ValueError(f"adapters {dora} are DoRA adapters, whose row rescaling cannot be summed exactly")
    modules = sorted({m for n in weights for m in adapters[n].layers})
    kw = {"device": device, "dtype": torch.float32}  # parked adapters may sit elsewhere
    layers = {}
    for m in modules:
        parts = [(float(weights[n]), adapters[n].layers[m]) for n in weights if m in adapters[n].layers]
        # each adapter's whole update (PiSSA/OLoRA: its factors [A; A0], [B, -B0])
        whole = [(w, s.scaling, *s.factors()) for w, s in parts]  # (weight, scaling, A_i, B_i)
        A = torch.cat([a.to(**kw) for _, _, a, _ in whole], dim=0)  # (Σ r_i, in)
        B = torch.cat([w * s * b.to(**kw) for w, s, _, b in whole], dim=1)  # (out, Σ r_i)
        r, dtype = A.shape[0], parts[0][1].lora_A.dtype
        layers[m] = LayerAdapter(r, float(r), 0.0, False, A.to(dtype), B.to(dtype))
    r_max = max((s.r for s in layers.values()), default=0)
    targets, every_mlp = lora_targets_of(modules)
    settings = LoRAConfig(r_max, float(max(r_max, 1)), 0.0, targets, every_mlp, False)
    made_from = {"method": "add_weighted_adapter", "weights": {n: float(w) for n, w in weights.items()}}
    return Adapter(layers, None, settings, {"made_from": made_from})
