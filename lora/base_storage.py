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

A half-precision file (every tensor bfloat16, or every one float16) is kept as it is stored, not widened
(:func:`kept_as`): the block linear weights and biases, the embeddings and the LM head in the file's dtype,
only the norms (and a saved classification head, which trains) widened to float32, the computation's dtype;
the adapter float32, the half weights frozen (:func:`freeze_half`). Widening a half value is exact, so every product is the one
the float32 copy of the file gives, outside autocast (the weight widened for it) and under bf16 autocast
(the same rounding to bfloat16) alike: half the memory, the same numbers. Nothing was rounded, so such a base
merges and saves (back in the file's dtype: :func:`as_stored`).

:func:`narrow_base_` stores a model's base so; :func:`dense_weights` makes it dense for a while (sampling).
The model keeps which storage it has and the full-precision fingerprint
(``LoRATransformer.quantize_base``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from lora.decoder import Decoder
from lora.lora_layer import NARROW_BASES, lora_modules
from lora.quantize import check_tiles, dequantize, narrow_linear_, quantize_linear_, release_freed_memory

__all__ = [
    "HALF_DTYPES",
    "QUANTIZATIONS",
    "as_stored",
    "check_narrowable",
    "dense_weights",
    "freeze_half",
    "half_dtype",
    "kept_as",
    "narrow_base_",
    "set_embedding_dtype",
]

QUANTIZATIONS = ("nf4", "bf16")
HALF_DTYPES = (torch.bfloat16, torch.float16)


def half_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The half-precision dtype every one of ``tensors`` has (bfloat16 or float16; ``meta`` ones too), or
    ``None`` (float32, or dtypes mixed: such a file is widened to float32)."""
    dtypes = {t.dtype for t in tensors.values()}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= set(HALF_DTYPES) else None


def _half_keys(model: Decoder) -> set[str]:
    """The state-dict keys a half-precision file's base keeps in its dtype: every block linear weight and
    bias, the embeddings and an untied LM head (the bulk of the weights; each read widened)."""
    keys = {f"{n}.{leaf}" for n, _ in lora_modules(model) for leaf in ("weight", "bias")}
    return keys | {"wte.weight", "wpe.weight", "lm_head.weight"}


def kept_as(
    model: Decoder, tensors: Mapping[str, torch.Tensor], half: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """``tensors`` (base tensors for ``model``) in the dtypes the model keeps them in: with ``half`` (the
    file's dtype) the block linear layers, embeddings and LM head as they are, the rest widened to float32;
    without, all float32. A tensor already in its dtype is not copied (a memory-mapped one stays so)."""
    keys = _half_keys(model) if half is not None else set()
    return {k: v if k in keys else v.float() for k, v in tensors.items()}


def freeze_half(model: Decoder) -> None:
    """A half-precision file's weights, kept so, frozen (full fine-tuning widens them first: AdamW's updates
    would round away in half precision), and every adapter made for ``model``'s layers later (a loaded one
    of another rank) float32 beside them, as the ones it has."""
    for _, layer in lora_modules(model):
        layer.adapter_dtype = torch.float32
    for name, p in model.named_parameters():
        if name in _half_keys(model):
            p.requires_grad_(False)


def as_stored(tensors: Mapping[str, torch.Tensor], half: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Base tensors as a half-precision file stored them (``half``: its dtype; the widened norms narrowed
    back, exactly), or as they are (``None``)."""
    return dict(tensors) if half is None else {k: v.to(half) for k, v in tensors.items()}


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
        # adapters made later stay in full precision (float32 beside a half-precision file's weights)
        layer.adapter_dtype = layer.adapter_dtype or layer.weight.dtype
        if kind == "nf4" and layer.weight.dtype != torch.float32:  # quantized from the float32 values
            layer.weight = nn.Parameter(layer.weight.float(), requires_grad=False)
            if layer.bias is not None:
                layer.bias = nn.Parameter(layer.bias.float(), requires_grad=False)
        (quantize_linear_ if kind == "nf4" else narrow_linear_)(layer)
        layer.narrowed = True
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
