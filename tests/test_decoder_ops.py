"""lora/decoder_ops.py: RMSNorm with its backward written out gives nn.RMSNorm's outputs and gradients (for the
input and for a weight that trains), in float32, float64 and bfloat16, with gradients and without; the rotary
rotation gives Llama's, and its gradient the inverse rotation."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled
from torch import nn

from lora.decoder_ops import RMSNorm, rms_norm, rotate


def reference_and_ours(dtype, weight_trains, shape=(3, 5, 24), eps=1e-5):
    """``(output, dx, dw)`` of ``F.rms_norm`` under autograd and of :func:`rms_norm`, for the same ``x``, ``w``
    and incoming gradient (``dw`` None for a frozen weight)."""
    g = torch.Generator().manual_seed(0)
    x0 = (3 * torch.randn(shape, generator=g) + 0.5).to(dtype)
    w0 = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    results = []
    for fn in (lambda x, w: F.rms_norm(x, (shape[-1],), w, eps), lambda x, w: rms_norm(x, w, eps)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_(weight_trains)
        y = fn(x, w)
        y.backward(grad)
        results.append((y.detach(), x.grad, w.grad))
    return results


@pytest.mark.parametrize("weight_trains", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_and_gradients_equal_autograds(dtype, weight_trains):
    (y0, dx0, dw0), (y1, dx1, dw1) = reference_and_ours(dtype, weight_trains)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert y1.dtype == dx1.dtype == dtype
    assert_close_scaled(y1, y0, tol)
    assert_close_scaled(dx1, dx0, tol)
    assert dx1.abs().max() > 0.1  # a real gradient, not zeros on both sides
    if weight_trains:
        assert dw1.dtype == dtype
        assert_close_scaled(dw1, dw0, tol)
    else:
        assert dw0 is None and dw1 is None


def test_bfloat16_computes_in_float32_and_returns_bfloat16():
    (y0, dx0, dw0), (y1, dx1, dw1) = reference_and_ours(torch.bfloat16, True)
    assert y1.dtype == dx1.dtype == dw1.dtype == torch.bfloat16
    assert_close_scaled(y1.float(), y0.float(), 1e-2)  # one bfloat16 rounding apart at most
    assert_close_scaled(dx1.float(), dx0.float(), 2e-2)
    assert_close_scaled(dw1.float(), dw0.float(), 2e-2)


def test_the_module_has_nn_rmsnorms_state_and_numbers():
    torch.manual_seed(0)
    ours, theirs = RMSNorm(16, eps=1e-6), nn.RMSNorm(16, eps=1e-6)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight"}
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x = torch.randn(2, 7, 16, requires_grad=True)
    y = ours(x)
    assert y.grad_fn is not None and "RMSNorm" in type(y.grad_fn).__name__  # the hand-written backward
    assert_close_scaled(y, theirs(x), 1e-6)
    with torch.no_grad():  # without gradients: the same forward, no autograd node
        assert torch.equal(ours(x), y.detach())
    assert repr(ours) == "RMSNorm(16, eps=1e-06)"


def rotate_half_reference(x, cos, sin):
    """transformers' Llama rotation: ``x cos + rotate_half(x) sin``, ``cos``/``sin`` each half repeated."""
    h = x.shape[-1] // 2
    cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin


@pytest.mark.parametrize("packed", [False, True])
def test_rotate_equals_llamas_rotation_and_its_gradient(packed):
    """On a transposed (B, nh, T, hs) view, as attention passes q and k; ``packed``: each row its own angles."""
    g = torch.Generator().manual_seed(0)
    B, nh, T, hs = 2, 3, 5, 8
    angles = torch.rand((B, 1, T, hs // 2) if packed else (T, hs // 2), generator=g) * 10
    cos, sin = angles.cos(), angles.sin()
    x0 = torch.randn(B, T, nh, hs, generator=g).transpose(1, 2)  # (B, nh, T, hs), not contiguous
    grad = torch.randn(B, nh, T, hs, generator=g)
    results = []
    for fn in (rotate_half_reference, rotate):
        x = x0.clone().requires_grad_()
        y = fn(x, cos, sin)
        y.backward(grad)
        results.append((y.detach(), x.grad))
    (y0, dx0), (y1, dx1) = results
    assert y1.stride() == x0.stride()  # the layout attention was given stays
    assert_close_scaled(y1, y0, 1e-6)
    assert_close_scaled(dx1, dx0, 1e-6)
    # the backward is the inverse rotation: rotating the gradient back by -angle
    assert_close_scaled(dx1, rotate_half_reference(grad, cos, -sin), 1e-6)
    with torch.no_grad():
        assert torch.equal(rotate(x0, cos, sin), y1)


def test_rotate_a_bfloat16_input_in_float32_rounded_once():
    g = torch.Generator().manual_seed(0)
    angles = torch.rand(5, 4, generator=g) * 10
    x = torch.randn(2, 3, 5, 8, generator=g).to(torch.bfloat16)
    y = rotate(x, angles.cos(), angles.sin())
    assert y.dtype == torch.bfloat16
    expected = rotate_half_reference(x.float(), angles.cos(), angles.sin()).to(torch.bfloat16)
    assert torch.equal(y, expected)
