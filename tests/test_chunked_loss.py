"""lora/chunked_loss.py: the chunked LM loss equals the plain cross-entropy, gradients included, and never
holds all the logits (a memory measurement); the model's ``lm_loss`` on top of it."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled
from torch import nn

from lora import chunked_loss
from lora.chunked_loss import chunked_lm_loss
from lora.lora_transformer import LoRATransformer
from lora.memory import tensor_peak

B, T, C, V = 3, 16, 8, 40  # 48 tokens


def inputs(ignored: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, requires_grad=True)
    weight = torch.randn(V, C, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets.view(-1)[torch.randperm(B * T, generator=g)[:ignored]] = -100
    return hidden, weight, targets


def plain_loss(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float().reshape(-1, V), targets.reshape(-1))


def assert_equals_plain(chunked, hidden, weight, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunked`` is the plain loss of the inputs to float rounding, its gradients for ``hidden`` and
    ``weight`` too; returns those gradients."""
    plain = plain_loss(hidden, weight, targets)
    assert_close_scaled(chunked, plain, 1e-6)
    got = torch.autograd.grad(chunked, (hidden, weight))
    for a, b in zip(got, torch.autograd.grad(plain, (hidden, weight)), strict=True):
        assert_close_scaled(a, b, 1e-6)
    return got


@pytest.mark.parametrize("chunk_tokens", [1, 7, 16, 48, 1000])  # 7 and 1000 do not divide 48
@pytest.mark.parametrize("ignored", [0, 5])
def test_equals_the_plain_loss_and_its_gradients(chunk_tokens, ignored):
    hidden, weight, targets = inputs(ignored)
    got = assert_equals_plain(chunked_lm_loss(hidden, weight, targets, chunk_tokens), hidden, weight, targets)
    if ignored:  # an ignored token's hidden state gets no gradient
        rows = (targets.reshape(-1) == -100).nonzero().squeeze(1)
        assert torch.equal(got[0].reshape(-1, C)[rows], torch.zeros(ignored, C))


def test_all_targets_ignored_gives_nan_and_zero_gradients_as_cross_entropy():
    hidden, weight, targets = inputs()
    targets.fill_(-100)
    plain = plain_loss(hidden, weight, targets)
    chunked = chunked_lm_loss(hidden, weight, targets, 5)
    assert plain.isnan() and chunked.isnan()
    for a, b in zip(
        torch.autograd.grad(chunked, (hidden, weight)),
        torch.autograd.grad(plain, (hidden, weight)),
        strict=True,
    ):
        assert torch.equal(a, b) and not a.any()


def test_gradients_only_where_asked_and_none_without_grad():
    hidden, weight, targets = inputs()
    weight.requires_grad_(False)  # a frozen head (LoRA training)
    loss = chunked_lm_loss(hidden, weight, targets, 10)
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(grad, torch.autograd.grad(plain_loss(hidden, weight, targets), hidden)[0])
    with torch.no_grad():
        value = chunked_lm_loss(hidden, weight, targets, 10)
    assert value.grad_fn is None and value == loss.detach()
    scale = torch.tensor(3.0)  # an upstream gradient other than 1
    (grad3,) = torch.autograd.grad(chunked_lm_loss(hidden, weight, targets, 10) * scale, hidden)
    torch.testing.assert_close(grad3, 3 * grad)


def test_compiled_equals_eager():
    """torch.compile traces the custom op's registered autograd formula (aot_eager: AOTAutograd's trace)."""
    torch._dynamo.reset()
    hidden, weight, targets = inputs()
    fn = torch.compile(lambda h, w, t: chunked_lm_loss(h, w, t, 7), backend="aot_eager", fullgraph=True)
    compiled = fn(hidden, weight, targets)
    plain = plain_loss(hidden, weight, targets)
    assert_close_scaled(compiled, plain, 1e-6)
    for a, b in zip(
        torch.autograd.grad(compiled, (hidden, weight)),
        torch.autograd.grad(plain, (hidden, weight)),
        strict=True,
    ):
        assert_close_scaled(a, b, 1e-6)


def test_autocast_computes_the_logits_in_bfloat16_as_the_plain_head():
    hidden, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = plain_loss(hidden, weight, targets)
        chunked = chunked_lm_loss(hidden, weight, targets, 7)
    assert chunked.dtype == torch.float32
    assert_close_scaled(chunked, plain, 1e-5)  # the same bfloat16 logits, upcast
    got = torch.autograd.grad(chunked, (hidden, weight))
    expected = torch.autograd.grad(plain, (hidden, weight))
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == torch.float32
        assert_close_scaled(a, b, 1e-3, rtol=0.02)  # bfloat16 products in both


@pytest.mark.parametrize("slice_rows", [7, 40, 8192])  # 7 does not divide V = 40
def test_a_frozen_bfloat16_head_is_widened_slice_by_slice_and_equals_its_float32_copy(
    monkeypatch, slice_rows
):
    """A 4-bit base keeps its tied head in bfloat16: the loss and dloss/dh are those of the float32 copy of
    the same values, with no widened copy of the whole head (the slices are SLICE_ROWS rows)."""
    import lora.chunked_loss as chunked

    monkeypatch.setattr(chunked, "SLICE_ROWS", slice_rows)
    hidden, weight, targets = inputs()
    narrow = weight.detach().to(torch.bfloat16)  # frozen
    wide = narrow.float()
    plain = plain_loss(hidden, wide, targets)
    got = chunked_lm_loss(hidden, narrow, targets, 7)
    assert got.dtype == torch.float32
    assert_close_scaled(got, plain, 1e-6)
    (dh,) = torch.autograd.grad(got, hidden)
    (want,) = torch.autograd.grad(plain, hidden)
    assert dh.dtype == torch.float32
    assert_close_scaled(dh, want, 1e-6)
    with pytest.raises(ValueError, match=r"hidden is torch\.float32 but weight is torch\.bfloat16"):
        chunked_lm_loss(hidden, narrow.requires_grad_(True), targets, 7)  # a trained head is not widened


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_tokens": 0}, "chunk_tokens must be a positive integer, got 0"),
        ({"chunk_tokens": True}, "chunk_tokens must be a positive integer, got True"),
        ({"targets": torch.zeros(B, T + 1, dtype=torch.long)}, "do not fit"),
        ({"weight": torch.zeros(V, C + 1)}, "do not fit"),
        (
            {"weight": torch.zeros(V, C, dtype=torch.float64)},
            "hidden is torch.float32 but weight is torch.float64",
        ),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    hidden, weight, targets = inputs()
    args = {"hidden": hidden, "weight": weight, "targets": targets, "chunk_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        chunked_lm_loss(**args)


def test_forward_and_backward_hold_one_chunk_of_logits():
    """4,096 tokens x 2,048 classes: the plain loss holds 3 copies of the 32 MiB logits at its peak; the
    chunked one, 256 tokens at a time, about one 2 MiB chunk plus its gradients."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4096, 16, generator=g, requires_grad=True)
    weight = torch.randn(2048, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 2048, (4096,), generator=g)
    logits = 4096 * 2048 * 4
    _, plain = tensor_peak(lambda: F.cross_entropy(F.linear(hidden, weight), targets).backward())
    _, chunked = tensor_peak(lambda: chunked_lm_loss(hidden, weight, targets, 256).backward())
    assert plain >= 2 * logits
    assert chunked < logits / 8


def test_model_lm_loss_equals_cross_entropy_of_its_logits():
    torch.manual_seed(0)
    model = LoRATransformer(V, 16, 2, 2, max_seq_len=T, dropout=0.0)
    model.configure_lora_training()
    for _, layer in model.lora_layers():
        nn.init.normal_(layer.lora_B, std=0.1)
    idx = torch.randint(0, V, (B, T))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -100
    plain = F.cross_entropy(model(idx).float().reshape(-1, V), targets.reshape(-1))
    expected = torch.autograd.grad(plain, [p for p in model.parameters() if p.requires_grad])
    loss = model.lm_loss(idx, targets, chunk_tokens=10)
    got = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    assert_close_scaled(loss, plain, 1e-6)
    assert len(got) == 2 * 2 * 2
    for a, b in zip(got, expected, strict=True):
        assert b.abs().sum() > 0
        assert_close_scaled(a, b, 1e-6)
    model.requires_grad_(True)  # full fine-tuning: the tied head/embedding gets its gradient through it too
    (g_chunked,) = torch.autograd.grad(model.lm_loss(idx, targets, 7), model.wte.weight)
    (g_plain,) = torch.autograd.grad(
        F.cross_entropy(model(idx).reshape(-1, V), targets.reshape(-1)), model.wte.weight
    )
    assert_close_scaled(g_chunked, g_plain, 1e-6)
    classifier = LoRATransformer(V, 16, 2, 1, max_seq_len=T, num_classes=3)
    with pytest.raises(RuntimeError, match="needs a language model"):
        classifier.lm_loss(idx, targets)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("ignored", [0, 5])
def test_the_softmax_a_block_of_rows_at_a_time_changes_nothing(monkeypatch, rows, ignored):
    """On a CPU the softmax takes a cache-sized block of rows at a time (``SOFTMAX_BYTES``): blocks of 1 and 3
    rows (3 does not divide a chunk of 16) give the plain loss and gradients, ignored rows included."""
    monkeypatch.setattr(chunked_loss, "SOFTMAX_BYTES", rows * V * 4)
    assert chunked_loss._softmax_rows(torch.zeros(16, V)) == rows
    hidden, weight, targets = inputs(ignored)
    assert_equals_plain(chunked_lm_loss(hidden, weight, targets, 16), hidden, weight, targets)


def test_a_cpu_keeps_one_logits_buffer_from_call_to_call(monkeypatch):
    """The float32 logits of a chunk go into one buffer kept between calls (no fresh block, no page faults, each
    step), grown for a larger chunk, usable under inference mode and after it; the results stay exact."""
    monkeypatch.setattr(chunked_loss._KEPT, "logits", None, raising=False)  # (earlier tests' buffer)
    hidden, weight, targets = inputs(5)
    chunked_lm_loss(hidden, weight, targets, 16)
    kept = chunked_loss._KEPT.logits
    assert kept.numel() == 16 * V and not kept.is_inference()
    with torch.inference_mode():  # (an evaluation): the same buffer
        chunked_lm_loss(hidden, weight, targets, 8)
    assert chunked_loss._KEPT.logits is kept
    chunked = chunked_lm_loss(hidden, weight, targets, B * T)  # 48 rows: grown once
    assert chunked_loss._KEPT.logits.numel() == B * T * V
    assert_equals_plain(chunked, hidden, weight, targets)


def test_a_chunk_too_large_to_keep_gets_a_buffer_of_its_own(monkeypatch):
    """Above KEPT_MAX_BYTES of logits (a huge vocabulary) nothing is kept after the call, and the loss is exact."""
    monkeypatch.setattr(chunked_loss._KEPT, "logits", None, raising=False)
    monkeypatch.setattr(chunked_loss, "KEPT_MAX_BYTES", 4 * 8 * V)  # room for 8 rows of logits
    hidden, weight, targets = inputs(5)
    chunked_lm_loss(hidden, weight, targets, 8)
    kept = chunked_loss._KEPT.logits
    assert kept.numel() == 8 * V
    chunked = chunked_lm_loss(hidden, weight, targets, 16)  # 16 rows: over the cap, not kept, not grown
    assert chunked_loss._KEPT.logits is kept and kept.numel() == 8 * V
    assert_equals_plain(chunked, hidden, weight, targets)
