"""LoRA for one linear layer, and helpers that work on any ``nn.Module``.

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes a pretrained weight ``W0`` (out, in) and learns a
low-rank update::

    h = W0 x + b + scaling * B A x,    A: (r, in),  B: (out, r),  scaling = alpha / r

(``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023). ``A`` starts Kaiming-uniform and ``B`` at zero,
so an untrained adapter leaves the layer's output exactly as it was. The variants (:data:`LORA_INITS`):

* ``gaussian``: ``A ~ N(0, 1/r^2)`` (standard deviation ``1/r``, as PEFT's ``"gaussian"``), ``B = 0``.
* ``pissa`` (Meng et al. 2024): ``W0 = U S V^T``; ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T`` from the
  top-r singular triplets, and the base becomes the residual ``W0 - s B0 A0`` (``B0, A0``: the initial factors).
* ``olora`` (Büyükakyüz 2024): ``W0 = Q R``; ``B = Q_{:, :r}``, ``A = R_{:r}``, the base again ``W0 - s B0 A0``.

The residual is not stored: the frozen ``B0``, ``A0`` (``lora_B0``, ``lora_A0``) ride along as a rank-r
correction, ``h = W0 x + b + s (B A - B0 A0) x``, so the base tensor stays bit-for-bit the pretrained one
(its fingerprint, other adapters and a quantized copy are unaffected) and at the start ``h = W0 x + b``.

DoRA (Liu et al. 2024, ``use_dora``) splits each output row of ``W = W0 + s B A`` into a magnitude and a
direction: ``h = (m / ||W||_row) * (W x) + b`` with a trainable ``m`` (out,) that starts at ``||W0||_row``
(so the output starts unchanged) and the norms detached from the gradient, as the paper and PEFT do.

A frozen ``weight`` may be stored in 4-bit NF4 (QLoRA, ``lora/quantize.py``), whose product dequantizes it
on the fly, or in bfloat16 beside a float32 adapter (nothing cast per step under bf16 autocast); merging
into either is refused (the merged update would be rounded to the narrower form and unmerging could not
give ``W0`` back).

Run ``python lora/lora_layer.py`` for a short demonstration.
"""

from __future__ import annotations

import contextvars
import fnmatch
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora.quantize import dequantize, frozen_linear, is_quantized

__all__ = [
    "BASE_DERIVED_INITS",
    "LORA_INITS",
    "LORA_LEAVES",
    "NARROW_BASES",
    "QUANTIZED_MERGE",
    "TRAINED_LEAVES",
    "LinearWithLoRA",
    "LoRALinear",
    "base_init_deferred",
    "deferred_base_init",
    "disable_adapter",
    "fixed_dora_norms",
    "inject_lora",
    "lora_modules",
    "lora_scaling",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "unmerge_lora",
    "validate_lora_args",
    "validate_lora_init",
    "whole_update",
]

# how A and B start (the module docstring): kaiming is the reference code's, the default
LORA_INITS = ("kaiming", "gaussian", "pissa", "olora")
BASE_DERIVED_INITS = ("pissa", "olora")  # A, B taken from W0, whose residual the adapter trains on
# how a frozen base may be stored narrower than its adapter (LoRATransformer.quantize_base), in words
NARROW_BASES = {"nf4": "4-bit (nf4)", "bf16": "bfloat16 (bf16)"}
# why such a base is never merged into (its weights would be rounded again): format with kind=NARROW_BASES[k]
QUANTIZED_MERGE = ("cannot merge into a {kind} base: its weights would be rounded to it again and differ from "
                   "what was trained; merge into the full-precision base instead (load the base without "
                   "--quantize_base, as merge_adapter.py does)")  # fmt: skip
# the LoRA tensors of a layer: trained (A, B and DoRA's magnitude) and the frozen initial factors
LORA_LEAVES = ("lora_A", "lora_B", "lora_magnitude", "lora_A0", "lora_B0")
TRAINED_LEAVES = ("lora_A", "lora_B", "lora_magnitude")


def validate_lora_args(r: int, lora_alpha: float, lora_dropout: float) -> None:
    """The one rule for LoRA arguments: ``r >= 0`` (0: no adapter), ``alpha > 0``, dropout in [0, 1).

    Raises ``ValueError`` naming the bad value.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"lora_r must be an integer >= 0, got {r!r}")
    if (
        isinstance(lora_alpha, bool)
        or not isinstance(lora_alpha, (int, float))
        or not 0 < lora_alpha < math.inf
    ):
        raise ValueError(f"lora_alpha must be > 0 and finite, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)):
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


def validate_lora_init(init: str) -> None:
    """``init`` must be one of :data:`LORA_INITS`; raises ``ValueError`` naming them."""
    if init not in LORA_INITS:
        raise ValueError(f"lora_init must be one of {', '.join(LORA_INITS)}, got {init!r}")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """The one scaling rule: ``alpha / r`` (Hu et al.), or ``alpha / sqrt(r)`` with rsLoRA; 0 for ``r == 0``."""
    if r == 0:
        return 0.0
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else r)


class _LoRALinearFunction(torch.autograd.Function):
    """``out = x W0^T + b + s (x A^T) B^T`` for ``x: (M, in)``, with a backward written for speed.

    Autograd's generic backward would form ``dA`` as ``x^T (dh)``, an (in, M) @ (M, r) product that CPU
    BLAS runs several times slower than the same FLOPs as ``(dh)^T x`` (r, M) @ (M, in), and would add the
    two input gradients in a separate pass. Here, with ``dh = s dOut B`` (M, r)::

        dx = dOut W0 + dh A      (accumulated in place)     dA = dh^T x      dB = s (h^T dOut)^T

    and ``dW0``, ``db`` only when asked for (the base is normally frozen).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        out = F.linear(x, weight, bias)  # (M, out)
        h = x @ lora_a.t()  # (M, r)
        out.addmm_(h, lora_b.t(), alpha=scaling)  # (M, out) += s h B^T, no (out, in) matrix
        ctx.save_for_backward(x, weight, lora_a, lora_b, h)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
        x, weight, lora_a, lora_b, h = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        grad_h = (grad_out @ lora_b).mul_(ctx.scaling)  # (M, r)
        dx = dw = db = da = dbb = None
        if need_x:
            dx = (grad_out @ weight).addmm_(grad_h, lora_a)  # (M, in)
        if need_w:
            dw = grad_out.t() @ x  # (out, in)
        if need_b:
            db = grad_out.sum(0)  # (out,)
        if need_a:
            da = grad_h.t() @ x  # (r, M) @ (M, in) -> (r, in)
        if need_bb:
            dbb = (h.t() @ grad_out).mul_(ctx.scaling).t().contiguous()  # ((r, M) @ (M, out))^T -> (out, r)
        return dx, dw, db, da, dbb, None


# set within deferred_base_init(): new layers leave their base-derived start to a later init_from_base()
_DEFERRED = contextvars.ContextVar("lora_deferred_base_init", default=False)


@contextmanager
def deferred_base_init() -> Iterator[None]:
    """Within the block, layers made with the LoRA leave what starts from ``W0`` (PiSSA's and OLoRA's SVD /
    QR factors, DoRA's magnitudes) to a later :meth:`LoRALinear.init_from_base`: for a model that puts its
    base weights in place after making its layers (its own initialisation, or a loaded file), so that the
    factorisation is done once, of the weights that stay."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def base_init_deferred() -> bool:
    """Whether this code runs within :func:`deferred_base_init`."""
    return _DEFERRED.get()


@contextmanager
def fixed_dora_norms(model: nn.Module) -> Iterator[None]:
    """Within the block every DoRA layer of ``model`` computes its ``||W0 + s B A||_row`` once and reuses it:
    for evaluation and sampling, which change no weight. Each forward would otherwise recompute it: an
    ``(out, in)`` product of rank ``r`` and a sum per layer, which a training step's many tokens hide but a
    short sequence does not (GPT-2 small, DoRA on q and v, 32 tokens: 114 against 74 ms a forward). Leaving
    the block forgets the norms; nothing may change a weight, a factor or the adapter within it."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    try:
        for m in layers:
            m._norm_fixed, m._fixed_norm = True, None
        yield
    finally:
        for m in layers:
            m._norm_fixed, m._fixed_norm = False, None


class LoRALinear(nn.Module):
    """A drop-in ``nn.Linear`` with a frozen base and a trainable low-rank update.

    ``h = x W0^T + b + scaling * (dropout(x) A^T) B^T`` with ``W0: (out, in)`` (``weight``), ``b: (out,)``
    (``bias``), ``A: (r, in)`` (``lora_A``), ``B: (out, r)`` (``lora_B``) and ``scaling = alpha / r``
    (or ``alpha / sqrt(r)`` with ``use_rslora``). ``r == 0`` is a plain linear layer with no LoRA tensors.
    ``lora_init`` picks how ``A`` and ``B`` start and ``use_dora`` adds DoRA's magnitude ``lora_magnitude``
    (the module docstring has the formulas).

    Parameter names match ``nn.Linear`` (``weight``, ``bias``) and the LoRA reference code
    (``lora_A``, ``lora_B``), so a LoRA-free state dict loads with only the LoRA keys missing.
    ``merge()`` folds the update into ``weight``; ``unmerge()`` takes it out again.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        use_dora: bool = False,
        lora_init: str = "kaiming",
    ) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from(base, r, lora_alpha, lora_dropout, use_rslora, use_dora, lora_init)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        use_dora: bool = False,
        lora_init: str = "kaiming",
    ) -> LoRALinear:
        """Wrap an existing ``nn.Linear``, keeping (and sharing) its weight and bias; PiSSA/OLoRA factors and
        DoRA's magnitude are derived from its weight."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_from(linear, r, lora_alpha, lora_dropout, use_rslora, use_dora, lora_init)
        return layer

    # the dtype every adapter of this layer takes; None: the weight's (float32 beside a 4-bit one). A base stored
    # narrower than it was made (LoRATransformer.quantize_base), or kept in a half-precision file's dtype, keeps
    # float32 here, so that an adapter loaded or added afterwards is float32 too
    adapter_dtype: torch.dtype | None = None
    # whether the weight was stored narrower than it was made (quantize_base), so rounded: not merged into. A
    # half-precision file's weight kept as stored was not
    narrowed: bool = False
    # within rows_adapted(): (batch, [(rows, A, B, scaling)]): each row of the batch its own adapter's update
    _per_row: tuple[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]] | None = None

    def _init_from(
        self,
        base: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        use_rslora: bool,
        use_dora: bool,
        lora_init: str,
    ) -> None:
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.merged = False
        self._adapter_enabled = True
        self.reset_lora(r, lora_alpha, lora_dropout, use_rslora, use_dora, lora_init)
        if not _DEFERRED.get():  # (a model that sets its base weights afterwards derives it then)
            self.init_from_base()

    def reset_lora(
        self,
        r: int,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_init: str = "kaiming",
    ) -> None:
        """(Re)create the adapter: ``A`` Kaiming-uniform (as the reference code) or ``N(0, 1/r^2)`` for
        ``lora_init="gaussian"``, ``B`` zeros, DoRA's magnitude ``||W0||_row``. PiSSA and OLoRA need the base's
        weights: their factors are zeros here until :meth:`init_from_base` derives them.

        Also used to give a layer an adapter of another rank (for example when loading one).
        """
        validate_lora_args(r, lora_alpha, lora_dropout)
        validate_lora_init(lora_init)
        if not isinstance(use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {use_dora!r}")
        if getattr(self, "merged", False):
            raise RuntimeError("unmerge() the adapter before replacing it")
        if r > min(self.in_features, self.out_features) and lora_init in BASE_DERIVED_INITS:
            raise ValueError(f"lora_init {lora_init} takes r <= min(in_features, out_features) = "
                             f"{min(self.in_features, self.out_features)} (the weight's rank), got r={r}")  # fmt: skip
        if r > min(self.in_features, self.out_features):
            warnings.warn(
                f"lora_r={r} exceeds min(in_features, out_features)={min(self.in_features, self.out_features)}"
                ": a rank above that adds parameters but no capacity",
                stacklevel=3,
            )
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = use_rslora
        self.use_dora = use_dora and r > 0
        self.lora_init = lora_init
        self.scaling = lora_scaling(r, self.lora_alpha, use_rslora)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_magnitude = None
        self.register_buffer("lora_A0", None)
        self.register_buffer("lora_B0", None)
        # W0 itself while merged (not saved): unmerge() puts it back bit for bit, where subtracting the update
        # again would round it (at ~1e-8 in float32, a whole step in bfloat16)
        self.register_buffer("_merged_base", None, persistent=False)
        self._fixed_norm: torch.Tensor | None = None  # _row_norm's, kept within fixed_dora_norms()
        self._norm_fixed = False
        if r == 0:
            self.lora_A = None
            self.lora_B = None
            return
        kw = {"device": self.weight.device, "dtype": self.adapter_dtype or _float_dtype(self.weight)}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        if lora_init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:  # kaiming; pissa and olora draw it too (then replace it), so every init uses the RNG alike
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if lora_init in BASE_DERIVED_INITS:
            self.register_buffer("lora_A0", torch.zeros(r, self.in_features, **kw))
            self.register_buffer("lora_B0", torch.zeros(self.out_features, r, **kw))
        if self.use_dora:
            with torch.no_grad():
                self.lora_magnitude = nn.Parameter(self._row_norm().to(kw["dtype"]))

    @torch.no_grad()
    def init_from_base(self) -> None:
        """Derive what starts from ``W0``, after the base weights are in place: PiSSA's or OLoRA's ``A, B``
        (and ``A0 = A``, ``B0 = B``), DoRA's magnitude ``m = ||W0 + s (B A - B0 A0)||_row = ||W0||_row``.
        Kaiming and Gaussian factors are left as they are."""
        if self.r == 0:
            return
        if self.merged:
            raise RuntimeError("unmerge() the adapter before deriving it from the base")
        if self.lora_init in BASE_DERIVED_INITS:
            a, b = _principal_factors(self.base_weight().float(), self.r, self.scaling, self.lora_init)
            for t, v in ((self.lora_A, a), (self.lora_A0, a), (self.lora_B, b), (self.lora_B0, b)):
                t.copy_(v)
        if self.use_dora:
            self.lora_magnitude.copy_(self._row_norm())

    @property
    def quantized(self) -> bool:
        """Whether the frozen ``weight`` is stored in 4-bit NF4 (``lora/quantize.py``)."""
        return is_quantized(self.weight)

    @property
    def narrow_base(self) -> str | None:
        """How the frozen ``weight`` is stored narrower than it was made: ``"nf4"``, ``"bf16"`` (a bfloat16
        weight under a float32 :attr:`adapter_dtype`, :attr:`narrowed`) or ``None`` (as made or loaded)."""
        if self.quantized:
            return "nf4"
        if self.narrowed and self.adapter_dtype is not None and self.weight.dtype != self.adapter_dtype:
            return {torch.bfloat16: "bf16"}.get(
                self.weight.dtype, str(self.weight.dtype).removeprefix("torch.")
            )
        return None

    def _refuse_if_narrow(self) -> None:
        kind = self.narrow_base
        if kind is not None:
            raise ValueError(QUANTIZED_MERGE.format(kind=NARROW_BASES.get(kind, kind)))

    def base_weight(self) -> torch.Tensor:
        """``W0`` (out, in): the weight itself (dequantized if 4-bit), or, merged, the ``W0`` that :meth:`merge`
        kept."""
        return self._merged_base if self.merged else dequantize(self.weight)

    def _folded(self) -> torch.Tensor:
        """The unmerged weight with the update folded in, float32 (out, in): ``W0 + s B A``, and with DoRA each row
        scaled by ``g = m / ||W0 + s B A||_row`` (out,)."""
        self._refuse_if_narrow()
        w = self.weight.float() + self.delta_weight()
        if not self.use_dora:
            return w
        g = self.lora_magnitude.detach().float() / w.norm(dim=1)
        return w * g[:, None]

    def merged_weight(self) -> torch.Tensor:
        """The weight with this adapter folded in, in the weight's dtype: ``W0 + s B A`` (minus ``s B0 A0``
        for PiSSA/OLoRA), DoRA's rows scaled by ``m / ||.||_row``. Computed in float32, cast once."""
        if self.merged:
            return self.weight.detach()
        return self._folded().to(self.weight.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the whole update ``B A`` (:func:`whole_update`)."""
        return whole_update(self.lora_A, self.lora_B, self.lora_A0, self.lora_B0)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` (``- scaling * B0 A0``) in float32, shape (out, in); for merging and DoRA's norm."""
        if self.r == 0:
            return torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        a, b = self.factors()
        with _float32_math(self.weight.device):
            return (b.detach().float() @ a.detach().float()) * self.scaling

    @torch.no_grad()
    def _row_norm(self) -> torch.Tensor:
        """``||W0 + delta||`` of each output row, float32 (out,); no gradient flows through it (DoRA). Within
        :func:`fixed_dora_norms` it is computed once and kept (not under ``torch.compile``)."""
        fixed = self._norm_fixed and not torch.compiler.is_compiling()
        if fixed and self._fixed_norm is not None:
            return self._fixed_norm
        w = self.base_weight().float()
        with _float32_math(w.device):
            norm = (w + self.delta_weight()).norm(dim=1)
        if fixed:
            self._fixed_norm = norm
        return norm

    def dora_scale(self) -> torch.Tensor:
        """DoRA's ``g = m / ||W0 + s B A||_row`` (out,), differentiable in ``m`` only."""
        return self.lora_magnitude / self._row_norm().to(self.lora_magnitude.dtype)

    @property
    def adapter_active(self) -> bool:
        """Whether ``forward`` adds the update: an adapter (``r > 0``), not merged, not disabled."""
        return self.r > 0 and not self.merged and self._adapter_enabled

    @property
    def dropout_active(self) -> bool:
        """Whether ``forward`` draws a dropout mask on the LoRA branch's input (training, ``p > 0``)."""
        return self.training and isinstance(self.lora_dropout, nn.Dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., out)``. The unmerged path never materialises ``B A`` (DoRA's norm does). The base
        product is :func:`~lora.quantize.frozen_linear`'s: a 4-bit ``W0`` dequantized for it, a bfloat16 one
        widened outside autocast."""
        if self._per_row is not None:
            return self._per_row_forward(x)
        if not self.adapter_active:
            return frozen_linear(x, self.weight, self.bias)
        a, b = self.factors()
        g = self.dora_scale() if self.use_dora else None
        if g is not None and self.dropout_active:  # PEFT's form: base on x, the rest on dropout(x)
            xd = self.lora_dropout(x)
            out = frozen_linear(x, self.weight, self.bias) + (g - 1) * frozen_linear(xd, self.weight)
            return out + g * F.linear(F.linear(xd, a) * self.scaling, b)
        bias = None if g is not None else self.bias  # DoRA scales W x + s B A x, then adds the bias
        # Plain autograd through a dropout mask, autocast's casts, torch.compile (which fuses it well; the
        # hand-written backward, compiled for CUDA by torch 2.11, gave wrong LoRA gradients on an H100) or a
        # base stored otherwise than x (a 4-bit one saves the 4-bit weight for backward, not a dense copy).
        if (self.dropout_active or self.quantized or self.weight.dtype != x.dtype
                or torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling()):  # fmt: skip
            # (..., in) @ A^T -> (..., r); scale the small tensor, then @ B^T -> (..., out)
            out = frozen_linear(x, self.weight, bias)
            out = out + F.linear(F.linear(self.lora_dropout(x), a) * self.scaling, b)
        else:
            x2 = x.reshape(-1, self.in_features)  # (M, in)
            out = _LoRALinearFunction.apply(x2, self.weight, bias, a, b, self.scaling)
            out = out.view(*x.shape[:-1], self.out_features)
        if g is None:
            return out
        out = out * g.to(out.dtype)  # (..., out) * (out,); under autocast in its dtype
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @contextmanager
    def rows_adapted(
        self, batch: int, groups: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]
    ) -> Iterator[None]:
        """Within the block, row ``i`` of a batch of ``batch`` rows (``x``'s first dimension) gets its own update:
        ``groups`` are ``(rows, A, B, scaling)``, ``rows`` (k,) the row indices that take ``scaling * B A``
        (``A: (r, in)``, ``B: (out, r)``: :meth:`factors`' form); a row in no group gets the base output. The
        layer's own adapter is not used; it is left as it is. The factors take this layer's device and adapter
        dtype. Inference only (no dropout); a merged layer is refused (its weight holds an adapter)."""
        if self.merged:
            raise ValueError("per-row adapters need an unmerged model: unmerge_lora() first")
        kw = {"device": self.weight.device, "dtype": self.adapter_dtype or _float_dtype(self.weight)}
        prepared = []
        for rows, a, b, scaling in groups:
            if a.shape[1] != self.in_features or b.shape[0] != self.out_features or a.shape[0] != b.shape[1]:
                raise ValueError(f"per-row adapter factors A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a "
                                 f"layer of in {self.in_features}, out {self.out_features}")  # fmt: skip
            prepared.append((rows.to(self.weight.device), a.to(**kw), b.to(**kw), float(scaling)))
        previous, self._per_row = self._per_row, (batch, prepared)
        try:
            yield
        finally:
            self._per_row = previous

    def _per_row_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ..., in) -> (B, ..., out)``: ``x W0^T + b`` for every row, plus for each group of rows its own
        ``s (x A^T) B^T`` (:meth:`rows_adapted`)."""
        batch, groups = self._per_row
        if x.shape[0] != batch:
            raise ValueError(f"per-row adapters were set for a batch of {batch} rows, got {x.shape[0]}")
        out = frozen_linear(x, self.weight, self.bias)  # (B, ..., out)
        for rows, a, b, scaling in groups:
            xr = x.index_select(0, rows)  # (k, ..., in)
            update = F.linear(F.linear(xr, a) * scaling, b)  # (k, ..., r) -> (k, ..., out)
            out = out.index_add(0, rows, update.to(out.dtype))
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` in place (computed in float32, cast once), keeping a copy of ``W0``
        until :meth:`unmerge` (memory: one more weight of this layer's while merged). Idempotent."""
        if self.merged or self.r == 0:
            return
        self._refuse_if_narrow()  # (before the copy: a refused merge keeps nothing)
        self._merged_base = self.weight.detach().clone()
        self.weight.copy_(self._folded())  # (copy_ casts to the weight's dtype)
        self.merged = True

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """``load_state_dict`` into a merged layer is refused: the weight loaded would stand for a merged one over
        the ``W0`` that the merge kept, which unmerge would then put back."""
        if self.merged and prefix + "weight" in state_dict:
            raise RuntimeError(
                f"{prefix}weight: load_state_dict into a merged layer; unmerge first (unmerge_lora())"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the ``W0`` that :meth:`merge` kept: the weight is the base's again, bit for bit. Idempotent."""
        if not self.merged:
            return
        self.weight.copy_(self._merged_base)
        self._merged_base = None
        self.merged = False

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the layer returns the base output ``x W0^T + b``."""
        was_merged = self.merged
        self.unmerge()
        self._adapter_enabled = False
        try:
            yield
        finally:
            self._adapter_enabled = True
            if was_merged:
                self.merge()

    def extra_repr(self) -> str:
        variant = (", dora" if self.use_dora else "") + (
            f", init={self.lora_init}" if self.lora_init != "kaiming" else ""
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}{variant}, merged={self.merged}"
        )


def whole_update(
    a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor | None = None, b0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` whose product is an adapter's whole ``B A``: ``A (r, in), B (out, r)`` as they are, or with
    PiSSA/OLoRA's initial factors ``[A; A0]`` (2r, in) and ``[B, -B0]`` (out, 2r), the product ``B A - B0 A0``."""
    if a0 is None:
        return a, b
    return torch.cat([a, a0]), torch.cat([b, -b0], dim=1)


def _float32_math(device: torch.device) -> AbstractContextManager:
    """A block where autocast casts nothing (float32 math also inside an autocast region), on the devices
    autocast serves; elsewhere (``meta``) a plain block."""
    if device.type in ("cpu", "cuda", "mps", "xpu"):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


def _float_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the adapter takes beside ``weight``: the weight's, or float32 for a quantized weight."""
    return weight.dtype if weight.dtype.is_floating_point and weight.element_size() >= 2 else torch.float32


def _principal_factors(
    w: torch.Tensor, r: int, scaling: float, init: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r))`` from ``w`` (out, in), float32, whose ``scaling * B A`` the residual leaves out.

    ``pissa``: ``w = U S V^T``, ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)``, so ``s B A = U_r S_r V_r^T``,
    the principal rank-r part of ``w``. ``olora``: ``w = Q R``, ``A = R_{:r}``, ``B = Q_{:, :r}`` (``s Q_r R_r``).
    """
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        root = (s[:r] / scaling).sqrt()  # (r,)
        return root[:, None] * vh[:r], u[:, :r] * root[None, :]
    q, rr = torch.linalg.qr(w)  # (out, k), (k, in)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def LinearWithLoRA(  # noqa: N802 - the seed documents' spelling of LoRALinear.from_linear
    linear: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False
) -> LoRALinear:
    """``LinearWithLoRA(nn.Linear(512, 256), rank=4, alpha=8)``: the same as ``LoRALinear.from_linear``.

    The scaling is the paper's ``alpha / rank`` (2 here), not ``alpha`` itself as in the seed document
    that introduced this name: with ``alpha = rank`` the update is applied unscaled.
    """
    return LoRALinear.from_linear(
        linear, r=rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora
    )


# ---------------------------------------------------------------------------------------------------------
# Helpers for any nn.Module


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yield ``(name, layer)`` for every :class:`LoRALinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A dotted module name matches a pattern equal to it, to its last parts, or as a glob."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def inject_lora(
    model: nn.Module,
    target_modules: Sequence[str] | str,
    r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    *,
    use_dora: bool = False,
    lora_init: str = "kaiming",
) -> nn.Module:
    """Replace every ``nn.Linear`` whose name matches ``target_modules`` by a :class:`LoRALinear`.

    A target matches a module's dotted name exactly (``"0"``, ``"encoder.linear1"``), by its last parts
    (``"linear1"``), or as a glob (``"layers.*.linear?"``). Returns ``model`` (changed in place).
    Linear layers inside ``nn.MultiheadAttention`` are refused: its forward reads their weights directly,
    so an adapter there would be silently ignored.
    """
    validate_lora_args(r, lora_alpha, lora_dropout)
    validate_lora_init(lora_init)
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    linears = [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
    ]
    chosen = [(n, m) for n, m in linears if _matches(n, patterns)]
    if not chosen:
        names = ", ".join(n for n, _ in linears) or "none"
        raise ValueError(f"no nn.Linear matches target_modules={patterns}; the linear layers are: {names}")
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(
                f"{name!r} is inside nn.MultiheadAttention, whose forward bypasses submodules; "
                "LoRA cannot adapt it"
            )
        layer = LoRALinear.from_linear(
            linear, r, lora_alpha, lora_dropout, use_rslora, use_dora=use_dora, lora_init=lora_init
        )
        setattr(parent, child, layer)
    return model


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze everything but ``lora_A``/``lora_B`` (and DoRA's ``lora_magnitude``); ``bias`` = "none" | "all" |
    "lora_only"."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        p.requires_grad_(leaf in TRAINED_LEAVES or (bias == "all" and leaf == "bias"))
    if bias == "lora_only":
        for _, layer in lora_modules(model):
            if layer.r > 0 and layer.bias is not None:
                layer.bias.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``model`` only (keys ending in ``lora_A``, ``lora_B``, and where a layer has them
    ``lora_magnitude`` (DoRA), ``lora_A0``, ``lora_B0`` (PiSSA/OLoRA's initial factors))."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in LORA_LEAVES}


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer in ``model`` (idempotent)."""
    for _, layer in lora_modules(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Unmerge every LoRA layer in ``model`` (idempotent)."""
    for _, layer in lora_modules(model):
        layer.unmerge()
    return model


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """Within the block ``model`` computes its base outputs; the previous state is restored after."""
    with ExitStack() as stack:
        for _, layer in lora_modules(model):
            stack.enter_context(layer.disable_adapter())
        yield


def _demo() -> None:
    torch.manual_seed(0)
    print("LoRA: h = W0 x + (alpha / r) B A x,  A: (r, in), B: (out, r), B = 0 at the start\n")
    d_out, d_in, r = 5_000, 10_000, 8
    full, a, b = d_out * d_in, r * d_in, d_out * r
    print(f"Worked example: W0 is {d_out:,} x {d_in:,} = {full:,} parameters")
    print(f"  r = {r}: A has {r} x {d_in:,} = {a:,}, B has {d_out:,} x {r} = {b:,}")
    print(f"  trainable = {a + b:,}, {full / (a + b):.0f}x fewer than {full / 1e6:.0f}M\n")

    base = nn.Linear(512, 256)
    layer = LinearWithLoRA(base, rank=4, alpha=8)
    x = torch.randn(3, 512)
    w0 = base.weight.detach().clone()
    print("Wrapped: LinearWithLoRA(nn.Linear(512, 256), rank=4, alpha=8)")
    print(f"  {layer}")
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    print(f"  trainable {trainable:,} of {sum(p.numel() for p in layer.parameters()):,} parameters")
    same = torch.equal(layer(x), base(x))
    print(f"  output at init equals the base layer's: {same}")

    nn.init.normal_(layer.lora_B, std=0.02)
    unmerged = layer(x)
    layer.merge()
    merged = layer(x)
    layer.unmerge()
    print("\nMerge check after randomising B:")
    print(f"  max |merged - unmerged| = {(merged - unmerged).abs().max().item():.2e}")
    print(f"  max |W0 after unmerge - W0| = {(layer.weight - w0).abs().max().item():.2e}")


if __name__ == "__main__":
    _demo()
