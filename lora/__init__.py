"""LoRA fine-tuning of GPT-2-layout transformers: the layer, the model, the trainer (``lora.trainer``).

The names below are imported when first used (PEP 562), so that ``import lora.errors`` and the other small
modules do not load torch: a command line can install its signal handlers before the heavy imports.
"""

import importlib

from lora._version import __version__

_LAYER = ("LinearWithLoRA", "LoRALinear", "disable_adapter", "inject_lora", "lora_state_dict",
          "mark_only_lora_as_trainable", "merge_lora", "unmerge_lora")  # fmt: skip
_HOMES = {**dict.fromkeys(_LAYER, "lora.lora_layer"), "LoRATransformer": "lora.lora_transformer"}

__all__ = ["__version__", *sorted(_HOMES)]


def __getattr__(name: str) -> object:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'lora' has no attribute {name!r}")
