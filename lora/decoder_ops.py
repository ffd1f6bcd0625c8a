"""The decoder's token-wise operations with their backward written out: RMSNorm and the rotary rotation.

Autograd differentiates a composite operation by the pieces it was made of: ``torch.nn.functional.rms_norm``
on the CPU is a square, a mean, a reciprocal square root and two products forward (torch's "fused" kernel
is that composite there), and its backward is its decomposition's, each piece a pass over the activations
and a temporary of their size. Here the forward takes the row norms in one reduction
(``torch.linalg.vector_norm``) and the backward is the derivative itself, in as few passes as it needs.

RMSNorm over the last dimension, ``x`` (..., C), ``w`` (C,)::

    r = (||x||^2 / C + eps)^(-1/2)   (..., 1)         y = w * x r   (..., C)
    dx = r (g w) - (r^3 / C) ((g w) . x) x             dw = Σ_rows g * x r

(``d r / d x_j = -r^3 x_j / C``). The computation is in float32 for a narrower ``x`` and the result in
``x``'s dtype, as ``torch.nn.functional.rms_norm``'s, whose results it gives to float rounding.

The rotary rotation of a head ``x = [a, b]`` (two halves of ``hs / 2``) by angles with ``cos`` ``c`` and
``sin`` ``s`` (each ``hs / 2``) is ``x cos + rotate_half(x) sin`` in Llama's layout, that is::

    y = [a c - b s,  b c + a s]          dx = [g_a c + g_b s,  g_b c - g_a s]

(the rotation by the opposite angles), written half by half into one output: no rotated copy, no
concatenation, and only ``c``, ``s`` kept for backward.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm", "rms_norm", "rotate"]


def _computation_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-width floats, else ``x``'s own (float32, float64)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y (..., C) in x's dtype, r (..., 1) in the computation's dtype)``."""
    dtype = _computation_dtype(x)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype)  # (..., 1) ||x||
    r = norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()  # (..., 1)
    y = (x.to(dtype) * r).mul_(weight.to(dtype))  # (..., C)
    return y.to(x.dtype), r


class _RMSNormFunction(torch.autograd.Function):
    """``y = w * x r`` forward (saving ``x`` and ``r``), the module docstring's ``dx`` and ``dw`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, r = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, r = ctx.saved_tensors
        dtype = r.dtype
        xf, g = x.to(dtype), grad.to(dtype)
        dx = dw = None
        if ctx.needs_input_grad[1]:  # Σ over every row of g * x r
            dw = (g * xf).mul_(r).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gw = g * weight.to(dtype)  # (..., C)
            coef = (gw * xf).sum(-1, keepdim=True).mul_(r.pow(3)).div_(-x.shape[-1])  # (..., 1)
            dx = gw.mul_(r).addcmul_(xf, coef).to(x.dtype)  # r g w - (r^3 / C) (g w . x) x
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` (..., C) over its last dimension, scaled by ``weight`` (C,): ``(..., C)`` in ``x``'s
    dtype, with the backward of the module docstring (without gradients, the same forward alone)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNormFunction.apply(x, weight, eps)
    return _rms_norm_forward(x, weight, eps)[0]


class RMSNorm(nn.Module):
    """``nn.RMSNorm`` (a ``weight`` (C,) starting at 1, ``eps``) computed by :func:`rms_norm`: the same state
    dict and, to float rounding, the same numbers, in fewer passes."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., C) -> (..., C)``."""
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _rotate_into(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, sign: float
) -> None:
    """``out = [a c - sign b s, b c + sign a s]`` for ``x = [a, b]``: the rotation (``sign`` 1) or its inverse."""
    h = x.shape[-1] // 2
    a, b, out_a, out_b = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(a, cos, out=out_a).addcmul_(b, sin, value=-sign)
    torch.mul(b, cos, out=out_b).addcmul_(a, sin, value=sign)


class _RotaryFunction(torch.autograd.Function):
    """The module docstring's rotation forward and its inverse backward; ``cos`` and ``sin`` get no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        out = torch.empty_like(x)  # (x's strides: a transposed (B, nh, T, hs) view stays so)
        _rotate_into(x, cos, sin, out, 1.0)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        dx = torch.empty_like(grad)
        _rotate_into(grad, cos, sin, dx, -1.0)
        return dx, None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` (B, nh, T, hs) rotated by the angles whose ``cos`` and ``sin`` are ``(T, hs / 2)`` (or
    broadcastable to ``(B, nh, T, hs / 2)``): ``x cos + rotate_half(x) sin`` of Llama's layout, ``(B, nh, T,
    hs)`` in ``x``'s dtype. A float32 ``x`` takes the module docstring's form; another dtype (bfloat16 under
    autocast) is rotated in float32 and rounded once, as autograd's plain operations."""
    if x.dtype == cos.dtype == sin.dtype:
        if torch.is_grad_enabled() and x.requires_grad:
            return _RotaryFunction.apply(x, cos, sin)
        out = torch.empty_like(x)
        _rotate_into(x, cos, sin, out, 1.0)
        return out
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)
