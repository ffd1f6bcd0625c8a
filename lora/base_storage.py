"""How a decoder's frozen base is stored: narrower than the adapter, which stays float32 and trains as before.

``"nf4"`` (QLoRA, ``lora/quantize.py``): every block's linear weight (q, k, v, o, fc1, fc2) in 4-bit
NormalFloat, dequantized on the fly in each product, and the token and position embeddings and the LM head
(tied to the embedding, or its own) in bfloat16, as QLoRA keeps what it does not quantize: NF4's blocks do not tile GPT-2's 50,257
rows, and the embedding is 38.6 M of its 124 M weights. Products stay in float32 (the decoder's
``hidden_states``, ``logits`` and :func:`~lora.chunked_loss.chunked_lm_loss` widen what they read).

``"bf16"``: the block linear weights and biases in bfloat16, the compute dtype of bf16 autocast, so a GPU
step casts none of them (autocast casts a float32 weight that does not train in every forward); its
products are those of the float32 base under autocast, bit for bit (the same rounding). The embeddings stay
float32 (the residual stream starts from them, outside autocast), and so do the LayerNorms (autocast runs
them in float32). Outside autocast each product widens its weight.

:func:`narrow_base_` stores a model's base so; :func:`dense_weights` makes it dense for a while (sampling).
The model keeps which storage it has and the full-precision fingerprint
(``LoRATransformer.quantize_base``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lora.decoder import Decoder
from lora.lora_layer import NARROW_BASES, lora_modules
from lora.quantize import check_tiles, dequantize, narrow_linear_, quantize_linear_, release_freed_memory

__all__ = ["QUANTIZATIONS", "check_narrowable", "dense_weights", "narrow_base_", "set_embedding_dtype"]

QUANTIZATIONS = ("nf4", "bf16")


def check_narrowable(model: Decoder, kind: str) -> None:
    """Refuse (``ValueError``) to store ``model``'s base as ``kind`` before any weight changes: another kind,
    a merged adapter, base weights being trained, or (nf4) weights that do not tile NF4's blocks."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantize_base takes one of {', '.join(QUANTIZATIONS)}, got {kind!r}")
    layers = [layer for _, layer in lora_modules(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("unmerge the adapter before quantizing the base (merged weights hold it)")
    frozen = [layer.weight for layer in layers] + [layer.bias for layer in layers if layer.bias is not None]
    if any(t.requires_grad for t in [*frozen, *(emb.weight for emb in model.embeddings())]):
        raise ValueError(f"the base's weights are being trained (full fine-tuning): a {NARROW_BASES[kind]} "
                         "base stays frozen; call configure_lora_training() first")  # fmt: skip
    if kind == "nf4":
        check_tiles({n: m.weight.shape for n, m in lora_modules(model)})


def narrow_base_(model: Decoder, kind: str) -> None:
    """Store ``model``'s block weights as ``kind`` (and for nf4 its embeddings in bfloat16), in place; checked
    first by :func:`check_narrowable`."""
    for _, layer in lora_modules(model):
        layer.adapter_dtype = layer.weight.dtype  # adapters made later stay in full precision
        (quantize_linear_ if kind == "nf4" else narrow_linear_)(layer)
    if kind == "nf4":
        set_embedding_dtype(model, torch.bfloat16)
    for block in model.blocks:
        block.attn._frozen_qkv.clear()
    if model.wte.weight.device.type == "cpu":
        release_freed_memory()  # the dense weights' pages back to the system, not kept by the allocator


@torch.no_grad()
def set_embedding_dtype(model: Decoder, dtype: torch.dtype) -> None:
    """Store the frozen embeddings and the LM head (tied to ``wte``, or its own) in ``dtype``."""
    for emb in model.embeddings():
        if emb.weight.dtype != dtype:
            emb.weight = nn.Parameter(emb.weight.to(dtype), requires_grad=False)
    _retie(model)
    if not model.config.tied_head and model.lm_head.weight.dtype != dtype:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.to(dtype), requires_grad=False)


def _retie(model: Decoder) -> None:
    """A tied LM head is the token embedding again (after ``wte.weight`` was replaced)."""
    if model.config.tied_head:
        model.lm_head.weight = model.wte.weight


@contextmanager
def dense_weights(model: Decoder) -> Iterator[None]:
    """Within the block a narrow base's weights are dense and in the computation's dtype (dequantized or
    widened once: the same values, the memory of full precision), so that many small forwards (sampling)
    do not each dequantize or widen every weight (nor the bfloat16 LM head); after it they are the same
    narrow tensors again."""
    dtype = model.ln_f.weight.dtype
    kept = [(layer, name, tensor) for _, layer in lora_modules(model) for name in ("weight", "bias")
            if (tensor := getattr(layer, name)) is not None]  # fmt: skip
    embeddings = [(emb, emb.weight) for emb in model.embeddings()]
    if not model.config.tied_head:  # a separate LM head is narrowed with the embeddings
        embeddings.append((model.lm_head, model.lm_head.weight))
    try:
        for layer, name, tensor in kept:
            setattr(layer, name, nn.Parameter(dequantize(tensor).to(dtype), requires_grad=False))
        set_embedding_dtype(model, dtype)
        yield
    finally:
        for layer, name, tensor in kept:
            setattr(layer, name, tensor)
        for emb, weight in embeddings:
            emb.weight = weight
        _retie(model)
        for block in model.blocks:
            block.attn._frozen_qkv.clear()
