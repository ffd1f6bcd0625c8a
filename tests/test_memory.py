"""lora/memory.py's tensor_peak: a step's peak of tensor memory, from torch's memory profile, checked on
allocations of known size, inside a custom operation too, and on a 4-bit weight's inner tensors."""

import pytest
import torch

from lora.chunked_loss import chunked_lm_loss
from lora.memory import tensor_peak

MiB = 2**20


def test_counts_what_existed_and_was_used_and_the_most_allocated_at_once():
    kept = torch.zeros(MiB // 4)  # 1 MiB, used by the step
    idle = torch.zeros(MiB)  # 4 MiB, not used: not counted  # noqa: F841

    def step():
        a = kept + 1  # 1 MiB
        b = torch.ones(MiB)  # 4 MiB: 5 at once
        del a
        c = b * 2  # 4 MiB: 8 at once, the peak
        del b, c
        return torch.ones(MiB // 2)  # 2 MiB, freed when the caller drops it

    before, peak = tensor_peak(step)
    assert before == MiB
    assert peak == pytest.approx(8 * MiB, abs=64)  # and the Python numbers' 4-byte scalar tensors


def test_sees_the_temporaries_inside_a_custom_operation(monkeypatch):
    """The chunked loss is one custom operation; its logits exist only inside it, one chunk at a time (on a
    CPU in a buffer kept for the next call: made here, as no earlier call's is)."""
    import lora.chunked_loss

    monkeypatch.setattr(lora.chunked_loss._KEPT, "logits", None, raising=False)  # (earlier tests' buffer)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(256, 64, generator=g, requires_grad=True)
    weight = torch.randn(5000, 64, generator=g)
    targets = torch.randint(0, 5000, (256,), generator=g)
    chunk = 64 * 5000 * 4  # bytes of one chunk's float32 logits
    before, peak = tensor_peak(lambda: chunked_lm_loss(hidden, weight, targets, 64).backward())
    assert before == sum(t.numel() * t.element_size() for t in (hidden, weight, targets))
    assert chunk < peak < 1.5 * chunk  # one chunk's logits and the (256, 64) gradient, not four chunks


def test_a_4_bit_weight_counts_its_inner_tensors():
    pytest.importorskip("torchao")
    import torch.nn.functional as F

    from lora.quantize import quantize_weight, quantized_nbytes

    q = quantize_weight(torch.randn(256, 256))
    x = torch.randn(1, 256)
    before, peak = tensor_peak(lambda: F.linear(x, q))
    assert before == quantized_nbytes(q) + x.numel() * 4 < 256 * 256 * 4 / 7
    assert peak >= 256 * 256 * 4  # the product dequantizes the weight


def test_resident_tensors_count_each_storage_once_used_or_not():
    from lora.memory import storage_bytes

    stacked = torch.zeros(3 * MiB // 4)  # 3 MiB, seen through three views
    views = [stacked[i * MiB // 4 : (i + 1) * MiB // 4] for i in range(3)]
    idle = torch.zeros(MiB // 4)  # 1 MiB the step never reads
    assert storage_bytes([*views, stacked, idle]) == 4 * MiB
    before, peak = tensor_peak(lambda: views[0] * 2, resident=[*views, idle])
    assert before == 4 * MiB and peak == pytest.approx(MiB, abs=64)  # the product's 1 MiB
