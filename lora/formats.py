"""The disk formats: model folders and adapter folders, safetensors + JSON only (nothing is unpickled).

* A model folder: ``config.json`` (a :class:`ModelConfig`, plus facts such as which adapter was merged in)
  and ``model.safetensors`` (every non-LoRA tensor, unmerged; the tied LM head stored once as
  ``wte.weight``; ``cls_head.*`` if the model has one).
* An adapter folder: ``adapter_config.json`` (the :class:`LoRAConfig` keys, the scaling rule, the rank and
  alpha of every module, the base's architecture and fingerprint, this project's version, and extra facts
  such as the task) and ``adapter_model.safetensors`` (``<module>.lora_A`` ``(r, in)``, ``<module>.lora_B``
  ``(out, r)``; with DoRA ``<module>.lora_magnitude`` ``(out,)``; after a PiSSA or OLoRA start the initial
  factors ``<module>.lora_A0`` ``(r, in)`` and ``<module>.lora_B0`` ``(out, r)``; and ``cls_head.*`` if any).

These functions read and write the files (a model folder is read by ``lora/pretrained.py``); whether an
adapter fits a model is its adapter set's question (``lora/adapter_set.py``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from lora._version import __version__
from lora.adapter import Adapter, LayerAdapter
from lora.errors import quote
from lora.files import (
    atomic_write_files,
    existing_folder,
    json_bytes,
    read_json,
    read_safetensors,
    read_safetensors_header,
    safetensors_file_bytes,
)
from lora.lora_layer import LORA_LEAVES, validate_lora_args
from lora.model_config import LoRAConfig, ModelConfig

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterFolder",
    "read_adapter_folder",
    "write_adapter_files",
    "write_adapter_folder",
    "write_model_folder",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_LORA_KEYS = tuple(f.name for f in fields(LoRAConfig))
# the keys of adapter_config.json that this module writes; any other key is an extra fact
RESERVED_KEYS = frozenset(
    {
        "adapter_name",
        "scaling",
        "num_classes",
        "modules",
        "base",
        "base_fingerprint",
        "base_quantization",
        "version",
        *_LORA_KEYS,
    }
)


# ---------------------------------------------------------------------------------------------------------
# Model folders


def write_model_folder(
    folder: str | Path, config: ModelConfig, tensors: Mapping[str, torch.Tensor], extra: dict | None = None
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (``config`` plus ``extra`` keys) atomically, together: a
    failure while writing leaves the folder's earlier model whole (:func:`~lora.files.atomic_write_files`)."""
    folder = Path(folder)
    atomic_write_files({folder / WEIGHTS_NAME: safetensors_file_bytes(tensors),
                        folder / CONFIG_NAME: json_bytes({**config.to_file_dict(), **(extra or {})})})  # fmt: skip
    return folder


# ---------------------------------------------------------------------------------------------------------
# Adapter folders


@dataclass
class AdapterFolder:
    """What an adapter folder holds: the adapter's tensors as saved, and its ``adapter_config.json``.

    ``modules`` maps each adapted module to ``(r, lora_alpha)``; ``base`` is the base's architecture
    (:meth:`ModelConfig.shape`) and ``base_fingerprint`` the hash of its weights.
    """

    path: Path
    settings: LoRAConfig
    modules: dict[str, tuple[int, float]]
    num_classes: int | None
    base: dict[str, Any]
    base_fingerprint: str
    extra: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]  # adapter_config.json as read

    @property
    def config_path(self) -> Path:
        return self.path / ADAPTER_CONFIG_NAME

    @property
    def weights_path(self) -> Path:
        return self.path / ADAPTER_WEIGHTS_NAME

    def to_adapter(self) -> Adapter:
        """The :class:`Adapter` (:func:`read_adapter_folder` has refused a tensor the config lists but the file
        lacks; shapes are checked by the model that loads it)."""
        s = self.settings
        layers = {
            m: LayerAdapter(r, alpha, s.lora_dropout, s.use_rslora,
                            *(self.tensors.get(f"{m}.{k}") for k in LORA_LEAVES))
            for m, (r, alpha) in self.modules.items()
        }  # fmt: skip
        head = None
        if self.num_classes is not None:
            head = {k: self.tensors[f"cls_head.{k}"] for k in ("weight", "bias")}
        return Adapter(layers, head, s, dict(self.extra))


def write_adapter_folder(
    folder: str | Path,
    adapter: Adapter,
    name: str,
    base: ModelConfig,
    base_fingerprint: str,
    base_quantization: str | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` for ``adapter`` on ``base`` (its
    fingerprint always that of the full-precision weights; ``base_quantization`` how they were stored in
    training, ``None`` or ``"nf4"``, a fact: the adapter loads on either)."""
    clash = sorted(set(adapter.extra) & RESERVED_KEYS)
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite adapter settings")
    config = {
        **adapter.extra,
        **adapter.settings.to_dict(),
        "adapter_name": name,
        "scaling": "alpha/sqrt(r)" if adapter.settings.use_rslora else "alpha/r",
        "num_classes": adapter.num_classes,
        "modules": {m: {"r": s.r, "lora_alpha": s.lora_alpha} for m, s in sorted(adapter.layers.items())},
        "base": base.shape(),
        "base_fingerprint": base_fingerprint,
        "base_quantization": base_quantization,
        "version": __version__,
    }
    return write_adapter_files(folder, adapter.tensors(), config, {"adapter_name": name})


def write_adapter_files(folder: str | Path, tensors: Mapping[str, torch.Tensor], config: Mapping,
                        metadata: dict[str, str] | None = None) -> Path:  # fmt: skip
    """``adapter_model.safetensors`` (``tensors``, with ``metadata``) and ``adapter_config.json`` (``config``),
    replacing an earlier pair together (:func:`~lora.files.atomic_write_files`): ours and PEFT's layout."""
    folder = Path(folder)
    atomic_write_files({folder / ADAPTER_WEIGHTS_NAME: safetensors_file_bytes(tensors, metadata),
                        folder / ADAPTER_CONFIG_NAME: json_bytes(config)})  # fmt: skip
    return folder


def _refuse_missing(present: Collection[str], modules: Collection[str], settings: LoRAConfig,
                   num_classes: int | None, weights_path: Path) -> None:  # fmt: skip
    """Refuse a weights file without a tensor that ``adapter_config.json`` lists: each module's factors (the
    leaves ``settings`` name) and, for ``num_classes``, the head's."""
    names = [f"{m}.{k}" for m in modules for k in settings.leaves]
    names += [f"cls_head.{k}" for k in ("weight", "bias")] if num_classes is not None else []
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"{weights_path} lacks {missing} listed in {ADAPTER_CONFIG_NAME}")


# the axis of the rank in each factor: A and A0 are (r, in), B and B0 (out, r)
_RANK_AXIS = {"lora_A": 0, "lora_A0": 0, "lora_B": 1, "lora_B0": 1}


def _check_ranks(header: Mapping[str, torch.Tensor], ranks: Mapping[str, int], config_path: Path) -> None:
    """Refuse a factor of rank 0, and a module whose rank in ``ranks`` (what ``config_path`` claims) is not
    the rank its factors in ``header`` hold (the rows of A, the columns of B): on the weights file's header,
    before a layer of the claimed rank is allocated. A factor missing or not 2-D is left to the shape checks."""
    weights = config_path.parent / ADAPTER_WEIGHTS_NAME
    for name, t in header.items():
        module, _, leaf = name.rpartition(".")
        if leaf in _RANK_AXIS and t.ndim == 2 and t.shape[_RANK_AXIS[leaf]] == 0:
            raise ValueError(f"{weights}: {name} has shape {tuple(t.shape)}: module {quote(module)} has rank 0, "
                             "but a rank must be a positive integer")  # fmt: skip
    for m, r in ranks.items():
        for leaf, axis in _RANK_AXIS.items():
            t = header.get(f"{m}.{leaf}")
            if t is not None and t.ndim == 2 and t.shape[axis] != r:
                raise ValueError(f"{config_path}: module {quote(m)} claims rank {r}, but its {leaf} in "
                                 f"{weights.name} has shape {tuple(t.shape)}, rank {t.shape[axis]}")  # fmt: skip


def read_adapter_folder(path: str | Path) -> AdapterFolder:
    """Read and check ``adapter_config.json`` (required keys, ranks) and the tensors of an adapter folder."""
    folder = existing_folder(path, "adapter")
    config_path = folder / ADAPTER_CONFIG_NAME
    config = read_json(config_path)
    if "peft_type" in config:
        raise ValueError(f"{folder} is a Hugging Face PEFT adapter, which this tool does not read; "
                         "LoRATransformer.load_adapter, generate.py and merge_adapter.py load it")  # fmt: skip
    required = [k for k in _LORA_KEYS if k not in LoRAConfig.OPTIONAL_KEYS]
    missing = [k for k in ("modules", "base", "base_fingerprint", *required) if k not in config]
    if missing:
        raise ValueError(f"{config_path}: missing keys {missing}")
    settings = LoRAConfig.from_dict(config, where=str(config_path))
    if not isinstance(config["modules"], dict) or not isinstance(config["base"], dict):
        raise ValueError(f"{config_path}: 'modules' and 'base' must be JSON objects")
    modules = {}
    for m, spec in config["modules"].items():
        r = spec.get("r") if isinstance(spec, dict) else None
        alpha = spec.get("lora_alpha", settings.lora_alpha) if isinstance(spec, dict) else None
        try:
            validate_lora_args(
                r, alpha, settings.lora_dropout
            )  # the layer's rule; and a saved module has r >= 1
        except ValueError as e:
            raise ValueError(f"{config_path}: module {quote(m)}: {e}") from None
        if r == 0:
            raise ValueError(
                f"{config_path}: module {quote(m)} has rank 0 (no adapter); drop it from 'modules'"
            )
        modules[m] = (r, float(alpha))
    num_classes = config.get("num_classes")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
    ):
        raise ValueError(
            f"{config_path}: num_classes must be an integer >= 2 or null, got {quote(num_classes)}"
        )
    extra = {k: v for k, v in config.items() if k not in RESERVED_KEYS}
    weights_path = folder / ADAPTER_WEIGHTS_NAME
    # the header first (names, shapes, float dtypes): a claimed rank is checked before anything is allocated
    header = read_safetensors_header(weights_path)
    _refuse_missing(header, modules, settings, num_classes, weights_path)
    _check_ranks(header, {m: r for m, (r, _) in modules.items()}, config_path)
    tensors = read_safetensors(weights_path)
    return AdapterFolder(folder, settings, modules, num_classes, config["base"], str(config["base_fingerprint"]),
                         extra, tensors, config)  # fmt: skip
