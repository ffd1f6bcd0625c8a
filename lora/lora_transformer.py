"""A decoder-only transformer in the GPT-2 layout whose projections are LoRA-capable.

Token + learned position embeddings, ``num_layers`` pre-LayerNorm blocks (causal self-attention with
separate ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``; a GELU MLP ``fc1``/``fc2``), a final LayerNorm
and an LM head tied to the token embedding; optionally a classification head. Every linear layer is a
:class:`~lora.lora_layer.LoRALinear`; the ones not adapted have ``r = 0`` and are plain linear layers.

No training, no file I/O and no argument parsing here. Run ``python lora/lora_transformer.py`` for a
demonstration.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

if __package__ in (None, ""):  # `python lora/lora_transformer.py` without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora.lora_layer import (
    LoRALinear,
    disable_adapter,
    lora_modules,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
    validate_lora_args,
)

__all__ = ["ATTENTION_TARGETS", "LoRATransformer"]

ATTENTION_TARGETS = ("q", "k", "v", "o")
_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "fc1": "fc1", "fc2": "fc2"}


def describe_mismatch(
    got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], noun: str = "tensors"
) -> str:
    """One line naming what ``got`` lacks, has in excess, or has in the wrong shape; ``""`` if it fits."""
    common = sorted(set(got) & set(expected))
    found = {
        f"missing {noun}": sorted(set(expected) - set(got)),
        f"unexpected {noun}": sorted(set(got) - set(expected)),
        "wrong shapes": [
            f"{k} {tuple(got[k].shape)} (expected {tuple(expected[k].shape)})"
            for k in common
            if got[k].shape != expected[k].shape
        ],
    }
    parts = []
    for label, items in found.items():
        if items:
            extra = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
            parts.append(f"{label}: {', '.join(items[:4])}{extra}")
    return "; ".join(parts)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate Q, K, V and output projections."""

    def __init__(
        self, d_model: int, num_heads: int, dropout: float, lora: dict, targets: Sequence[str]
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        for t in ATTENTION_TARGETS:
            r = lora["r"] if t in targets else 0
            opts = {**lora, "r": r}
            setattr(self, _PROJ[t], LoRALinear(d_model, d_model, **opts))
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        B, T, C = x.shape
        hs = C // self.num_heads
        q = self.q_proj(x).view(B, T, self.num_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.num_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.num_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.o_proj(y))


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` with GPT-2's tanh-approximated GELU."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, lora: dict, adapt: bool) -> None:
        super().__init__()
        opts = {**lora, "r": lora["r"] if adapt else 0}
        self.fc1 = LoRALinear(d_model, d_ff, **opts)
        self.fc2 = LoRALinear(d_ff, d_model, **opts)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(
        self, d_model: int, num_heads: int, d_ff: int, dropout: float, lora: dict, targets, adapt_ff
    ):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, eps=1e-5)
        self.attn = CausalSelfAttention(d_model, num_heads, dropout, lora, targets)
        self.ln_2 = nn.LayerNorm(d_model, eps=1e-5)
        self.mlp = MLP(d_model, d_ff, dropout, lora, adapt_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def parse_targets(lora_targets: Sequence[str] | str) -> tuple[str, ...]:
    """``"q,v"`` or ``["q", "v"]`` -> ``("q", "v")``, in q, k, v, o order; unknown names raise."""
    items = lora_targets.split(",") if isinstance(lora_targets, str) else list(lora_targets)
    items = [str(t).strip().lower() for t in items if str(t).strip()]
    bad = [t for t in items if t not in ATTENTION_TARGETS]
    if bad:
        raise ValueError(f"unknown lora_targets {bad}: choose among q, k, v, o")
    return tuple(t for t in ATTENTION_TARGETS if t in items)


class LoRATransformer(nn.Module):
    """GPT-2-layout decoder whose attention (and optionally MLP) projections carry LoRA adapters.

    ``lora_targets`` picks among the attention projections q, k, v, o (used when ``adapt_attention``);
    ``adapt_feedforward`` adapts ``fc1`` and ``fc2`` too. ``lora_r = 0`` builds a LoRA-free model.
    With ``num_classes`` the model also has a classification head over the last token's hidden state.
    Setting ``model.gradient_checkpointing = True`` stores only each block's input in training and
    recomputes the rest in backward: less activation memory for long sequences, about one more forward.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 512,
        num_heads: int = 8,
        num_layers: int = 6,
        d_ff: int | None = None,
        max_seq_len: int = 512,
        dropout: float = 0.1,
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_targets: Sequence[str] | str = ("q", "v"),
        adapt_attention: bool = True,
        adapt_feedforward: bool = False,
        num_classes: int | None = None,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("d_model", d_model),
            ("num_heads", num_heads),
            ("num_layers", num_layers),
            ("max_seq_len", max_seq_len),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2 or None, got {num_classes!r}")
        validate_lora_args(lora_r, lora_alpha, lora_dropout)
        targets = parse_targets(lora_targets) if adapt_attention else ()
        d_ff = d_ff or 4 * d_model
        self.config = {
            "vocab_size": vocab_size, "d_model": d_model, "num_heads": num_heads, "num_layers": num_layers,
            "d_ff": d_ff, "max_seq_len": max_seq_len, "dropout": dropout, "num_classes": num_classes,
        }  # fmt: skip
        self.lora_config = {
            "lora_r": lora_r, "lora_alpha": float(lora_alpha), "lora_dropout": lora_dropout,
            "lora_targets": list(targets), "adapt_feedforward": adapt_feedforward, "use_rslora": use_rslora,
        }  # fmt: skip
        lora = {"r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "use_rslora": use_rslora}

        self.max_seq_len = max_seq_len
        # Recompute each block's activations in backward instead of storing them (long sequences).
        self.gradient_checkpointing = False
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, num_heads, d_ff, dropout, lora, targets, adapt_feedforward)
            for _ in range(num_layers)
        )
        self.ln_f = nn.LayerNorm(d_model, eps=1e-5)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2
        self.cls_head = nn.Linear(d_model, num_classes) if num_classes else None
        self._init_weights(num_layers)

    @torch.no_grad()
    def _init_weights(self, num_layers: int) -> None:
        """GPT-2 init: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 L)); LoRA tensors untouched."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, LoRALinear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(("o_proj", "fc2")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------------------------------------------
    # Forward and generation

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, T)`` -> final hidden states ``(B, T, C)`` (after ``ln_f``)."""
        T = idx.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.max_seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # non-reentrant: LoRA grads flow even though x (frozen embeddings) needs no grad
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Language-model logits ``(B, T, vocab)``; with a classification head, class logits ``(B, classes)``.

        For classification, ``lengths`` (B,) gives each right-padded sequence's true length; the head reads
        the hidden state of the last real token (the causal mask means it has seen the whole sequence).
        """
        h = self.hidden_states(idx)
        if self.cls_head is None:
            return self.lm_head(h)
        last = (lengths - 1) if lengths is not None else torch.full((h.shape[0],), h.shape[1] - 1)
        return self.cls_head(h[torch.arange(h.shape[0], device=h.device), last.to(h.device)])  # (B, classes)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T) -> (B, T + max_new_tokens).

        ``temperature == 0`` decodes greedily; ``top_k`` keeps the k most likely tokens.
        """
        if self.cls_head is not None:
            raise RuntimeError("generate() needs a language model; this one has a classification head")
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.max_seq_len :]
            logits = self.lm_head(self.hidden_states(ctx)[:, -1, :]).float()  # (B, vocab)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx

    # ----------------------------------------------------------------------------------------------------
    # LoRA bookkeeping

    def lora_layers(self) -> Iterator[tuple[str, LoRALinear]]:
        """``(name, layer)`` for every adapted layer (``r > 0``)."""
        return ((n, m) for n, m in lora_modules(self) if m.r > 0)

    def configure_lora_training(self) -> dict:
        """Freeze everything but the LoRA tensors (and a classification head); return the statistics."""
        for name, p in self.named_parameters():
            p.requires_grad_(name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or name.startswith("cls_head."))
        return self.get_parameter_stats()

    def get_parameter_stats(self) -> dict:
        """Counts of total / trainable / LoRA / frozen parameters (tied weights counted once)."""
        params = dict(self.named_parameters())  # named_parameters skips the tied duplicate
        total = sum(p.numel() for p in params.values())
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        per_proj = dict.fromkeys(("q", "k", "v", "o", "ff"), 0)
        for name, layer in self.lora_layers():
            leaf = name.rsplit(".", 1)[-1]
            key = "ff" if leaf in ("fc1", "fc2") else leaf[0]
            per_proj[key] += layer.lora_A.numel() + layer.lora_B.numel()
        lora = sum(per_proj.values())
        return {
            "total_params": total,
            "trainable_params": trainable,
            "lora_params": lora,
            "frozen_params": total - trainable,
            "trainable_percent": 100.0 * trainable / total,
            "reduction_factor": total / trainable if trainable else float("inf"),
            "lora_params_by_projection": per_proj,
        }

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA tensors, plus the classification head if there is one (it has no pretrained weights)."""
        sd = lora_state_dict(self)
        if self.cls_head is not None:
            sd.update({f"cls_head.{k}": v for k, v in self.cls_head.state_dict().items()})
        return sd

    def load_lora_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load tensors from :meth:`lora_state_dict`; missing, unexpected or mis-shaped keys raise."""
        own = self.lora_state_dict()
        problem = describe_mismatch(state_dict, own, noun="keys")
        if problem:
            raise ValueError(f"adapter does not fit this model: {problem}")
        merged = [layer for _, layer in self.lora_layers() if layer.merged]
        for layer in merged:
            layer.unmerge()
        with torch.no_grad():
            for k, v in state_dict.items():
                own[k].copy_(v)
        for layer in merged:
            layer.merge()

    def merge_lora(self) -> LoRATransformer:
        """Fold every adapter into its base weight (idempotent)."""
        return merge_lora(self)

    def unmerge_lora(self) -> LoRATransformer:
        """Undo :meth:`merge_lora` (idempotent)."""
        return unmerge_lora(self)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes the frozen base's outputs."""
        with disable_adapter(self):
            yield

    # ----------------------------------------------------------------------------------------------------
    # Saving, loading and switching adapters: thin wrappers over lora/adapters.py (which does the file I/O)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the base model (``config.json`` + ``model.safetensors``, no LoRA tensors) to ``path``."""
        from lora.adapters import save_pretrained

        return save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path, **lora_options: object) -> LoRATransformer:
        """A model with the architecture and weights saved in ``path``; ``lora_options`` as ``__init__``."""
        from lora.adapters import from_pretrained

        return from_pretrained(path, **lora_options)

    def base_fingerprint(self) -> str:
        """Short sha256 hex digest of the frozen base tensors (unmerged; no LoRA tensors, no head)."""
        from lora.adapters import base_fingerprint

        return base_fingerprint(self)

    def save_adapter(
        self, path: str | Path, adapter_name: str | None = None, extra: dict | None = None
    ) -> Path:
        """Write adapter ``adapter_name`` (default: the active one) to the folder ``path``."""
        from lora.adapters import save_adapter

        return save_adapter(self, path, adapter_name, extra)

    def load_adapter(self, path: str | Path, adapter_name: str = "default", force: bool = False) -> str:
        """Load the adapter in ``path`` as ``adapter_name`` and make it active (base checked first)."""
        from lora.adapters import load_adapter

        return load_adapter(self, path, adapter_name, force)

    def set_adapter(self, name: str) -> None:
        """Make adapter ``name`` the active one; the base weights are not reloaded or changed."""
        from lora.adapters import set_adapter

        set_adapter(self, name)

    def delete_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (if active, the model is left with no adapter)."""
        from lora.adapters import delete_adapter

        delete_adapter(self, name)

    def list_adapters(self) -> list[str]:
        """Adapter names, the active one first."""
        from lora.adapters import list_adapters

        return list_adapters(self)

    @property
    def active_adapter(self) -> str | None:
        """Name of the active adapter, ``None`` if there is none."""
        from lora.adapters import active_adapter

        return active_adapter(self)

    def add_weighted_adapter(self, weights: Mapping[str, float], name: str) -> str:
        """Add adapter ``name`` with ``ΔW = Σ_i w_i s_i B_i A_i`` exactly (ranks concatenated)."""
        from lora.adapters import add_weighted_adapter

        return add_weighted_adapter(self, weights, name)

    def merge_and_export(self, path: str | Path) -> Path:
        """Write a LoRA-free model folder with the active adapter merged; this model is left unchanged."""
        from lora.adapters import merge_and_export

        return merge_and_export(self, path)


def _demo() -> None:
    torch.manual_seed(0)
    model = LoRATransformer(
        vocab_size=10000, d_model=512, num_heads=8, num_layers=6, lora_r=8, lora_alpha=16,
        adapt_attention=True, adapt_feedforward=False,
    )  # fmt: skip
    stats = model.configure_lora_training()
    print(
        "LoRATransformer(vocab_size=10000, d_model=512, num_heads=8, num_layers=6, lora_r=8, lora_alpha=16)"
    )
    print(f"LoRA on {model.lora_config['lora_targets']} of every attention block\n")
    rows = [
        ("total parameters", f"{stats['total_params']:,}"),
        ("frozen", f"{stats['frozen_params']:,}"),
        ("trainable (LoRA)", f"{stats['trainable_params']:,}"),
        ("trainable share", f"{stats['trainable_percent']:.3f} %"),
        ("reduction factor", f"{stats['reduction_factor']:.0f}x"),
    ]
    rows += [(f"  LoRA on {k}", f"{v:,}") for k, v in stats["lora_params_by_projection"].items() if v]
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value:>14}")
    expected = 6 * 2 * 8 * (512 + 512)
    print(f"\nanalytic count: layers x targets x r x (d_in + d_out) = 6 x 2 x 8 x 1024 = {expected:,}")

    model.eval()
    for _, layer in model.lora_layers():
        nn.init.normal_(layer.lora_B, std=0.02)
    idx = torch.randint(0, 10000, (2, 64))
    with torch.no_grad():
        unmerged = model(idx)
        model.merge_lora()
        merged = model(idx)
        model.unmerge_lora()
    print(f"merged vs unmerged logits (B randomised): max |diff| = {(merged - unmerged).abs().max():.2e}")


if __name__ == "__main__":
    _demo()
