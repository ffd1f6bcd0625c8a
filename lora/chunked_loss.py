"""The language-model loss with the LM head applied a chunk of tokens at a time.

For hidden states ``h`` (N, C) (``N = B T`` tokens), the head ``W`` (V, C) and targets ``t`` (N,), of which
``n`` are scored (``t_i != -100``)::

    z_i = W h_i  (V,)      loss = (1 / n) Σ_{i scored} (logsumexp_j z_ij - z_{i t_i})
    dloss/dz_i = (softmax(z_i) - onehot(t_i)) / n  for a scored token, 0 for the others
    dloss/dh_i = W^T dloss/dz_i            dloss/dW = Σ_i dloss/dz_i h_i^T

The plain computation holds all of ``z`` (N, V) at once, in float32 a second copy, and in backward the
softmax a third: with GPT-2's V = 50,257, 8 x 1,024 tokens take 1.6 GB per copy. Here ``z`` exists for
``chunk_tokens`` rows at a time: each chunk's logits are made (in the inputs' dtype, then float32), give
their loss, and, when gradients are wanted, turn in place into ``softmax - onehot`` and are multiplied out
into ``dloss/dh`` and ``dloss/dW`` before the next chunk (on a CPU the softmax's passes, max, exp, sum and
scale, each go over a cache-sized block of a chunk's rows before the next block, not over the whole chunk
from memory four times). Backward then only scales those by the incoming
gradient: no logits are computed twice (recomputing them, as checkpointing would, costs one more LM-head
product per step). The sum is a :func:`torch.library.custom_op` whose autograd formula is registered, so
``torch.compile`` sees a differentiable operation. The price: from forward to backward the gradients are
kept, ``dloss/dh`` the size of ``h`` and, for a head that trains, ``dloss/dW`` (V, C) in float32; and a loss
computed with gradients enabled but never back-propagated did that work for nothing (under ``no_grad`` none
is done).

A frozen head stored in lower precision than ``h`` (a 4-bit base keeps its tied embedding in bfloat16, as
QLoRA does) is used in ``h``'s precision: ``W`` is widened ``SLICE_ROWS`` rows at a time, for ``z`` and for
``dloss/dh = Σ_v dloss/dz_:v W_v`` alike, so that no widened copy of the whole (V, C) head exists (12 MiB
at a time for GPT-2's, where the whole would take 147 MiB).

All targets ignored: ``n = 0`` and the loss is ``nan`` (``0 / 0``), as ``F.cross_entropy``'s mean; the
gradients are zero, as ``F.cross_entropy``'s.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

__all__ = ["chunked_lm_loss"]

IGNORE_INDEX = -100  # cross-entropy's default: targets that take no loss
SLICE_ROWS = 4096  # rows of a lower-precision head widened at once (GPT-2: 4,096 x 768 float32, 12 MiB)
SOFTMAX_BYTES = 1 << 20  # on a CPU, the logits' softmax a cache-sized block of rows at a time (1 MiB: 5 rows)


def _softmax_rows(z: torch.Tensor) -> int:
    """Rows of ``z`` (c, V) that the softmax takes at once: on a CPU as many as fit in ``SOFTMAX_BYTES`` (each
    of its passes then reads them from cache, not memory: 5 rows of 49,152 float32 logits, 2.3 times faster
    than whole-chunk passes on a 2-core Xeon), elsewhere all of them (one kernel each, not one per block)."""
    if z.device.type != "cpu":
        return max(z.shape[0], 1)
    return max(SOFTMAX_BYTES // (z.shape[1] * z.element_size()), 1)


def _logits(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``h W^T`` (c, V) in ``h``'s dtype, into ``out`` where it is given (a head of ``h``'s dtype only). A
    ``weight`` (V, C) of another dtype is widened a slice at a time, each slice's product written straight
    into its rows of ``z^T`` (V, c): ``z`` is then a transposed view, and no (c, slice) temporary is made."""
    if weight.dtype == h.dtype:
        return F.linear(h, weight) if out is None else torch.mm(h, weight.t(), out=out)
    zt = h.new_empty(weight.shape[0], h.shape[0])  # (V, c)
    for v in range(0, weight.shape[0], SLICE_ROWS):
        torch.mm(weight[v : v + SLICE_ROWS].to(h.dtype), h.t(), out=zt[v : v + SLICE_ROWS])
    return zt.t()


_KEPT = threading.local()  # the CPU's logits buffer, kept between calls (per thread)
KEPT_MAX_BYTES = 256 * 2**20  # a larger chunk's logits are allocated for the call, not kept


def _float_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``h W^T`` (c, V) in float32. On a CPU, with ``h`` and the head in float32, written into one buffer kept
    from call to call (grown when a chunk needs more): the C allocator gives a block this large back to the
    system when it is freed, and a new one costs a page fault per 4 KiB at first touch (SmolLM2's 512 x
    49,152 logits: 24,576 faults, about 50 ms of kernel time a step). The buffer never leaves this module:
    each chunk is done with it before the next one starts. Chunks above ``KEPT_MAX_BYTES`` of logits (at
    1,024 tokens a chunk, a vocabulary above 65,536: Llama 3's, Qwen's, Gemma's) get a buffer of their own,
    freed after the call, so that no process keeps hundreds of MiB it no longer needs."""
    n = h.shape[0] * weight.shape[0]
    cpu32 = h.device.type == "cpu" and h.dtype == weight.dtype == torch.float32
    if not cpu32 or 4 * n > KEPT_MAX_BYTES:
        return _logits(h, weight).float()
    kept = getattr(_KEPT, "logits", None)
    if kept is None or kept.numel() < n:
        _KEPT.logits = None  # the old buffer freed before the new one is made
        with torch.inference_mode(False):  # a normal tensor, writable in and out of inference mode
            _KEPT.logits = torch.empty(n, dtype=torch.float32)
    return _logits(h, weight, out=_KEPT.logits[:n].view(h.shape[0], weight.shape[0]))


def _times_weight(g: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """``out = g W`` for ``g`` (c, V), ``weight`` (V, C): in ``g``'s dtype, as :func:`_logits`."""
    if weight.dtype == g.dtype:
        torch.mm(g, weight, out=out)
        return
    out.zero_()
    for v in range(0, weight.shape[0], SLICE_ROWS):
        out.addmm_(g[:, v : v + SLICE_ROWS], weight[v : v + SLICE_ROWS].to(g.dtype))


def _chunk(
    h: torch.Tensor,
    weight: torch.Tensor,
    t: torch.Tensor,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
) -> torch.Tensor:
    """The summed loss of one chunk, ``h`` (c, C) and ``t`` (c,); writes its ``dloss/dh`` into ``grad_h``
    (c, C) and adds its ``dloss/dW`` to ``grad_w`` (V, C) where they are given (sums, not means)."""
    z = _float_logits(h, weight)  # (c, V); from here on one (c, V) buffer, changed in place
    scored = t != IGNORE_INDEX  # (c,)
    t = torch.where(scored, t, 0)[:, None]  # (c, 1); an ignored token reads column 0, then counts 0
    picked = z.gather(1, t).squeeze(1)  # (c,) the target's logit
    grads = grad_h is not None or grad_w is not None
    kept = scored[:, None].to(z.dtype)  # (c, 1): 1 for a scored row, 0 for an ignored one
    top, norm = z.new_empty(z.shape[0], 1), z.new_empty(z.shape[0], 1)  # (c, 1)
    rows = _softmax_rows(z)
    for i in range(0, z.shape[0], rows):  # each pass over these rows while they are in cache
        zi, top_i, norm_i = z[i : i + rows], top[i : i + rows], norm[i : i + rows]
        torch.amax(zi, dim=-1, keepdim=True, out=top_i)
        torch.sum(zi.sub_(top_i).exp_(), dim=-1, keepdim=True, out=norm_i)  # exp(z - max), its sum
        if grads:
            zi.mul_(kept[i : i + rows] / norm_i)  # softmax; an ignored row 0
    loss = torch.where(scored, (top + norm.log()).squeeze(1) - picked, 0.0).sum()  # Σ logsumexp - z_t
    if not grads:
        return loss
    g = z.scatter_add_(1, t, -kept)  # softmax - onehot(t) on the scored rows
    g = g.to(h.dtype)
    if grad_h is not None:
        _times_weight(g, weight, grad_h)  # (c, V) @ (V, C)
    if grad_w is not None and g.dtype == grad_w.dtype:
        grad_w.addmm_(g.t(), h)  # (V, c) @ (c, C)
    elif grad_w is not None:
        grad_w += g.t() @ h  # a lower-precision product, summed in float32
    return loss


# the schema spelled out: torch 2.4 cannot read it from this module's (postponed) annotations
@torch.library.custom_op("lora::lm_loss_chunked", mutates_args=(), schema=(
    "(Tensor hidden, Tensor weight, Tensor targets, SymInt chunk_tokens, bool need_hidden, bool need_weight) "
    "-> (Tensor, Tensor, Tensor)"))  # fmt: skip
def _lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean loss, Σ dloss_i/dh (N, C) or (0,), Σ dloss_i/dW (V, C) float32 or (0,))``, the sums unscaled
    by ``1 / n``; ``hidden`` (N, C), ``weight`` (V, C) of its dtype (or, frozen, a lower one), ``targets`` (N,)."""
    # the chunks' sums added in float64, as cross-entropy adds its tokens (MPS has no float64)
    total = hidden.new_zeros((), dtype=torch.float32 if hidden.device.type == "mps" else torch.float64)
    grad_h = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_weight else weight.new_empty(0)
    with torch.autocast(hidden.device.type, enabled=False):  # the caller chose the dtype
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            gh = grad_h[rows] if need_hidden else None
            total += _chunk(hidden[rows], weight, targets[rows], gh, grad_w if need_weight else None)
    return (total / (targets != IGNORE_INDEX).sum()).float(), grad_h, grad_w


@_lm_loss.register_fake
def _(hidden, weight, targets, chunk_tokens, need_hidden, need_weight):
    grad_h = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_w = torch.empty_like(weight, dtype=torch.float32) if need_weight else weight.new_empty(0)
    return hidden.new_empty((), dtype=torch.float32), grad_h, grad_w


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, targets, _, need_hidden, need_weight = inputs
    ctx.save_for_backward(targets, output[1], output[2])
    ctx.need = (need_hidden, need_weight)
    ctx.dtypes = (hidden.dtype, weight.dtype)


def _backward(ctx, grad_loss, _grad_h, _grad_w):
    targets, grad_h, grad_w = ctx.saved_tensors
    n = (targets != IGNORE_INDEX).sum()
    scale = torch.where(n > 0, grad_loss / n, 0.0)  # no scored token: zero gradients, not 0 * inf
    dh = (grad_h * scale).to(ctx.dtypes[0]) if ctx.need[0] else None
    dw = (grad_w * scale).to(ctx.dtypes[1]) if ctx.need[1] else None
    return dh, dw, None, None, None, None


_lm_loss.register_autograd(_backward, setup_context=_setup_context)


def chunked_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 1024
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight^T`` (B, T, C) x (V, C) against ``targets`` (B, T), ``-100`` not
    scored: equal to ``F.cross_entropy(F.linear(hidden, weight).float().reshape(-1, V), targets.reshape(-1))``
    to float rounding, gradients for ``hidden`` and ``weight`` included, with at most ``chunk_tokens`` rows of
    logits in memory at once. Under autocast the product is in autocast's dtype, as ``F.linear`` would be;
    a frozen ``weight`` narrower than ``hidden`` (bfloat16 under float32) is used in ``hidden``'s dtype.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and targets {tuple(targets.shape)} "
            "do not fit: expected (..., C), (V, C) and (...)"
        )
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)  # (its cast's backward restores the dtype)
    elif hidden.dtype != weight.dtype and (
        weight.requires_grad
        or weight.dtype.itemsize >= hidden.dtype.itemsize
        or not weight.is_floating_point()
    ):  # only a frozen head stored narrower than hidden is widened (slice by slice)
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    grad = torch.is_grad_enabled()
    loss, _, _ = _lm_loss(
        hidden.reshape(-1, hidden.shape[-1]),  # (N, C)
        weight,
        targets.reshape(-1),  # (N,)
        chunk_tokens,
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
    )
    return loss
