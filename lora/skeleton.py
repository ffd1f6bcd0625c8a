"""A model built around weights read from a file, without first making random ones to overwrite.

``from_pretrained`` used to build the whole model with its random initialisation (4 bytes a weight) and then
copy the file's tensors over it: twice the weights' memory at its peak, and more for a half-precision file.
Here the model is built on the ``meta`` device (:func:`build_on_meta`: shapes only, nothing allocated), the
file's tensors, memory-mapped, become its parameters as they are (:func:`fill`: ``load_state_dict(...,
assign=True)``, no copy), and only what the file does not hold is made: the LoRA tensors and a fresh
classification head.

Those must be exactly what building the model on the CPU would have made, and the random generator must be
left where that would have left it (a seed gives the same adapter, the same dropout masks, the same batches
as before). :func:`construction_draws` therefore makes every random draw of the construction again, in its
order and on tensors of the same sizes, each freed at once: the constructors' (an ``nn.Embedding``'s
``N(0, 1)``, an ``nn.Linear``'s Kaiming-uniform weight and uniform bias, each LoRA layer's ``A``), then
``Decoder._init_weights``' ``N(0, 0.02)`` of every weight. Its peak is the largest single tensor (the
token embedding, in float32), not the model. ``tests/test_half_load.py`` checks the tensors and the
generator's state against a model built the plain way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

from lora.decoder import Decoder, rotary_frequencies
from lora.lora_layer import LORA_LEAVES, LoRALinear, deferred_base_init
from lora.quantize import release_freed_memory

__all__ = ["build_on_meta", "construction_draws", "fill"]

M = TypeVar("M", bound=Decoder)


def build_on_meta(make: Callable[[], M]) -> M:
    """``make()`` on the ``meta`` device: every tensor a shape and a dtype, none allocated, no random draw,
    no base-derived adapter start (:func:`~lora.lora_layer.deferred_base_init`)."""
    with torch.device("meta"), deferred_base_init():
        return make()


def _init_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose construction draws, in construction order (``named_modules``' registration order),
    which is also the order ``Decoder._init_weights`` visits them in."""
    kinds = (nn.Linear, LoRALinear, nn.Embedding)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


@torch.no_grad()
def construction_draws(model: Decoder, fresh_head: bool) -> dict[str, torch.Tensor]:
    """Make again, on the CPU, every random draw that building ``model`` (made by :func:`build_on_meta`)
    there would have made, in the same order (the module docstring); return the tensors a base file does not
    hold, as that build would have made them: each LoRA layer's ``lora_*`` tensors (``A`` as drawn, ``B``
    zeros, PiSSA's and OLoRA's ``A0, B0`` zeros and DoRA's magnitude, both derived from the base later) and,
    with ``fresh_head``, the classification head (``N(0, 0.02)`` weight, zero bias)."""
    made: dict[str, torch.Tensor] = {}
    modules = _init_modules(model)
    with torch.device("cpu"), warnings.catch_warnings(), deferred_base_init():
        warnings.simplefilter("ignore")  # (a rank above the layer's was warned about when it was built)
        for name, m in modules:  # the constructors' draws
            if isinstance(m, nn.Embedding):
                nn.Embedding(m.num_embeddings, m.embedding_dim)
            elif isinstance(m, nn.Linear):
                nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            else:
                p = m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0
                scratch = LoRALinear(m.in_features, m.out_features, m.r, m.lora_alpha, p, bias=m.bias is not None,
                                     use_rslora=m.use_rslora, use_dora=m.use_dora, lora_init=m.lora_init)  # fmt: skip
                made.update({f"{name}.{k}": v for k, v in scratch.state_dict().items() if k in LORA_LEAVES})
        for name, m in modules:  # Decoder._init_weights': N(0, 0.02) of every weight (the head's kept)
            weight = torch.empty(m.weight.shape).normal_(0.0, 0.02)
            if fresh_head and name == "cls_head":
                made["cls_head.weight"], made["cls_head.bias"] = weight, torch.zeros(m.out_features)
    release_freed_memory()  # the scratch tensors' pages back to the system before the file's are read
    return made


def fill(model: M, tensors: Mapping[str, torch.Tensor]) -> M:
    """``model`` (built on the meta device) with ``tensors`` as its parameters and buffers, taken as they
    are (``assign``: no copy, the dtype theirs), a tied LM head tied again, the rotary frequencies (a plain
    attribute) computed. ``tensors`` must hold every tensor of the model but a tied head."""
    tied = ["lm_head.weight"] if model.config.tied_head else []
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    assert missing == tied and not unexpected, (missing, unexpected)
    if tied:
        model.lm_head.weight = model.wte.weight  # stored once
    config = model.config
    if model.rope_freq is not None:  # (built on the meta device too)
        model.rope_freq = rotary_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, left
    return model
