"""Q, K and V of one attention block in one product: LoRA layers that share their input, fused.

The three layers ``p`` in (q, k, v) each compute ``y_p = x W_p^T + b_p + s_p (x A_p^T) B_p^T``
(``lora/lora_layer.py``). Fused, for ``x`` of ``M`` rows (M, C)::

    y = x W^T + b + s (x A^T) D^T                                               (M, N), N = Σ out_p

    W = [W_q; W_k; W_v]  (N, C)     b = [b_q; b_k; b_v]  (N,)       the frozen bases, stacked
    A = [A_p; ...]       (R, C)     R = Σ r_p over the adapted layers only
    D                    (N, R)     block-diagonal: (s_p / s) B_p in p's rows and columns, 0 elsewhere

with ``s`` the first adapted layer's scaling (the ratio is 1, and not applied, when the scalings agree).
A PiSSA/OLoRA layer brings its whole update's factors (``[A_p; A0_p]``, ``[B_p, -B0_p]``: ``LoRALinear.factors``).
With DoRA the sum is taken without the bias, its columns scaled by ``g = [g_q; g_k; g_v]`` (a layer's
``m / ||W + s B A||_row``, 1 for a layer without DoRA), then ``b`` added: ``y = g * (x W^T + s h D^T) + b``.
That is three products (``x W^T``, ``h = x A^T``, ``h D^T``, the last two skinny: R is 8 to 24) where
three adapted layers take nine, and ``y``'s column blocks are ``y_q, y_k, y_v``. The zero blocks of ``D``
add exact zeros, so the result equals the per-layer one to float rounding.

The parameters stay the layers' own (``q_proj.weight``, ``q_proj.lora_A`` ...): state dicts, adapters,
merging and the base fingerprint are untouched. ``W`` and ``b`` are concatenations of frozen tensors, kept
by :class:`FrozenConcat` until one of them changes (an attention block's own makes its layers' frozen
tensors views of the stack, so it takes no memory of its own). Everything here is plain differentiable operations,
so ``torch.compile`` traces forward and backward alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lora.lora_layer import LoRALinear
from lora.quantize import frozen_linear, is_quantized, quantized_linear

__all__ = ["FrozenConcat", "can_fuse", "fused_lora_linear"]


class FrozenConcat:
    """``torch.cat`` of each group of tensors that need no gradient, computed again only when one changes.

    A change is a tensor replaced (another object, storage, shape, dtype or device) or modified in place
    through autograd's version counter (``copy_``, ``merge()``, ``load_state_dict``, an optimizer step).
    Writes through ``tensor.data`` bypass that counter: call :meth:`clear` after them. Under
    ``torch.compile`` the concatenation is part of the graph instead.

    With ``adopt`` the tensors then become views of their stacked copy (``t.data = stacked[rows]``: the same
    values and objects, another storage), so the copy costs no memory beyond the tensors' own (GPT-2 small's
    q, k, v weights: 81 MiB that a separate copy would add to its 475) and an in-place change of one (a merge)
    changes the stack with it. Their old storage is freed once nothing else holds it.
    """

    def __init__(self, adopt: bool = False) -> None:
        self.adopt = adopt
        self._key: tuple | None = None
        self._value: tuple[torch.Tensor, ...] | None = None

    def clear(self) -> None:
        """Forget the copies (the next call concatenates again)."""
        self._key = self._value = None

    def __call__(self, *groups: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``(torch.cat(group) for group in groups)``, kept from an earlier call if no tensor changed."""
        tensors = [t for group in groups for t in group]
        if torch.compiler.is_compiling() or any(t.requires_grad or t.is_inference() for t in tensors):
            return tuple(torch.cat(group) for group in groups)
        key = tuple((t, t.data_ptr(), t._version, t.shape, t.dtype, t.device) for t in tensors)
        same = (
            self._key is not None
            and len(key) == len(self._key)
            and all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(key, self._key, strict=True))
        )
        if not same:
            self._value = None  # the old copies are freed before the new ones are made
            with torch.inference_mode(False), torch.no_grad():  # normal tensors: autograd may save them
                self._value = tuple(torch.cat(group) for group in groups)
                if self.adopt:
                    for group, stacked in zip(groups, self._value, strict=True):
                        start = 0
                        for t in group:
                            t.data = stacked[start : start + t.shape[0]]  # (rows of the stack, ...)
                            start += t.shape[0]
                    key = tuple((t, t.data_ptr(), t._version, t.shape, t.dtype, t.device) for t in tensors)
            self._key = key
        return self._value

    def __getstate__(self) -> dict:
        # a copied or pickled model concatenates (and adopts) again
        return {"adopt": self.adopt, "_key": None, "_value": None}


def can_fuse(layers: Sequence[object]) -> bool:
    """Whether :func:`fused_lora_linear` covers ``layers``: LoRA layers of one input width, dtype and device,
    all with or all without a bias, whose base tensors need no gradient (full fine-tuning keeps the
    per-layer path, where each weight's gradient is its own product)."""
    if not layers or not all(isinstance(m, LoRALinear) for m in layers):
        return False
    first = layers[0].weight
    for m in layers:
        w, b = m.weight, m.bias
        if w.requires_grad or (b is not None and b.requires_grad):
            return False
        if m.in_features != layers[0].in_features or (b is None) != (layers[0].bias is None):
            return False
        if w.dtype != first.dtype or w.device != first.device:
            return False
    return True


def fused_lora_linear(
    x: torch.Tensor, layers: Sequence[LoRALinear], frozen: FrozenConcat | None = None
) -> torch.Tensor:
    """``(..., C) -> (..., N)``: the outputs of ``layers`` side by side, as the module docstring computes them.

    ``layers`` must pass :func:`can_fuse`. A layer without an active adapter (``r = 0``, merged, disabled)
    contributes its base only, as its own ``forward`` does. With LoRA dropout active (training, ``p > 0``)
    each adapted layer draws its own mask on ``x`` in the layers' order, as the layers do one after the
    other, so the random stream and the result are the same; its ``x A_p^T`` is then a product of its own.
    ``frozen`` keeps the stacked base between calls (``None``: concatenated on every call).
    """
    frozen = FrozenConcat() if frozen is None else frozen
    adapted = [m for m in layers if m.adapter_active]
    dora = any(m.use_dora for m in adapted)
    if dora and any(m.dropout_active for m in adapted):  # DoRA with dropout takes PEFT's per-layer form
        return torch.cat([m(x) for m in layers], dim=-1)
    x2 = x.reshape(-1, x.shape[-1])  # (M, C)
    quantized = any(is_quantized(m.weight) for m in layers)
    if quantized:  # 4-bit bases: dequantized and stacked for each product, not kept
        bias = None if layers[0].bias is None else frozen([m.bias for m in layers])[0]  # (N,)
        y = quantized_linear(x2, [m.weight for m in layers], None if dora else bias)  # (M, N)
    else:
        if layers[0].bias is None:
            (weight,), bias = frozen([m.weight for m in layers]), None  # (N, C)
        else:
            weight, bias = frozen([m.weight for m in layers], [m.bias for m in layers])  # (N, C), (N,)
        # (M, N); a bfloat16 stack is widened outside autocast
        y = frozen_linear(x2, weight, None if dora else bias)
    if adapted:
        factors = {id(m): m.factors() for m in adapted}  # (A_p (r_p, C), B_p (out_p, r_p))
        if any(m.dropout_active for m in adapted):
            h = torch.cat([F.linear(m.lora_dropout(x2), factors[id(m)][0]) for m in adapted], dim=1)  # (M, R)
        else:
            h = F.linear(x2, torch.cat([factors[id(m)][0] for m in adapted]))  # (M, R)
        s = adapted[0].scaling
        blocks = [
            (factors[id(m)][1] if m.scaling == s else factors[id(m)][1] * (m.scaling / s))  # (out_p, r_p)
            if m.adapter_active
            else factors[id(adapted[0])][1].new_zeros(m.out_features, 0)  # rows of a layer without an adapter
            for m in layers
        ]
        d = torch.block_diag(*blocks)  # (N, R)
        if torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():
            y = torch.addmm(y, h, d.t(), alpha=s)  # autocast casts out-of-place products only
        else:
            y = y.addmm_(h, d.t(), alpha=s)  # (M, N) += s h D^T; y's product saved nothing to overwrite
    if dora:
        g = torch.cat([m.dora_scale() if m.adapter_active and m.use_dora else y.new_ones(m.out_features)
                       for m in layers])  # fmt: skip
        g = g.to(y.dtype)  # under autocast: y's dtype
        y = y * g if bias is None else torch.addcmul(bias.to(y.dtype), y, g)  # (M, N): g * y + b
    return y.view(*x.shape[:-1], y.shape[-1])
