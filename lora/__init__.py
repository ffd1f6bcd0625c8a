"""LoRA fine-tuning of GPT-2-layout transformers: the layer, the model, the trainer (``lora.trainer``)."""

from lora._version import __version__
from lora.lora_layer import (
    LinearWithLoRA,
    LoRALinear,
    disable_adapter,
    inject_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    unmerge_lora,
)
from lora.lora_transformer import LoRATransformer

__all__ = [
    "LinearWithLoRA",
    "LoRALinear",
    "LoRATransformer",
    "__version__",
    "disable_adapter",
    "inject_lora",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "unmerge_lora",
]
