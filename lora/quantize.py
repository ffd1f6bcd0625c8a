"""A frozen base weight stored in 4-bit NormalFloat (NF4), QLoRA's data type, dequantized on the fly.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) keeps the frozen base ``W0`` (out, in) in 4 bits and trains
full-precision LoRA adapters on top. ``W0`` is cut, row-major, into blocks of ``block_size`` (64)
elements; block ``b`` keeps its absmax ``s_b = max |w|`` and, per element, the index of the nearest of
16 code values ``c_0 = -1 < ... < c_7 = 0 < ... < c_15 = 1`` (quantiles of N(0, 1), so that weights
that are roughly normal use the codes evenly) to ``w / s_b``::

    w ≈ c[i] * ŝ_b,     i = argmin_j |w / s_b - c_j|  (4 bits),     error ≤ (max gap / 2) s_b + |s_b - ŝ_b|

The half gap is largest next to ±1 (``(1 - 0.6962) / 2 = 0.152`` of ``s_b``). The absmaxes are quantized
too ("double quantization"): each run of ``scaler_block_size`` (256) of them, less their overall mean
``m``, is stored in int8 with a float factor, so ``|s_b - ŝ_b| ≤ A / 256`` with ``A = max |s - m|``
over the run (``A / 128`` for the largest, which the int8 range clamps from 128 to 127). In all about
4.13 bits per element: 0.5 byte, plus 1 byte per 64 elements, plus one float per 16,384; a float32
weight takes 7.75x more.

The data type is torchao's ``NF4Tensor`` (``pip install torchao``; imported when first needed). It needs
``out * in`` to be a multiple of ``block_size * scaler_block_size`` (16,384 by default: GPT-2's
projections are, its 50,257 x 768 embedding is not). It runs wherever torch does (CPU, CUDA): the
dequantization is plain tensor arithmetic.

:func:`quantized_linear` computes ``x W^T + b`` from the 4-bit form, with gradients for ``x`` and ``b``
but none for ``W`` (it is frozen); it saves the 4-bit tensors, not the dense ones, for backward, which
dequantizes again. :func:`quantize_linear_` swaps a layer's frozen weight to the 4-bit form in place (an
``nn.Parameter`` holding an ``NF4Tensor``, ``requires_grad`` false) and :func:`dequantize_linear_` back.

An ``NF4Tensor`` implements few operations. What works: ``F.linear(x, q, b)`` (torchao routes it to its
own function, gradient for ``x``), ``q.to(device)``, ``module.to(...)``, ``state_dict`` /
``load_state_dict`` (a dense tensor loaded into it is quantized), ``torch.save`` / ``torch.load``
(``weights_only`` too), ``copy.deepcopy``, pickling, ``torch.cat`` (which returns a dense tensor). What
does not: ``x @ q.t()``, ``g @ q``, ``torch.mm`` / ``addmm`` (errors), ``q + t`` and other arithmetic,
indexing, ``F.embedding``, ``safetensors``, ``.numpy()``; ``q.float()`` on a float32 ``q`` returns ``q``
itself, still 4-bit (``q.to(torch.float32)`` or :func:`dequantize` give the dense weight).

A frozen base may also be stored in bfloat16 (:func:`narrow_linear_`): half the memory, and under bf16
autocast (a GPU's default precision) nothing is cast per step, where a float32 weight is cast to bf16 in
every forward (autocast caches only casts of weights that train). The products are then the same, bit for
bit: autocast's cast and the stored copy are the same rounding. :func:`frozen_linear` computes the product
for any of the three forms: float32, bfloat16 (widened to the input's dtype outside autocast, as NF4 is
dequantized: for the product and again in backward) and NF4.

Run ``python lora/quantize.py`` for a short demonstration.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import importlib.util
import logging
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BLOCK_SIZE",
    "SCALER_BLOCK_SIZE",
    "check_tiles",
    "dequantize",
    "dequantize_linear_",
    "frozen_linear",
    "import_torchao_quietly",
    "is_quantized",
    "narrow_linear_",
    "quantize_linear_",
    "quantize_weight",
    "quantized_linear",
    "quantized_nbytes",
    "release_freed_memory",
]

BLOCK_SIZE = 64  # elements per absmax (QLoRA's choice)
SCALER_BLOCK_SIZE = 256  # absmaxes per int8 run of the double quantization (QLoRA's choice)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchao's and torch's pytree loggers at ERROR within the block: on a CPU-only torch torchao logs at
    import that its CUDA kernels do not load (NF4 does not use them), and torch that its enums register."""
    names = ("torchao", "torch.utils._pytree")
    levels = [logging.getLogger(n).level for n in names]
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        yield
    finally:
        for n, level in zip(names, levels, strict=True):
            logging.getLogger(n).setLevel(level)


def _torchao() -> ModuleType:
    """``torchao.quantization`` (imported once, quietly), or an ``ImportError`` that says what to install."""
    loaded = sys.modules.get("torchao.quantization")
    if loaded is not None:
        return loaded
    try:
        with _quiet():
            import torchao.quantization
    except ImportError as e:
        raise ImportError(f"4-bit NF4 weights need torchao: pip install torchao ({e})") from e
    return torchao.quantization


def import_torchao_quietly() -> bool:
    """Import torchao now, if it is installed, without its import-time log lines: transformers and peft
    import it (and its prototype formats) whenever it is there, and would print them. Returns whether
    torchao is installed."""
    if importlib.util.find_spec("torchao") is None:
        return False
    _torchao()
    with _quiet(), contextlib.suppress(ImportError):
        import torchao.prototype.mx_formats  # noqa: F401 - what transformers' integration imports
    return True


def _weight_of(obj: torch.Tensor | nn.Module) -> torch.Tensor | None:
    return obj if isinstance(obj, torch.Tensor) else getattr(obj, "weight", None)


def is_quantized(obj: torch.Tensor | nn.Module) -> bool:
    """Whether ``obj`` (a tensor, or a layer's ``weight``) is a 4-bit NF4 tensor. Never imports torchao:
    without it loaded there is none."""
    t = _weight_of(obj)
    return "torchao" in sys.modules and isinstance(t, _torchao().NF4Tensor)


def quantize_weight(
    w: torch.Tensor, block_size: int = BLOCK_SIZE, scaler_block_size: int = SCALER_BLOCK_SIZE
) -> torch.Tensor:
    """The 4-bit NF4 form of a linear weight ``w`` (out, in), on ``w``'s device, logical dtype ``w.dtype``.

    ``w`` is read as a frozen tensor (no gradient flows to it). Raises ``ValueError`` for a tensor that is
    not a 2-D float one, already quantized, or whose blocks do not tile it.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_weight expects a tensor, got {type(w).__name__}")
    if is_quantized(w):
        raise ValueError("the weight is already quantized to NF4")
    if not w.is_floating_point() or w.dim() != 2:
        raise ValueError(
            f"quantize_weight expects a 2-D float weight (out, in), got {w.dtype} {tuple(w.shape)}"
        )
    for name, value in (("block_size", block_size), ("scaler_block_size", scaler_block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if block_size % 2:
        raise ValueError(f"block_size must be even (two 4-bit codes per byte), got {block_size}")
    tile = block_size * scaler_block_size
    if w.numel() % tile:
        raise ValueError(
            f"a weight of shape {tuple(w.shape)} ({w.numel():,} elements) cannot be stored in NF4 with "
            f"block_size={block_size} and scaler_block_size={scaler_block_size}: the element count must be "
            f"a multiple of block_size * scaler_block_size = {tile:,}"
        )
    # contiguous: torchao keeps the input's strides, and a transposed input would read as transposed
    return _torchao().to_nf4(w.detach().contiguous(), block_size, scaler_block_size)


def check_tiles(shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise a one-line ``ValueError`` if any weight (name -> shape) cannot be stored in NF4 with the default
    blocks (its element count not a multiple of ``BLOCK_SIZE * SCALER_BLOCK_SIZE``), before anything is
    quantized: the rule :func:`quantize_weight` applies to one weight, for a whole model or architecture."""
    tile = BLOCK_SIZE * SCALER_BLOCK_SIZE
    odd = [f"{name} {tuple(shape)}" for name, shape in shapes.items() if math.prod(shape) % tile]
    if odd:
        raise ValueError(f"nf4 stores weights in blocks of {tile:,} elements; {odd[0]} ({len(odd)} weight(s) in "
                         "all) does not tile: widths such as d_model 128, 256, 768 do")  # fmt: skip


def dequantize(q: torch.Tensor) -> torch.Tensor:
    """The dense weight ``c[i] * ŝ_b`` of an NF4 tensor ``q`` (same shape, dtype and device); a tensor that
    is not quantized is returned as it is, so callers can pass any frozen weight."""
    if not is_quantized(q):
        return q
    return q.get_original_weight().to(q.dtype)


def quantized_nbytes(q: torch.Tensor) -> int:
    """Bytes that ``q`` holds: for NF4 its codes, int8 absmaxes and factors; else ``numel * element_size``."""
    if not is_quantized(q):
        return q.numel() * q.element_size()
    inner, _ = q.__tensor_flatten__()
    return sum(getattr(q, name).numel() * getattr(q, name).element_size() for name in inner)


def _dense(weights: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``[W_1; W_2; ...]`` dequantized, in ``dtype``: (Σ out_k, in)."""
    dense = [dequantize(w).to(dtype) for w in weights]
    return dense[0] if len(dense) == 1 else torch.cat(dense)


class _QuantizedLinearFunction(torch.autograd.Function):
    """``out = x W^T + b`` for ``x`` (..., in) and a frozen, stacked ``W = [W_1; W_2; ...]`` (N, in).

    Saves the (4-bit) ``W_k`` and dequantizes them again in backward, so no dense copy of ``W`` outlives
    the forward::

        dx = dOut W      db = Σ_rows dOut      (no dW: the base is frozen)
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        *weights: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(*weights)
        return F.linear(x, _dense(weights, x.dtype), bias)  # (..., N)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
        weights = ctx.saved_tensors  # read once: checkpointing lets saved tensors be unpacked only once
        need_x, need_b = ctx.needs_input_grad[:2]
        dx = db = None
        if need_x:
            dx = grad_out @ _dense(weights, grad_out.dtype)  # (..., N) @ (N, in) -> (..., in)
        if need_b:
            db = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (N,)
        return dx, db, *(None for _ in weights)


def quantized_linear(
    x: torch.Tensor, weight: torch.Tensor | Sequence[torch.Tensor], bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``(..., in) -> (..., N)``: ``x W^T + b`` with ``W`` (N, in) dequantized for the product only.

    ``weight`` is one tensor (N, in) or several (out_k, in) whose rows are stacked (``N = Σ out_k``, as the
    fused q/k/v path stacks its frozen weights); each may be NF4 or dense. Gradients flow to ``x`` and
    ``bias``, never to the weights (a weight that requires a gradient is refused). Works under autocast,
    whose dtype the product takes, and under ``torch.compile``.
    """
    weights = (weight,) if isinstance(weight, torch.Tensor) else tuple(weight)
    if not weights:
        raise ValueError("quantized_linear needs at least one weight")
    if any(w.requires_grad for w in weights):
        raise ValueError("quantized_linear gives no gradient to the weight: freeze it (requires_grad False)")
    return _QuantizedLinearFunction.apply(x, bias, *weights)


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(..., in) -> (..., out)``: ``x W^T + b`` for a frozen ``W`` (out, in) in whichever form the base keeps
    it: NF4, or a float dtype other than ``x``'s outside autocast (bfloat16 under float32), through
    :func:`quantized_linear`, which widens it for the product and again in backward, keeping only the narrow
    form for backward (a widened copy saved by autograd would cost more than the float32 weight itself); in
    ``x``'s dtype, or under autocast (whose dtype a bfloat16 weight already has), a plain ``F.linear``."""
    widen = weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type)
    if is_quantized(weight) or widen:
        if widen and bias is not None:
            bias = bias.to(x.dtype)  # (out,): the bias gets no gradient and is not kept for backward
        return quantized_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def narrow_linear_(layer: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Store ``layer.weight`` and ``layer.bias`` in ``dtype`` (bfloat16), in place, as frozen parameters; the
    bfloat16 form of :func:`quantize_linear_`, with the same refusals (a weight that trains, a merged layer).
    Returns ``layer``."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, nn.Parameter) or is_quantized(w):
        raise TypeError(
            f"narrow_linear_ expects a layer with a dense weight parameter, got {type(layer).__name__}"
        )
    bias = getattr(layer, "bias", None)
    _refuse_unless_frozen(layer, [w] if bias is None else [w, bias], "narrowing", f"{dtype}")
    layer.weight = nn.Parameter(w.detach().to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return layer


def quantize_linear_(
    layer: nn.Module, block_size: int = BLOCK_SIZE, scaler_block_size: int = SCALER_BLOCK_SIZE
) -> nn.Module:
    """Store ``layer.weight`` (out, in) in NF4, in place: an ``nn.Parameter`` holding an ``NF4Tensor``
    with ``requires_grad`` false. For ``nn.Linear`` or ``LoRALinear``. Idempotent; returns ``layer``.

    Refused: a weight that trains (``requires_grad``; the 4-bit form gets no gradient) and a merged LoRA
    layer (its weight holds the adapter, which the 4 bits would round away; ``unmerge()`` first). A weight
    shared with another module (a tied embedding) stays dense there: quantize tied weights with care.
    """
    w = getattr(layer, "weight", None)
    if not isinstance(w, nn.Parameter):
        raise TypeError(
            f"quantize_linear_ expects a layer with a weight parameter, got {type(layer).__name__}"
        )
    if is_quantized(w):
        return layer
    _refuse_unless_frozen(layer, [w], "quantizing", "4-bit")
    layer.weight = nn.Parameter(quantize_weight(w, block_size, scaler_block_size), requires_grad=False)
    return layer


def _refuse_unless_frozen(layer: nn.Module, tensors: Sequence[torch.Tensor], doing: str, form: str) -> None:
    """The refusals :func:`quantize_linear_` and :func:`narrow_linear_` share: a merged LoRA layer (its weight
    holds the adapter) and a tensor that trains (the narrow form gets no gradient)."""
    if getattr(layer, "merged", False):
        raise ValueError(f"the layer's adapter is merged into its weight: unmerge() it before {doing}")
    for t in tensors:
        if t.requires_grad:
            raise ValueError(f"the tensor {tuple(t.shape)} requires a gradient, which the {form} form cannot give: "
                             "store only a frozen base (requires_grad_(False), or configure_lora_training() first)")  # fmt: skip


def release_freed_memory() -> None:
    """Hand memory freed by the process back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Quantizing frees the dense weights, but the C allocator keeps most of their pages for later use, so
    the resident set (what a CPU run's peak memory counts) would not shrink: 264 MiB stayed resident after
    quantizing GPT-2 small here, and were returned by this call.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def dequantize_linear_(layer: nn.Module) -> nn.Module:
    """Undo :func:`quantize_linear_`: ``layer.weight`` becomes a dense frozen ``nn.Parameter`` holding the
    dequantized values (the rounding stays). Idempotent; returns ``layer``."""
    if is_quantized(layer):
        layer.weight = nn.Parameter(dequantize(layer.weight), requires_grad=False)
    return layer


def _demo() -> None:
    torch.manual_seed(0)
    print("NF4: w ≈ c[i] * s_b, 16 codes c, one absmax s_b per 64 weights (itself in int8)\n")
    layer = nn.Linear(768, 3072).requires_grad_(False)
    w = layer.weight.detach().clone()
    dense = w.numel() * w.element_size()
    qlayer = quantize_linear_(copy.deepcopy(layer))
    q = qlayer.weight
    print(f"nn.Linear(768, 3072): float32 weight {dense / 2**20:.2f} MiB")
    print(
        f"  NF4 weight {quantized_nbytes(q) / 2**20:.2f} MiB ({8 * quantized_nbytes(q) / w.numel():.2f} bits)"
    )
    err = (dequantize(q) - w).abs()
    print(
        f"  |error| mean {err.mean() / w.abs().mean():.3f} of mean |w|, max {err.max() / w.abs().max():.3f} of max |w|"
    )
    x = torch.randn(4, 768)
    y, y0 = qlayer(x), layer(x)
    print(f"  output rel. error {((y - y0).norm() / y0.norm()).item():.3f}")


if __name__ == "__main__":
    _demo()
