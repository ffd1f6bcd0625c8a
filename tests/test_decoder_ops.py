"""lora/decoder_ops.py: RMSNorm with its backward written out gives nn.RMSNorm's outputs and gradients (for the
input and for a weight that trains), in float32, float64 and bfloat16, with gradients and without."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled
from torch import nn

from lora.decoder_ops import RMSNorm, rms_norm


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
