"""The adapter set of one model: the active adapter, the parked ones, and their folders.

The active adapter lives in the model's ``LoRALinear`` layers (so ``state_dict`` and an optimizer see only
it); the others wait as :class:`~lora.adapter.Adapter` values. :class:`AdapterSet` lists, gets, sets,
deletes and combines them (``ΔW = Σ_i w_i s_i B_i A_i``), captures the active one out of the layers and
installs another into them, checks that an adapter fits the model (architecture, fingerprint, tensor
shapes), and reads and writes adapter folders and PEFT's. ``LoRATransformer`` keeps the public spelling
(``model.load_adapter(...)``, ``model.set_adapter(...)``) as one-line delegates, as PEFT's ``PeftModel``
delegates to its tuner.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lora.adapter import Adapter, LayerAdapter, weighted_sum
from lora.errors import quote
from lora.files import describe_mismatch
from lora.formats import AdapterFolder, read_adapter_folder, write_adapter_folder
from lora.lora_layer import BASE_DERIVED_INITS, LORA_LEAVES, LoRALinear, lora_modules
from lora.model_config import LoRAConfig, ModelConfig, target_of
from lora.multi_adapter import adapters_per_row, check_mixable
from lora.peft_format import adapter_from_peft, is_peft_folder, write_peft_folder
from lora.peft_names import PeftLayout, peft_layout

__all__ = ["AdaptedModel", "AdapterSet", "describe_trainable"]


class AdaptedModel(Protocol):
    """What an :class:`AdapterSet` asks of its model beyond the :class:`~lora.decoder.Decoder`'s modules
    (``LoRATransformer`` offers it; the set also sets the model's ``config``, ``lora_config`` and ``cls_head``
    when it installs an adapter)."""

    config: ModelConfig
    lora_config: LoRAConfig
    cls_head: nn.Linear | None
    hf_model_type: str | None
    wte: nn.Embedding
    ln_f: nn.Module

    @property
    def base_quantization(self) -> str | None: ...
    def base_fingerprint(self) -> str: ...
    def fused_row_norms(self) -> dict[str, torch.Tensor]: ...
    def head_state(self) -> dict[str, torch.Tensor]: ...
    def merge_lora(self) -> object: ...
    def unmerge_lora(self) -> object: ...
    def named_modules(self) -> Iterator[tuple[str, nn.Module]]: ...
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...
    def lora_layers(self) -> Iterator[tuple[str, LoRALinear]]: ...


class AdapterSet:
    """The adapters of ``model`` (an :class:`AdaptedModel`: a ``LoRATransformer``).

    ``active`` is the active adapter's name (``None``: no adapter), ``active_extra`` its extra facts (task,
    run, ...), ``parked`` the others by name.
    """

    def __init__(self, model: AdaptedModel) -> None:
        self.model = model
        has_adapter = any(layer.r > 0 for _, layer in lora_modules(model)) or model.cls_head is not None
        self.active: str | None = "default" if has_adapter else None
        self.active_extra: dict = {}
        self.parked: dict[str, Adapter] = {}

    # ----------------------------------------------------------------------------------------------------
    # In memory

    def active_name(self) -> str | None:
        """Name of the active adapter, ``None`` if there is none (layers given an adapter by hand, with
        ``reset_lora``, count as the adapter ``"default"``)."""
        if self.active is None and any(layer.r > 0 for _, layer in lora_modules(self.model)):
            self.active = "default"
        return self.active

    def names(self) -> list[str]:
        """Adapter names, the active one first."""
        active = self.active_name()
        return ([active] if active else []) + sorted(self.parked)

    def _unknown(self, name: str | None) -> ValueError:
        return ValueError(f"no adapter named {name!r}; the adapters are {self.names()}")

    def get(self, name: str | None = None) -> Adapter:
        """Adapter ``name`` (default: the active one); the active one is copied out of the layers."""
        name = self.active_name() if name is None else name
        if name is not None and name == self.active_name():
            return self.capture()
        if name in self.parked:
            return self.parked[name]
        raise self._unknown(name)

    def set(self, name: str) -> None:
        """Make adapter ``name`` active: no reload of the base, and (unmerged) base weights untouched."""
        if name == self.active:
            return
        if name not in self.parked:
            raise self._unknown(name)
        self.activate(name, self.parked[name])

    def delete(self, name: str) -> None:
        """Forget adapter ``name``; deleting the active one leaves the model with no adapter (the base)."""
        if name == self.active_name():
            self.install(None)
            self.active, self.active_extra = None, {}
        elif name in self.parked:
            del self.parked[name]
        else:
            raise self._unknown(name)

    def add_weighted(self, weights: Mapping[str, float], name: str) -> str:
        """Add (not activate) adapter ``name`` with ``ΔW = Σ_i w_i s_i B_i A_i`` exactly (ranks concatenated)."""
        if name in self.names():
            raise ValueError(
                f"an adapter named {name!r} exists already; delete it first or pick another name"
            )
        if not weights:
            raise ValueError("add_weighted_adapter needs at least one adapter and weight")
        sources = {n: self.get(n) for n in weights}
        self.parked[name] = weighted_sum(sources, weights, self.model.wte.weight.device)
        return name

    def per_row(self, names: Sequence[str | None]) -> AbstractContextManager:
        """A block where row ``i`` of every batch is computed with adapter ``names[i]`` (``None``, or ``"base"``
        where no adapter has that name: the base), as PEFT's ``adapter_names``: :mod:`lora.multi_adapter`. An
        unknown name, and adapters that cannot share a batch (:func:`~lora.multi_adapter.check_mixable`), are
        refused before anything changes."""
        known = self.names()
        chosen: dict[str | None, Adapter | None] = {}
        for n in dict.fromkeys(names):
            if n is None or (n == "base" and n not in known):
                chosen[n] = None
            elif n in known:
                chosen[n] = self.get(n)
            else:
                raise ValueError(f"adapter_names: no adapter named {n!r}; the adapters are {known} "
                                 "(and 'base' or None for the base)")  # fmt: skip
        check_mixable(self.model, chosen)  # now, not at the block's first step
        return adapters_per_row(self.model, chosen, names)

    def capture(self) -> Adapter:
        """A copy of the active adapter (an optimizer still holding the old parameters cannot change it)."""

        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().clone()

        layers = {
            name: LayerAdapter(layer.r, layer.lora_alpha, _dropout_p(layer), layer.use_rslora,
                               *(copy(getattr(layer, k)) for k in LORA_LEAVES))
            for name, layer in lora_modules(self.model) if layer.r > 0
        }  # fmt: skip
        head = {k[len("cls_head.") :]: v.clone() for k, v in self.model.head_state().items()} or None
        return Adapter(layers, head, self.model.lora_config, dict(self.active_extra))

    def install(self, adapter: Adapter | None) -> None:
        """Put ``adapter`` (``None``: no adapter) in the layers, unmerged; base weights are not touched. The
        model's ``config.num_classes``, ``lora_config`` and ``cls_head`` become the adapter's."""
        model = self.model
        num_classes = None if adapter is None else adapter.num_classes
        config = dataclasses.replace(model.config, num_classes=num_classes)  # checked before anything changes
        model.unmerge_lora()
        layers = {} if adapter is None else adapter.layers
        with torch.no_grad():
            for name, layer in lora_modules(model):
                spec = layers.get(name)
                if spec is None:
                    layer.reset_lora(0)
                    continue
                init = adapter.settings.lora_init if spec.lora_A0 is not None else "kaiming"
                layer.reset_lora(spec.r, spec.lora_alpha, spec.lora_dropout, spec.use_rslora,
                                 spec.lora_magnitude is not None, init)  # fmt: skip
                for leaf in LORA_LEAVES:
                    if getattr(spec, leaf) is not None:
                        getattr(layer, leaf).copy_(getattr(spec, leaf))
            head = None if adapter is None else adapter.cls_head
            if head is None:
                model.cls_head = None
            else:
                n, d = head["weight"].shape
                if model.cls_head is None or model.cls_head.weight.shape != (n, d):
                    w = model.ln_f.weight  # the computation's dtype (a 4-bit base's embedding is narrower)
                    model.cls_head = nn.Linear(d, n, device=w.device, dtype=w.dtype)
                model.cls_head.load_state_dict(head)
        model.config = config
        model.lora_config = LoRAConfig(lora_r=0, lora_targets=()) if adapter is None else adapter.settings

    def activate(self, name: str, adapter: Adapter) -> None:
        """Park the active adapter and put ``adapter`` in the layers as ``name``; if that fails, the model is
        left as it was. A merged model is unmerged, switched and merged again (float rounding applies)."""
        model = self.model
        was_merged = any(layer.merged for _, layer in lora_modules(model))
        model.unmerge_lora()
        active = self.active_name()
        previous = self.capture() if active is not None else None
        try:
            self.install(adapter)
        except BaseException:
            self.install(previous)
            raise
        finally:
            if was_merged:
                model.merge_lora()
        if active is not None:
            self.parked[active] = previous
        self.parked.pop(name, None)
        self.active, self.active_extra = name, dict(adapter.extra)

    # ----------------------------------------------------------------------------------------------------
    # Whether an adapter fits

    def check_tensors(
        self,
        tensors: Mapping[str, torch.Tensor],
        ranks: Mapping[str, int],
        num_classes: int | None,
        where: object,
        modules_where: object = None,
        settings: LoRAConfig | None = None,
    ) -> None:
        """Refuse adapter ``tensors`` unless they are exactly ``ranks``' modules (LoRA layers of this model)
        with ``A: (r, in)``, ``B: (out, r)`` (and as ``settings`` say DoRA's ``lora_magnitude: (out,)``,
        PiSSA/OLoRA's ``lora_A0: (r, in)``, ``lora_B0: (out, r)``), plus a head for ``num_classes``.
        Messages start with ``where`` (``modules_where`` for a module this model lacks)."""
        leaves = ("lora_A", "lora_B") if settings is None else settings.leaves
        layers = dict(lora_modules(self.model))
        expected = {}
        for m, r in ranks.items():
            layer = layers.get(m)
            if layer is None:
                raise ValueError(
                    f"{modules_where or where}: module {quote(m)} is not a LoRA layer of this model"
                )
            shapes = {"lora_A": (r, layer.in_features), "lora_B": (layer.out_features, r),
                      "lora_magnitude": (layer.out_features,), "lora_A0": (r, layer.in_features),
                      "lora_B0": (layer.out_features, r)}  # fmt: skip
            expected.update({f"{m}.{k}": torch.empty(shapes[k], device="meta") for k in leaves})
        if num_classes is not None:
            d = self.model.config.d_model
            expected.update({"cls_head.weight": torch.empty(num_classes, d, device="meta"),
                             "cls_head.bias": torch.empty(num_classes, device="meta")})  # fmt: skip
        problem = describe_mismatch(tensors, expected)
        if problem:
            raise ValueError(f"{where}: {problem}")

    def check_fits(self, folder: AdapterFolder, force: bool = False) -> list[str]:
        """Raise ``ValueError`` if the adapter's base differs from this one; return warnings (with ``force``).

        Other shapes always refuse; the same shapes with other weights (fingerprint) refuse unless ``force``.
        A family key an adapter folder does not record is GPT-2's (folders written before families).
        """
        own = self.model.config
        # a family key the folder does not record is GPT-2's: a mismatch where this model's is not GPT-2's
        gpt2 = ModelConfig.gpt2_family(own.num_heads, own.d_model)
        recorded = {**{k: gpt2[k] for k in own.family_changes()}, **folder.base}
        diff = [
            f"{k}: adapter {quote(recorded.get(k))}, model {getattr(own, k)!r}"
            for k in (*ModelConfig.SHAPE_KEYS, *ModelConfig.FAMILY_SHAPE_KEYS)
            if (k in recorded and recorded[k] != getattr(own, k))
            or (k in ModelConfig.SHAPE_KEYS and k not in recorded)
        ]
        if diff:
            raise ValueError("adapter was trained on a base of another architecture: " + "; ".join(diff))
        fingerprint = self.model.base_fingerprint()
        if folder.base_fingerprint != fingerprint:
            msg = (f"adapter was trained on other base weights (fingerprint {folder.base_fingerprint}, "
                   f"this base {fingerprint})")  # fmt: skip
            init = folder.settings.lora_init
            if init in BASE_DERIVED_INITS:  # its B0 A0 is that base's principal part: wrong on any other
                raise ValueError(f"{msg}; a lora_init {init} adapter trains on the residual of the base it was "
                                 "made from and works only on that base (--force cannot apply it to another)")  # fmt: skip
            if not force:
                raise ValueError(msg + "; pass force=True (--force) to load it anyway")
            return [msg + "; loaded anyway (force)"]
        return []

    def from_folder(self, folder: AdapterFolder) -> Adapter:
        """The adapter a folder holds, its modules and tensor shapes checked against this model."""
        ranks = {m: r for m, (r, _) in folder.modules.items()}
        # a module this model lacks is the config's fault; a missing or mis-shaped tensor the weights file's
        self.check_tensors(folder.tensors, ranks, folder.num_classes, folder.weights_path, folder.config_path,
                           folder.settings)  # fmt: skip
        return folder.to_adapter()

    # ----------------------------------------------------------------------------------------------------
    # Folders

    def peft_layout(self) -> PeftLayout:
        """PEFT's names for this model's modules (``lora/peft_names.py``): its Hugging Face folder's family, or
        GPT-2's or Llama's by its layout; a model of another layout raises ``ValueError``."""
        return peft_layout(self.model.config, self.model.hf_model_type)

    def load(self, path: str | Path, name: str = "default", force: bool = False) -> str:
        """Load the adapter folder (ours or PEFT's) in ``path`` as ``name`` and make it active; returns the
        name (see ``LoRATransformer.load_adapter``)."""
        if is_peft_folder(path):
            model = self.model
            adapter = adapter_from_peft(path, model.config, model.fused_row_norms(), self.peft_layout())
            ranks = {m: s.r for m, s in adapter.layers.items()}
            self.check_tensors(adapter.tensors(), ranks, None, path, settings=adapter.settings)
            self.activate(name, adapter)
            return name
        folder = read_adapter_folder(path)
        for w in self.check_fits(folder, force):
            warnings.warn(w, stacklevel=3)
        self.activate(name, self.from_folder(folder))
        return name

    def save(
        self,
        path: str | Path,
        name: str | None = None,
        extra: dict[str, Any] | None = None,
        fingerprint: str | None = None,
    ) -> Path:
        """Write adapter ``name`` (default: the active one) to the folder ``path``, with ``extra`` facts and the
        base's ``fingerprint`` (default: computed now)."""
        name = self.active_name() if name is None else name
        adapter = self.get(name)
        adapter = dataclasses.replace(adapter, extra={**adapter.extra, **(extra or {})})
        model = self.model
        fingerprint = model.base_fingerprint() if fingerprint is None else fingerprint
        return write_adapter_folder(path, adapter, name, model.config, fingerprint, model.base_quantization)

    def export_peft(self, path: str | Path, name: str | None = None, base: str | None = None) -> Path:
        """Write adapter ``name`` (default: the active one) as a Hugging Face PEFT LoRA folder."""
        layout = self.peft_layout()
        adapter = self.get(self.active_name() if name is None else name)
        return write_peft_folder(path, adapter, self.model.config, base, self.model.fused_row_norms(), layout)

    def parameter_stats(self) -> dict:
        """Counts of total / trainable / LoRA / frozen parameters (tied weights counted once) and, per target
        of the family (``lora_params_by_projection``), of the LoRA tensors on it."""
        params = dict(self.model.named_parameters())  # named_parameters skips the tied duplicate
        total = sum(p.numel() for p in params.values())
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        per_proj = dict.fromkeys(self.model.config.targets(), 0)
        for name, layer in self.model.lora_layers():
            magnitude = 0 if layer.lora_magnitude is None else layer.lora_magnitude.numel()
            per_proj[target_of(name)] += layer.lora_A.numel() + layer.lora_B.numel() + magnitude
        lora = sum(per_proj.values())
        return {
            "total_params": total,
            "trainable_params": trainable,
            "lora_params": lora,
            "frozen_params": total - trainable,
            "trainable_percent": 100.0 * trainable / total,
            "reduction_factor": total / trainable if trainable else float("inf"),
            "lora_params_by_projection": per_proj,
        }


def _dropout_p(layer: LoRALinear) -> float:
    return float(layer.lora_dropout.p) if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


def describe_trainable(stats: dict) -> str:
    """What a run trains, in words, from :meth:`AdapterSet.parameter_stats`: ``16,384 of 1,678,336 parameters
    (0.98%, 102x fewer)`` for adapters, ``all 1,678,336 parameters`` when every weight trains."""
    trainable, total = stats["trainable_params"], stats["total_params"]
    if trainable == total:
        return f"all {total:,} parameters"
    share = f"{stats['trainable_percent']:.2f}%"
    if trainable:
        share += f", {stats['reduction_factor']:.0f}x fewer"
    return f"{trainable:,} of {total:,} parameters ({share})"
