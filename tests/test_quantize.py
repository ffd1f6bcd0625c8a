"""lora/quantize.py: the NF4 round trip has the data type's error (exact on its own code values, the
reference quantizer's on normal weights), the quantized linear has the dense one's gradients (eager and
compiled), and a layer's weight swaps to 4 bits and back, surviving state dicts, copies and moves."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled, magnitude
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora.lora_layer import LoRALinear
from lora.quantize import (
    dequantize,
    dequantize_linear_,
    is_quantized,
    quantize_linear_,
    quantize_weight,
    quantized_linear,
    quantized_nbytes,
)

pytest.importorskip("torchao")  # an optional dependency (lora.quantize imports it when first needed)

# The 16 NF4 code values as published with QLoRA (bitsandbytes' table); torchao stores them to 4 decimals.
NF4_CODES = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=torch.float64,
)  # fmt: skip
TABLE_ROUNDING = 5e-5  # torchao's codes are the published ones to 4 decimals
HALF_MAX_GAP = float((NF4_CODES[1] - NF4_CODES[0]) / 2)  # 0.152: the widest gap is next to -1


def block_absmax(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    return w.reshape(-1, block).abs().amax(dim=1)  # (n_blocks,)


def reference_nf4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent NF4 with exact absmaxes: nearest published code times the block's absmax; and the codes."""
    w64 = w.double().reshape(-1, 64)  # (n_blocks, 64)
    s = w64.abs().amax(dim=1, keepdim=True)
    idx = (w64 / s).unsqueeze(-1).sub(NF4_CODES).abs().argmin(dim=-1)  # (n_blocks, 64)
    return (NF4_CODES[idx] * s).reshape(w.shape), idx.reshape(w.shape)


def test_codes_times_representable_absmaxes_round_trip_exactly():
    # 256 blocks = one run of the double quantization. Absmaxes s_b = 1 + d_b / 256 with integers d_b in
    # [-128, 127] summing to 0: their mean is 1 and every s_b - 1 is d_b steps of (max |s_b - 1|) / 128,
    # so the int8 absmaxes hold them exactly. Each block holds every code 4 times, shuffled.
    g = torch.Generator().manual_seed(0)
    d = torch.cat([torch.arange(-128, -1), torch.arange(0, 128), torch.tensor([127])])  # sum 0, min -128
    assert d.numel() == 256 and d.sum() == 0
    s = (1 + d[torch.randperm(256, generator=g)] / 256).double()  # (256,) exact in float32
    idx = torch.stack([torch.randperm(64, generator=g) % 16 for _ in range(256)])  # (256, 64)
    w = (NF4_CODES[idx] * s[:, None]).float().reshape(64, 256)

    deq = dequantize(quantize_weight(w)).double().reshape(256, 64)
    assert torch.equal(block_absmax(w).double(), s.float().double())
    # codes -1, 0, 1 are exact in the table: their elements come back bit for bit (so do the absmaxes)
    exact = (idx == 0) | (idx == 7) | (idx == 15)
    assert torch.equal(deq[exact], w.double().reshape(256, 64)[exact])
    # every element comes back as its own code, to the table's 4 decimals
    assert ((deq / s[:, None] - NF4_CODES[idx]).abs().max()) <= TABLE_ROUNDING + 1e-7


def test_normal_weights_have_the_reference_quantizers_error():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))  # 4096 blocks, 16 runs of 256
    deq = dequantize(quantize_weight(w))
    ref, _ = reference_nf4(w)
    err, ref_err = (deq.double() - w.double()).abs(), (ref - w.double()).abs()

    s = block_absmax(w).double()  # (4096,)
    spread = (s - s.mean()).reshape(16, 256).abs().amax(dim=1)  # A per run of the double quantization
    scale_err = spread.repeat_interleave(256) / 128  # |s_b - ŝ_b| <= A / 128 (A / 256 but the clamped top)

    def per_block(t: torch.Tensor) -> torch.Tensor:  # (4096,) -> each block's value at its 64 elements
        return t.reshape(-1, 1).expand(-1, 64).reshape(w.shape)

    # the data type's bound: half the widest code gap times the absmax, plus the absmax's own error
    rounding = 1e-6 * magnitude(w)  # float32's, of the largest weight
    assert (err <= per_block((HALF_MAX_GAP + TABLE_ROUNDING) * s + scale_err) + rounding).all()
    # the same codes as the reference, but where a value sits within the table's rounding of a midpoint
    assert (
        (deq.double() - ref).abs() > per_block(scale_err + TABLE_ROUNDING * s) + rounding
    ).float().mean() < 1e-3
    # mean and max errors agree with the reference's (the scales' int8 rounding adds little)
    assert abs(err.mean() / ref_err.mean() - 1) < 0.01
    assert abs(err.max() / ref_err.max() - 1) < 0.05
    assert 0.070 < err.mean() < 0.076  # NF4 on N(0, 1) in blocks of 64: about 0.073, 9 % of E|w| = 0.80


def test_quantized_linear_gradients_equal_the_dense_ones():
    g = torch.Generator().manual_seed(1)
    q = quantize_weight(torch.randn(128, 256, generator=g))
    dense = dequantize(q)
    x = torch.randn(3, 5, 256, generator=g)
    b = torch.randn(128, generator=g)
    grad_out = torch.randn(3, 5, 128, generator=g)
    results = []
    for weight in (q, dense):
        xi, bi = x.clone().requires_grad_(), b.clone().requires_grad_()
        y = quantized_linear(xi, weight, bi) if weight is q else F.linear(xi, weight, bi)
        y.backward(grad_out)
        results.append((y, xi.grad, bi.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not q.requires_grad and q.grad is None
    with pytest.raises(ValueError, match="freeze it"):
        quantized_linear(x, dense.clone().requires_grad_())
    with pytest.raises(ValueError, match="at least one weight"):
        quantized_linear(x, [])


def test_quantized_linear_under_gradient_checkpointing():
    g = torch.Generator().manual_seed(6)
    q, b = quantize_weight(torch.randn(64, 256, generator=g)), torch.randn(64, generator=g)
    x = torch.randn(5, 256, generator=g, requires_grad=True)
    grads = []
    for fn in (quantized_linear, lambda *a: checkpoint(quantized_linear, *a, use_reentrant=False)):
        (dx,) = torch.autograd.grad(fn(x, q, b).square().sum(), x)
        grads.append(dx)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_stacked_weights_equal_their_concatenation():
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(n, 128, generator=g) for n in (128, 256, 128)]
    qs = [quantize_weight(w) for w in ws]
    x = torch.randn(7, 128, generator=g, requires_grad=True)
    y = quantized_linear(x, qs)  # (7, 512)
    want = F.linear(x, torch.cat([dequantize(q) for q in qs]))
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    (want_dx,) = torch.autograd.grad(want.square().sum(), x)
    assert_close_scaled(dx, want_dx, 1e-5)


def test_compiled_quantized_lora_layer_equals_eager():
    torch.manual_seed(3)
    layer = quantize_linear_(LoRALinear(256, 128, r=4))
    nn.init.normal_(layer.lora_B)

    def forward(x: torch.Tensor) -> torch.Tensor:  # the base in 4 bits, the adapter in float32
        base = quantized_linear(x, layer.weight, layer.bias)
        return base + F.linear(F.linear(x, layer.lora_A) * layer.scaling, layer.lora_B)

    x = torch.randn(4, 16, 256)
    grads = []
    for fn in (forward, torch.compile(forward, fullgraph=True)):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.square().mean().backward()
        grads.append((y.detach(), xi.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
        layer.zero_grad(set_to_none=True)
    for got, want in zip(*grads, strict=True):
        assert_close_scaled(got, want, 1e-5, rtol=1e-5)


def test_a_layers_weight_swaps_to_nf4_and_back():
    torch.manual_seed(4)
    layer = LoRALinear(256, 128, r=4)
    w = layer.weight.detach().clone()
    assert not is_quantized(layer) and not is_quantized(w)
    assert quantize_linear_(layer) is layer
    q = layer.weight
    assert is_quantized(layer) and is_quantized(q) and isinstance(q, nn.Parameter) and not q.requires_grad
    assert quantize_linear_(layer).weight is q  # idempotent
    torch.testing.assert_close(dequantize(q), dequantize(quantize_weight(w)), rtol=0, atol=0)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    # 4.13 bits a weight: the codes, an int8 absmax per 64, a factor per 16,384, the mean and the table
    n = w.numel()
    assert quantized_nbytes(q) == n // 2 + n // 64 + 4 * (n // 16384) + 4 + 16 * 4
    assert quantized_nbytes(w) == 4 * n
    # a plain nn.Linear runs on it as it is (torchao routes F.linear), with the same output
    x = torch.randn(2, 256)
    linear = nn.Linear(256, 128).requires_grad_(False)
    linear.weight, linear.bias = layer.weight, layer.bias
    torch.testing.assert_close(linear(x), quantized_linear(x, q, layer.bias), rtol=0, atol=0)

    deq = dequantize(q)
    assert dequantize_linear_(layer) is layer and not is_quantized(layer)
    assert isinstance(layer.weight, nn.Parameter) and not layer.weight.requires_grad
    assert torch.equal(layer.weight, deq)  # the rounding stays
    assert dequantize_linear_(layer).weight is layer.weight  # idempotent
    assert dequantize(w) is w  # a dense tensor passes through


def test_state_dict_copies_and_moves_keep_the_4_bit_weight():
    torch.manual_seed(5)
    layer = quantize_linear_(LoRALinear(256, 64, r=4))
    deq = dequantize(layer.weight)

    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert is_quantized(state["weight"])
    other = quantize_linear_(LoRALinear(256, 64, r=4))
    other.load_state_dict(state)
    assert is_quantized(other) and torch.equal(dequantize(other.weight), deq)

    dense = torch.randn(64, 256)  # a dense tensor loaded into a 4-bit weight is quantized
    other.load_state_dict({**state, "weight": dense})
    assert is_quantized(other) and torch.equal(dequantize(other.weight), dequantize(quantize_weight(dense)))

    twin = copy.deepcopy(layer)
    assert is_quantized(twin) and torch.equal(dequantize(twin.weight), deq) and not twin.weight.requires_grad
    assert twin.weight.quantized_data.data_ptr() != layer.weight.quantized_data.data_ptr()

    assert is_quantized(layer.to("cpu"))
    wide = copy.deepcopy(layer).to(torch.float64)  # the logical dtype changes, the 4 bits stay
    assert is_quantized(wide) and wide.weight.dtype == torch.float64
    torch.testing.assert_close(dequantize(wide.weight), deq.double(), rtol=1e-6, atol=0)


def test_bad_arguments_are_refused_with_what_was_expected():
    with pytest.raises(ValueError, match="requires a gradient"):
        quantize_linear_(nn.Linear(256, 64))
    merged = LoRALinear(256, 64, r=4)
    merged.merge()
    with pytest.raises(ValueError, match="unmerge"):
        quantize_linear_(merged)
    with pytest.raises(ValueError, match=r"\(100, 100\) \(10,000 elements\).*multiple of.*16,384"):
        quantize_linear_(LoRALinear(100, 100, r=0))
    with pytest.raises(TypeError, match="weight parameter"):
        quantize_linear_(nn.ReLU())
    with pytest.raises(ValueError, match="2-D float weight"):
        quantize_weight(torch.ones(64, 256, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D float weight"):
        quantize_weight(torch.ones(16384))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_weight(quantize_weight(torch.randn(64, 256)))
    with pytest.raises(ValueError, match="block_size must be even"):
        quantize_weight(torch.randn(63, 256), block_size=63, scaler_block_size=4)
    with pytest.raises(ValueError, match="scaler_block_size must be a positive integer"):
        quantize_weight(torch.randn(64, 256), scaler_block_size=0)
    with pytest.raises(TypeError, match="expects a tensor"):
        quantize_weight([[1.0, 2.0]])
