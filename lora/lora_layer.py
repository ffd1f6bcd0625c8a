"""LoRA for one linear layer, and helpers that work on any ``nn.Module``.

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes a pretrained weight ``W0`` (out, in) and learns a
low-rank update::

    h = W0 x + b + scaling * B A x,    A: (r, in),  B: (out, r),  scaling = alpha / r

(``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023). ``A`` starts Kaiming-uniform and ``B`` at zero,
so an untrained adapter leaves the layer's output exactly as it was.

Run ``python lora/lora_layer.py`` for a short demonstration.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LinearWithLoRA",
    "LoRALinear",
    "disable_adapter",
    "inject_lora",
    "lora_modules",
    "lora_scaling",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "unmerge_lora",
    "validate_lora_args",
]


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


class LoRALinear(nn.Module):
    """A drop-in ``nn.Linear`` with a frozen base and a trainable low-rank update.

    ``h = x W0^T + b + scaling * (dropout(x) A^T) B^T`` with ``W0: (out, in)`` (``weight``), ``b: (out,)``
    (``bias``), ``A: (r, in)`` (``lora_A``), ``B: (out, r)`` (``lora_B``) and ``scaling = alpha / r``
    (or ``alpha / sqrt(r)`` with ``use_rslora``). ``r == 0`` is a plain linear layer with no LoRA tensors.

    Parameter names match ``nn.Linear`` (``weight``, ``bias``) and the LoRA reference code
    (``lora_A``, ``lora_B``), so a LoRA-free state dict loads with only the LoRA keys missing.
    ``merge()`` folds ``scaling * B A`` into ``weight``; ``unmerge()`` takes it out again.
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
    ) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from(base, r, lora_alpha, lora_dropout, use_rslora)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> LoRALinear:
        """Wrap an existing ``nn.Linear``, keeping (and sharing) its weight and bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_from(linear, r, lora_alpha, lora_dropout, use_rslora)
        return layer

    def _init_from(
        self, base: nn.Linear, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool
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
        self.reset_lora(r, lora_alpha, lora_dropout, use_rslora)

    def reset_lora(
        self, r: int, lora_alpha: float = 16.0, lora_dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        """(Re)create the adapter: ``A`` Kaiming-uniform (as the reference code), ``B`` zeros.

        Also used to give a layer an adapter of another rank (for example when loading one).
        """
        validate_lora_args(r, lora_alpha, lora_dropout)
        if getattr(self, "merged", False):
            raise RuntimeError("unmerge() the adapter before replacing it")
        if r > min(self.in_features, self.out_features):
            warnings.warn(
                f"lora_r={r} exceeds min(in_features, out_features)={min(self.in_features, self.out_features)}"
                ": a rank above that adds parameters but no capacity",
                stacklevel=3,
            )
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, self.lora_alpha, use_rslora)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        if r == 0:
            self.lora_A = None
            self.lora_B = None
            return
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` in float32, shape (out, in); used only for merging, never in training."""
        if self.r == 0:
            return torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @property
    def adapter_active(self) -> bool:
        """Whether ``forward`` adds the update: an adapter (``r > 0``), not merged, not disabled."""
        return self.r > 0 and not self.merged and self._adapter_enabled

    @property
    def dropout_active(self) -> bool:
        """Whether ``forward`` draws a dropout mask on the LoRA branch's input (training, ``p > 0``)."""
        return self.training and isinstance(self.lora_dropout, nn.Dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., out)``. The unmerged path never materialises ``B A``."""
        if not self.adapter_active:
            return F.linear(x, self.weight, self.bias)
        # Plain autograd through a dropout mask, autocast's casts, or torch.compile (which fuses it well;
        # the hand-written backward, compiled for CUDA by torch 2.11, gave wrong LoRA gradients on an H100).
        if self.dropout_active or torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():
            # (..., in) @ A^T -> (..., r); scale the small tensor, then @ B^T -> (..., out)
            out = F.linear(x, self.weight, self.bias)
            return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A) * self.scaling, self.lora_B)
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        out = _LoRALinearFunction.apply(x2, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)
        return out.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scaling * B A`` into ``weight`` (computed in float32, cast once). Idempotent."""
        if self.merged or self.r == 0:
            return
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update merged by :meth:`merge` (in float32). Idempotent."""
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
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
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, merged={self.merged}"
        )


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
) -> nn.Module:
    """Replace every ``nn.Linear`` whose name matches ``target_modules`` by a :class:`LoRALinear`.

    A target matches a module's dotted name exactly (``"0"``, ``"encoder.linear1"``), by its last parts
    (``"linear1"``), or as a glob (``"layers.*.linear?"``). Returns ``model`` (changed in place).
    Linear layers inside ``nn.MultiheadAttention`` are refused: its forward reads their weights directly,
    so an adapter there would be silently ignored.
    """
    validate_lora_args(r, lora_alpha, lora_dropout)
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
        setattr(parent, child, LoRALinear.from_linear(linear, r, lora_alpha, lora_dropout, use_rslora))
    return model


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze everything but ``lora_A``/``lora_B``; ``bias`` = "none" | "all" | "lora_only"."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        p.requires_grad_(leaf in ("lora_A", "lora_B") or (bias == "all" and leaf == "bias"))
    if bias == "lora_only":
        for _, layer in lora_modules(model):
            if layer.r > 0 and layer.bias is not None:
                layer.bias.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``model`` only (keys ending in ``lora_A`` / ``lora_B``)."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


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
