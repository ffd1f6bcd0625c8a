"""A decoder-only transformer in the GPT-2 layout whose projections are LoRA-capable.

Token + learned position embeddings, ``num_layers`` pre-LayerNorm blocks (causal self-attention with
separate ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, the first three computed in one fused path; a
GELU MLP ``fc1``/``fc2``), a final LayerNorm and an LM head tied to the token embedding; optionally a
classification head. Every linear layer is a :class:`~lora.lora_layer.LoRALinear`; the ones not adapted
have ``r = 0`` and are plain linear layers.

No training and no argument parsing here; the file formats the model is saved in and loaded from are
``lora/formats.py``'s (and Hugging Face PEFT's, ``lora/peft_format.py``). Run
``python lora/lora_transformer.py`` for a demonstration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

if __package__ in (None, ""):  # `python lora/lora_transformer.py` without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora.adapter import Adapter, LayerAdapter, weighted_sum
from lora.chunked_loss import chunked_lm_loss
from lora.errors import quote
from lora.files import describe_mismatch
from lora.formats import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFolder,
    read_adapter_folder,
    read_model_config,
    read_model_header,
    read_model_weights,
    write_adapter_folder,
    write_model_folder,
)
from lora.fused_qkv import FrozenConcat, can_fuse, fused_lora_linear
from lora.gpt2 import gpt2_model_config, is_hf_folder, read_gpt2_header, read_gpt2_weights
from lora.lora_layer import (
    BASE_DERIVED_INITS,
    LORA_LEAVES,
    NARROW_BASES,
    QUANTIZED_MERGE,
    TRAINED_LEAVES,
    LoRALinear,
    base_init_deferred,
    deferred_base_init,
    disable_adapter,
    fixed_dora_norms,
    lora_modules,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from lora.model_config import PROJECTIONS, LoRAConfig, ModelConfig, target_of
from lora.peft_format import adapter_from_peft, is_peft_folder, write_peft_folder
from lora.quantize import (
    check_tiles,
    dequantize,
    frozen_linear,
    narrow_linear_,
    quantize_linear_,
    release_freed_memory,
)

__all__ = ["LoRATransformer"]

# the keyword arguments from_pretrained passes on to the constructor (the architecture comes from the folder)
FROM_PRETRAINED_OPTIONS = (
    *(f.name for f in dataclasses.fields(LoRAConfig)),
    "adapt_attention",
    "num_classes",
    "dropout",
)


def _linear(d_in: int, d_out: int, lora: LoRAConfig, adapted: bool) -> LoRALinear:
    """A linear layer with ``lora``'s adapter if ``adapted``, else a plain one (``r = 0``)."""
    r = lora.lora_r if adapted else 0
    return LoRALinear(d_in, d_out, r, lora.lora_alpha, lora.lora_dropout, use_rslora=lora.use_rslora,
                      use_dora=lora.use_dora, lora_init=lora.lora_init)  # fmt: skip


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate Q, K, V and output projections.

    ``q_proj``, ``k_proj``, ``v_proj`` own their parameters, but with ``fused_qkv`` (the default) they are
    computed together: one product against their stacked frozen weights, one against their stacked A's
    (``lora/fused_qkv.py``). Cases it does not cover (base weights being trained, as in full fine-tuning)
    and ``fused_qkv = False`` take one product per projection.
    """

    def __init__(self, config: ModelConfig, lora: LoRAConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        for t, name in PROJECTIONS.items():
            setattr(self, name, _linear(config.d_model, config.d_model, lora, t in lora.lora_targets))
        self.resid_drop = nn.Dropout(config.dropout)
        self.fused_qkv = True
        # the stacked frozen q/k/v weights and biases; the layers' own become views of it
        self._frozen_qkv = FrozenConcat(adopt=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        B, T, C = x.shape
        hs = C // self.num_heads
        layers = (self.q_proj, self.k_proj, self.v_proj)
        if self.fused_qkv and can_fuse(layers):
            q, k, v = fused_lora_linear(x, layers, self._frozen_qkv).split(C, dim=2)  # 3 x (B, T, C)
        else:
            q, k, v = (layer(x) for layer in layers)  # 3 x (B, T, C)
        q = q.view(B, T, self.num_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.num_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.o_proj(y))


ACTIVATION_FUNCTIONS = {
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # GPT-2's "gelu_new"
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``; ``act`` is GPT-2's tanh-approximated GELU unless the config says otherwise."""

    def __init__(self, config: ModelConfig, lora: LoRAConfig) -> None:
        super().__init__()
        self.act = ACTIVATION_FUNCTIONS[config.activation]
        self.fc1 = _linear(config.d_model, config.d_ff, lora, lora.adapt_feedforward)
        self.fc2 = _linear(config.d_ff, config.d_model, lora, lora.adapt_feedforward)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: ModelConfig, lora: LoRAConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, lora)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config, lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LoRATransformer(nn.Module):
    """GPT-2-layout decoder whose attention (and optionally MLP) projections carry LoRA adapters.

    ``lora_targets`` picks among the attention projections q, k, v, o (used when ``adapt_attention``);
    ``adapt_feedforward`` adapts ``fc1`` and ``fc2`` too. ``lora_r = 0`` builds a LoRA-free model.
    With ``num_classes`` the model also has a classification head over the last token's hidden state.
    ``model.config`` (:class:`ModelConfig`) and ``model.lora_config`` (:class:`LoRAConfig`) say what it is.
    Setting ``model.gradient_checkpointing = True`` stores only each block's input in training and
    recomputes the rest in backward: less activation memory for long sequences, about one more forward.
    ``model.fused_qkv = False`` computes q, k, v as three products instead of one fused path (same results
    to float rounding; for comparisons). :meth:`lm_loss` is the LM loss without the whole logits tensor.

    The model owns its adapters: the active one lives in the ``LoRALinear`` parameters (so ``state_dict``
    and an optimizer see only it), the others wait as :class:`Adapter` values. ``load_adapter``,
    ``set_adapter``, ``save_adapter`` ... switch and move them; switching never touches the base weights.
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
        layer_norm_eps: float = 1e-5,
        activation: str = "gelu_tanh",
        use_dora: bool = False,
        lora_init: str = "kaiming",
    ) -> None:
        super().__init__()
        config = ModelConfig(vocab_size, d_model, num_heads, num_layers, d_ff, max_seq_len, dropout, num_classes,
                             layer_norm_eps, activation)  # fmt: skip
        lora = LoRAConfig(lora_r, lora_alpha, lora_dropout, lora_targets if adapt_attention else (),
                          adapt_feedforward, use_rslora, use_dora, lora_init)  # fmt: skip
        self.config, self.lora_config = config, lora
        # Recompute each block's activations in backward instead of storing them (long sequences).
        self.gradient_checkpointing = False
        # tokens whose logits exist at once in forward(..., targets=...): the LM loss without the whole logits
        self.loss_chunk_tokens = 1024
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        loading = base_init_deferred()  # within from_pretrained: the weights are not the ones to keep
        with deferred_base_init():  # the layers' start is derived once, after _init_weights
            self.blocks = nn.ModuleList(Block(config, lora) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2
        self.cls_head = nn.Linear(config.d_model, num_classes) if num_classes else None
        self._init_weights(config.num_layers)
        if not loading:  # (from_pretrained derives it once the file's weights are in)
            self.init_adapter_from_base()
        # the adapter set: the active adapter's name (None: no adapter), its extra facts, the parked ones
        has_adapter = any(layer.r > 0 for _, layer in lora_modules(self)) or self.cls_head is not None
        self._active: str | None = "default" if has_adapter else None
        self._active_extra: dict = {}
        self._parked: dict[str, Adapter] = {}
        # set by quantize_base: the data type of the block weights and the full-precision base's fingerprint
        self._quantization: tuple[str, str] | None = None
        # ||W0||_row of each q, k, v projection's full-precision weight, kept by quantize_base (DoRA's export)
        self._full_precision_norms: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_config(cls, config: ModelConfig, lora: LoRAConfig | None = None) -> LoRATransformer:
        """The model for typed settings (``lora`` ``None``: no adapter)."""
        lora = lora or LoRAConfig(lora_r=0)
        return cls(**config.to_dict(), **{**lora.to_dict(), "lora_targets": lora.lora_targets})

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    @property
    def fused_qkv(self) -> bool:
        """Whether every block computes q, k, v in one fused path (``lora/fused_qkv.py``); default ``True``."""
        return all(block.attn.fused_qkv for block in self.blocks)

    @fused_qkv.setter
    def fused_qkv(self, value: bool) -> None:
        for block in self.blocks:
            block.attn.fused_qkv = bool(value)

    @torch.no_grad()
    def _init_weights(self, num_layers: int) -> None:
        """GPT-2 init: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 L)); LoRA tensors untouched."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, LoRALinear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(("o_proj", "fc2")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def init_adapter_from_base(self) -> None:
        """Derive the adapter's base-dependent start from the current base weights (PiSSA/OLoRA factors, DoRA
        magnitudes: ``LoRALinear.init_from_base``); the constructor and :meth:`from_pretrained` call it."""
        for _, layer in self.lora_layers():
            layer.init_from_base()

    QUANTIZATIONS = ("nf4", "bf16")

    def quantize_base(self, kind: str = "nf4") -> LoRATransformer:
        """Store the frozen base narrower than the adapter, which stays float32 and trains as before. Returns the
        model.

        ``"nf4"`` (QLoRA, ``lora/quantize.py``): every block's linear weight (q, k, v, o, fc1, fc2) in 4-bit
        NormalFloat, dequantized on the fly in each product, and the token and position embeddings (the tied
        LM head too) in bfloat16, as QLoRA keeps what it does not quantize: NF4's blocks do not tile GPT-2's
        50,257 rows, and the embedding is 38.6 M of its 124 M weights. Products stay in float32
        (:meth:`hidden_states`, :meth:`logits`, :func:`chunked_lm_loss` widen what they read).

        ``"bf16"``: the block linear weights and biases in bfloat16, the compute dtype of bf16 autocast, so a
        GPU step casts none of them (autocast casts a float32 weight that does not train in every forward);
        its products are those of the float32 base under autocast, bit for bit (the same rounding). The
        embeddings stay float32 (the residual stream starts from them, outside autocast), and so do the
        LayerNorms (autocast runs them in float32). Outside autocast each product widens its weight.

        The base fingerprint is taken first, of the full-precision weights: an adapter trained on the narrow
        base loads on the full-precision one and the other way round. The weights must be frozen (call
        :meth:`configure_lora_training` first) and unmerged; merging into the narrow base is refused.
        """
        if kind not in self.QUANTIZATIONS:
            raise ValueError(f"quantize_base takes one of {', '.join(self.QUANTIZATIONS)}, got {kind!r}")
        if self._quantization is not None:
            if self._quantization[0] != kind:
                raise ValueError(f"the base is already stored in {self._quantization[0]}, not {kind}")
            return self
        layers = [layer for _, layer in lora_modules(self)]
        if any(layer.merged for layer in layers):
            raise ValueError("unmerge the adapter before quantizing the base (merged weights hold it)")
        frozen = [layer.weight for layer in layers] + [
            layer.bias for layer in layers if layer.bias is not None
        ]
        if any(t.requires_grad for t in [*frozen, self.wte.weight, self.wpe.weight]):
            raise ValueError(f"the base's weights are being trained (full fine-tuning): a {NARROW_BASES[kind]} "
                             "base stays frozen; call configure_lora_training() first")  # fmt: skip
        if kind == "nf4":
            check_tiles({n: m.weight.shape for n, m in lora_modules(self)})  # before any layer changes
        fingerprint = self.base_fingerprint()
        self._full_precision_norms = self._fused_row_norms()
        for layer in layers:
            layer.adapter_dtype = layer.weight.dtype  # adapters made later stay in full precision
            (quantize_linear_ if kind == "nf4" else narrow_linear_)(layer)
        if kind == "nf4":
            self._set_embedding_dtype(torch.bfloat16)
        for block in self.blocks:
            block.attn._frozen_qkv.clear()
        if self.wte.weight.device.type == "cpu":
            release_freed_memory()  # the dense weights' pages back to the system, not kept by the allocator
        self._quantization = (kind, fingerprint)
        return self

    @torch.no_grad()
    def _set_embedding_dtype(self, dtype: torch.dtype) -> None:
        """Store the frozen embeddings (and so the tied LM head) in ``dtype``."""
        for emb in (self.wte, self.wpe):
            if emb.weight.dtype != dtype:
                emb.weight = nn.Parameter(emb.weight.to(dtype), requires_grad=False)
        self.lm_head.weight = self.wte.weight

    @property
    def base_quantization(self) -> str | None:
        """How the block weights are stored: ``None`` (as loaded), ``"nf4"`` or ``"bf16"`` (:meth:`quantize_base`)."""
        return None if self._quantization is None else self._quantization[0]

    # ----------------------------------------------------------------------------------------------------
    # Forward and generation

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, T)`` -> final hidden states ``(B, T, C)`` (after ``ln_f``)."""
        T = idx.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.max_seq_len}")
        pos = torch.arange(T, device=idx.device)
        dtype = self.ln_f.weight.dtype  # the computation's; a 4-bit base stores its embeddings narrower
        x = self.drop(self.wte(idx).to(dtype) + self.wpe(pos).to(dtype))  # (B, T, C)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # non-reentrant: LoRA grads flow even though x (frozen embeddings) needs no grad
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.ln_f(x)

    def forward(
        self, idx: torch.Tensor, lengths: torch.Tensor | None = None, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Language-model logits ``(B, T, vocab)``; with a classification head, class logits ``(B, classes)``.

        For classification, ``lengths`` (B,) gives each right-padded sequence's true length; the head reads
        the hidden state of the last real token (the causal mask means it has seen the whole sequence).
        With ``targets`` (B, T) a language model returns its mean loss instead, the head and cross-entropy
        computed ``loss_chunk_tokens`` tokens at a time (:meth:`lm_loss`): what training calls, through
        whatever wraps the model (DDP, ``torch.compile``).
        """
        if targets is not None:
            return self.lm_loss(idx, targets, self.loss_chunk_tokens)
        h = self.hidden_states(idx)
        if self.cls_head is None:
            return self.logits(h)
        last = (lengths - 1) if lengths is not None else torch.full((h.shape[0],), h.shape[1] - 1)
        return self.cls_head(h[torch.arange(h.shape[0], device=h.device), last.to(h.device)])  # (B, classes)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The tied LM head: hidden states ``(..., C)`` -> logits ``(..., vocab)``, in ``h``'s dtype (a 4-bit
        base's bfloat16 head is widened for the product, :func:`~lora.quantize.frozen_linear`; autocast chooses
        its own)."""
        return frozen_linear(h, self.lm_head.weight)

    def lm_loss(self, idx: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 1024) -> torch.Tensor:
        """Mean next-token cross-entropy of ``idx`` (B, T) against ``targets`` (B, T), ``-100`` not scored.

        Equal to ``F.cross_entropy(model(idx).float().reshape(-1, V), targets.reshape(-1))`` to float
        rounding, gradients included, but the tied LM head's logits exist ``chunk_tokens`` tokens at a time,
        in forward and backward alike (:func:`~lora.chunked_loss.chunked_lm_loss`).
        """
        if self.cls_head is not None:
            raise RuntimeError("lm_loss() needs a language model; this one has a classification head")
        return chunked_lm_loss(self.hidden_states(idx), self.lm_head.weight, targets, chunk_tokens)

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

        ``temperature == 0`` decodes greedily; ``top_k`` keeps the k most likely tokens. A 4-bit base is
        dequantized once for the whole call (:meth:`dense_base`), not once per token, and DoRA's row norms are
        computed once (:func:`~lora.lora_layer.fixed_dora_norms`).
        """
        if self.cls_head is not None:
            raise RuntimeError("generate() needs a language model; this one has a classification head")
        with self.dense_base(), fixed_dora_norms(self):
            return self._sample(idx, max_new_tokens, temperature, top_k, generator)

    @contextmanager
    def dense_base(self) -> Iterator[None]:
        """Within the block a narrow base's weights are dense and in the computation's dtype (dequantized or
        widened once: the same values, the memory of full precision), so that many small forwards (sampling)
        do not each dequantize or widen every weight (nor the bfloat16 LM head); after it they are the same
        narrow tensors again. Nothing happens for a base as loaded."""
        if self._quantization is None:
            yield
            return
        dtype = self.ln_f.weight.dtype
        kept = [(layer, name, tensor) for _, layer in lora_modules(self) for name in ("weight", "bias")
                if (tensor := getattr(layer, name)) is not None]  # fmt: skip
        embeddings = [(emb, emb.weight) for emb in (self.wte, self.wpe)]
        try:
            for layer, name, tensor in kept:
                setattr(layer, name, nn.Parameter(dequantize(tensor).to(dtype), requires_grad=False))
            self._set_embedding_dtype(dtype)
            yield
        finally:
            for layer, name, tensor in kept:
                setattr(layer, name, tensor)
            for emb, weight in embeddings:
                emb.weight = weight
            self.lm_head.weight = self.wte.weight
            for block in self.blocks:
                block.attn._frozen_qkv.clear()

    def _sample(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.max_seq_len :]
            logits = self.logits(self.hidden_states(ctx)[:, -1, :]).float()  # (B, vocab)
            if not torch.isfinite(logits).all():
                raise ValueError(
                    "the model's logits are not finite (inf or nan): check the adapter's weights and lora_alpha"
                )
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
        """Freeze everything but the LoRA tensors (with DoRA's magnitudes; and a classification head); return the
        statistics."""
        for name, p in self.named_parameters():
            p.requires_grad_(name.rsplit(".", 1)[-1] in TRAINED_LEAVES or name.startswith("cls_head."))
        return self.get_parameter_stats()

    def get_parameter_stats(self) -> dict:
        """Counts of total / trainable / LoRA / frozen parameters (tied weights counted once)."""
        params = dict(self.named_parameters())  # named_parameters skips the tied duplicate
        total = sum(p.numel() for p in params.values())
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        per_proj = dict.fromkeys(("q", "k", "v", "o", "ff"), 0)
        for name, layer in self.lora_layers():
            magnitude = 0 if layer.lora_magnitude is None else layer.lora_magnitude.numel()
            per_proj[target_of(name)] += layer.lora_A.numel() + layer.lora_B.numel() + magnitude
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

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict``, refused while merged before any tensor is loaded (not part way, as each
        merged layer's own refusal would): see ``LoRALinear._load_from_state_dict``."""
        if any(layer.merged for _, layer in lora_modules(self)):
            raise RuntimeError("load_state_dict into a merged model: unmerge_lora() first")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def merge_lora(self) -> LoRATransformer:
        """Fold every adapter into its base weight, in place (idempotent). Each merged layer keeps its ``W0``
        until :meth:`unmerge_lora` (one more copy of the adapted weights while merged; :meth:`merged_model`
        makes a LoRA-free copy instead), so the base and its fingerprint stay exactly what they were."""
        return merge_lora(self)

    def unmerge_lora(self) -> LoRATransformer:
        """Undo :meth:`merge_lora` (idempotent): every weight is the base's again, bit for bit."""
        return unmerge_lora(self)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes the frozen base's outputs."""
        with disable_adapter(self):
            yield

    # ----------------------------------------------------------------------------------------------------
    # The base: its tensors and fingerprint, merged copies

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """Every frozen base tensor, unmerged: no LoRA tensors, no ``cls_head``, the tied ``lm_head`` once.

        A merged layer's weight is returned as the ``W0`` it kept (``LoRALinear.base_weight``).
        """
        layers = dict(lora_modules(self))
        out = {}
        for key, value in self.state_dict().items():
            module, _, leaf = key.rpartition(".")
            if leaf in LORA_LEAVES or key.startswith("cls_head.") or key == "lm_head.weight":
                continue
            layer = layers.get(module)
            if leaf == "weight" and layer is not None and layer.merged:
                value = layer.base_weight()
            out[key] = value.detach()
        return out

    def base_fingerprint(self) -> str:
        """First 16 hex digits of a sha256 over the names, shapes and float32 values of the base tensors.

        Deterministic (sorted names, unmerged values); independent of the adapters and of a classification head.
        The values are hashed as float32, which holds fp16 and bf16 exactly: a half-precision base widened to
        float32 for training keeps its fingerprint (a float32 base's is what it always was). A 4-bit base
        (:meth:`quantize_base`) gives the fingerprint its full-precision weights had; a merged one, its ``W0``'s.
        """
        if self._quantization is not None:
            return self._quantization[1]
        h = hashlib.sha256()
        for key, value in sorted(self.base_state_dict().items()):
            t = value.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{key}|{tuple(t.shape)}|{t.dtype}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def _head_state(self) -> dict[str, torch.Tensor]:
        if self.cls_head is None:
            return {}
        return {f"cls_head.{k}": v.detach() for k, v in self.cls_head.state_dict().items()}

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Base tensors with the active adapter folded in (``LoRALinear.merged_weight``: ``W0 + scaling B A`` in
        float32, DoRA's rows rescaled, cast once). Refused for a narrow (4-bit or bf16) base, adapter or not."""
        if self._quantization is not None:
            raise ValueError(QUANTIZED_MERGE.format(kind=NARROW_BASES[self._quantization[0]]))
        layers = dict(lora_modules(self))
        tensors = self.base_state_dict()
        for key in tensors:
            module, _, leaf = key.rpartition(".")
            layer = layers.get(module)
            if leaf == "weight" and layer is not None and layer.r > 0 and layer._adapter_enabled:
                tensors[key] = layer.merged_weight().detach()
        return {**tensors, **self._head_state()}

    def merged_model(self) -> LoRATransformer:
        """A LoRA-free copy (``lora_r = 0``, eval mode) with the active adapter merged in."""
        tensors = self.merged_state_dict()
        with torch.random.fork_rng(devices=[]):  # the fresh init is overwritten; leave the caller's RNG alone
            plain = LoRATransformer.from_config(self.config)
        plain.to(device=self.wte.weight.device, dtype=self.wte.weight.dtype)
        missing, unexpected = plain.load_state_dict(tensors, strict=False)
        assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # lm_head is tied
        return plain.eval()

    # ----------------------------------------------------------------------------------------------------
    # The adapter set, in memory

    def list_adapters(self) -> list[str]:
        """Adapter names, the active one first."""
        active = self.active_adapter
        return ([active] if active else []) + sorted(self._parked)

    @property
    def active_adapter(self) -> str | None:
        """Name of the active adapter, ``None`` if there is none (layers given an adapter by hand, with
        ``reset_lora``, count as the adapter ``"default"``)."""
        if self._active is None and any(True for _ in self.lora_layers()):
            self._active = "default"
        return self._active

    def get_adapter(self, name: str | None = None) -> Adapter:
        """Adapter ``name`` (default: the active one) as an :class:`Adapter`; the active one is copied."""
        name = self.active_adapter if name is None else name
        if name is not None and name == self.active_adapter:
            return self._capture()
        if name in self._parked:
            return self._parked[name]
        raise ValueError(f"no adapter named {name!r}; the adapters are {self.list_adapters()}")

    def set_adapter(self, name: str) -> None:
        """Make adapter ``name`` active: no reload of the base, and (unmerged) base weights untouched."""
        if name == self._active:
            return
        if name not in self._parked:
            raise ValueError(f"no adapter named {name!r}; the adapters are {self.list_adapters()}")
        self._activate(name, self._parked[name])

    def delete_adapter(self, name: str) -> None:
        """Forget adapter ``name``; deleting the active one leaves the model with no adapter (the base)."""
        if name == self.active_adapter:
            self._install(None)
            self._active, self._active_extra = None, {}
        elif name in self._parked:
            del self._parked[name]
        else:
            raise ValueError(f"no adapter named {name!r}; the adapters are {self.list_adapters()}")

    def add_weighted_adapter(self, weights: Mapping[str, float], name: str) -> str:
        """Add (not activate) adapter ``name`` with ``ΔW = Σ_i w_i s_i B_i A_i`` exactly (ranks concatenated)."""
        if name in self.list_adapters():
            raise ValueError(
                f"an adapter named {name!r} exists already; delete it first or pick another name"
            )
        if not weights:
            raise ValueError("add_weighted_adapter needs at least one adapter and weight")
        sources = {n: self.get_adapter(n) for n in weights}
        self._parked[name] = weighted_sum(sources, weights, self.wte.weight.device)
        return name

    def _capture(self) -> Adapter:
        """A copy of the active adapter (an optimizer still holding the old parameters cannot change it)."""

        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().clone()

        layers = {
            name: LayerAdapter(layer.r, layer.lora_alpha, _dropout_p(layer), layer.use_rslora,
                               *(copy(getattr(layer, k)) for k in LORA_LEAVES))
            for name, layer in self.lora_layers()
        }  # fmt: skip
        head = {k[len("cls_head.") :]: v.clone() for k, v in self._head_state().items()} or None
        return Adapter(layers, head, self.lora_config, dict(self._active_extra))

    def _install(self, adapter: Adapter | None) -> None:
        """Put ``adapter`` (``None``: no adapter) in the layers, unmerged; base weights are not touched."""
        num_classes = None if adapter is None else adapter.num_classes
        config = dataclasses.replace(self.config, num_classes=num_classes)  # checked before anything changes
        self.unmerge_lora()
        layers = {} if adapter is None else adapter.layers
        with torch.no_grad():
            for name, layer in lora_modules(self):
                spec = layers.get(name)
                if spec is None:
                    layer.reset_lora(0)
                    continue
                init = adapter.settings.lora_init if spec.lora_A0 is not None else "kaiming"
                layer.reset_lora(spec.r, spec.lora_alpha, spec.lora_dropout, spec.use_rslora,
                                 spec.lora_magnitude is not None, init)  # fmt: skip
                for leaf in LORA_LEAVES:
                    if getattr(spec, leaf) is not None:
                        getattr(layer, leaf).copy_(getattr(spec, leaf))
            head = None if adapter is None else adapter.cls_head
            if head is None:
                self.cls_head = None
            else:
                n, d = head["weight"].shape
                if self.cls_head is None or self.cls_head.weight.shape != (n, d):
                    w = self.ln_f.weight  # the computation's dtype (a 4-bit base's embedding is narrower)
                    self.cls_head = nn.Linear(d, n, device=w.device, dtype=w.dtype)
                self.cls_head.load_state_dict(head)
        self.config = config
        self.lora_config = LoRAConfig(lora_r=0, lora_targets=()) if adapter is None else adapter.settings

    def _activate(self, name: str, adapter: Adapter) -> None:
        """Park the active adapter and put ``adapter`` in the layers as ``name``; if that fails, the model is
        left as it was. A merged model is unmerged, switched and merged again (float rounding applies)."""
        was_merged = any(layer.merged for _, layer in lora_modules(self))
        self.unmerge_lora()
        active = self.active_adapter
        previous = self._capture() if active is not None else None
        try:
            self._install(adapter)
        except BaseException:
            self._install(previous)
            raise
        finally:
            if was_merged:
                self.merge_lora()
        if active is not None:
            self._parked[active] = previous
        self._parked.pop(name, None)
        self._active, self._active_extra = name, dict(adapter.extra)

    def _check_adapter_tensors(
        self,
        tensors: Mapping[str, torch.Tensor],
        ranks: Mapping[str, int],
        num_classes: int | None,
        where: object,
        modules_where: object = None,
        settings: LoRAConfig | None = None,
    ) -> None:
        """Refuse adapter ``tensors`` unless they are exactly ``ranks``' modules (LoRA layers of this model)
        with ``A: (r, in)``, ``B: (out, r)`` (and as ``settings`` say DoRA's ``lora_magnitude: (out,)``,
        PiSSA/OLoRA's ``lora_A0: (r, in)``, ``lora_B0: (out, r)``), plus a head for ``num_classes``.
        Messages start with ``where`` (``modules_where`` for a module this model lacks)."""
        leaves = ("lora_A", "lora_B") if settings is None else settings.leaves
        layers = dict(lora_modules(self))
        expected = {}
        for m, r in ranks.items():
            layer = layers.get(m)
            if layer is None:
                raise ValueError(
                    f"{modules_where or where}: module {quote(m)} is not a LoRA layer of this model"
                )
            shapes = {"lora_A": (r, layer.in_features), "lora_B": (layer.out_features, r),
                      "lora_magnitude": (layer.out_features,), "lora_A0": (r, layer.in_features),
                      "lora_B0": (layer.out_features, r)}  # fmt: skip
            expected.update({f"{m}.{k}": torch.empty(shapes[k]) for k in leaves})
        if num_classes is not None:
            d = self.config.d_model
            expected.update(
                {"cls_head.weight": torch.empty(num_classes, d), "cls_head.bias": torch.empty(num_classes)}
            )
        problem = describe_mismatch(tensors, expected)
        if problem:
            raise ValueError(f"{where}: {problem}")

    def check_adapter_fits(self, folder: AdapterFolder, force: bool = False) -> list[str]:
        """Raise ``ValueError`` if the adapter's base differs from this one; return warnings (with ``force``).

        Other shapes always refuse; the same shapes with other weights (fingerprint) refuse unless ``force``.
        """
        own = self.config.shape()
        diff = [
            f"{k}: adapter {quote(folder.base.get(k))}, model {v!r}"
            for k, v in own.items()
            if folder.base.get(k) != v
        ]
        if diff:
            raise ValueError("adapter was trained on a base of another architecture: " + "; ".join(diff))
        fingerprint = self.base_fingerprint()
        if folder.base_fingerprint != fingerprint:
            msg = (f"adapter was trained on other base weights (fingerprint {folder.base_fingerprint}, "
                   f"this base {fingerprint})")  # fmt: skip
            init = folder.settings.lora_init
            if init in BASE_DERIVED_INITS:  # its B0 A0 is that base's principal part: wrong on any other
                raise ValueError(f"{msg}; a lora_init {init} adapter trains on the residual of the base it was "
                                 "made from and works only on that base (--force cannot apply it to another)")  # fmt: skip
            if not force:
                raise ValueError(msg + "; pass force=True (--force) to load it anyway")
            return [msg + "; loaded anyway (force)"]
        return []

    def adapter_from_folder(self, folder: AdapterFolder) -> Adapter:
        """The adapter a folder holds, its modules and tensor shapes checked against this model."""
        ranks = {m: r for m, (r, _) in folder.modules.items()}
        # a module this model lacks is the config's fault; a missing or mis-shaped tensor the weights file's
        self._check_adapter_tensors(folder.tensors, ranks, folder.num_classes, folder.weights_path,
                                    folder.config_path, folder.settings)  # fmt: skip
        return folder.to_adapter()

    # ----------------------------------------------------------------------------------------------------
    # On disk (the formats are lora/formats.py's)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the base model (``config.json`` + ``model.safetensors``, no LoRA tensors) to ``path``."""
        if self._quantization is not None:
            raise ValueError(f"a {NARROW_BASES[self._quantization[0]]} base is not saved: its weights are rounded; "
                             "save the full-precision base it was made from")  # fmt: skip
        return write_model_folder(path, self.config, {**self.base_state_dict(), **self._head_state()})

    @classmethod
    def from_pretrained(cls, path: str | Path, **lora_options: object) -> LoRATransformer:
        """A model with the architecture and weights saved in ``path`` and the given LoRA options.

        ``path`` is a model folder of this project's or a Hugging Face GPT-2 folder (:meth:`from_gpt2`).

        ``lora_options`` are any of ``lora_r, lora_alpha, lora_dropout, lora_targets, adapt_attention,
        adapt_feedforward, use_rslora, use_dora, lora_init, num_classes, dropout``. A saved classification head is loaded when
        ``num_classes`` matches it; another ``num_classes`` gets a fresh head. The model takes the file's
        dtype when all its floating tensors share one.
        """
        options, header = cls.check_pretrained(path, **lora_options)
        with deferred_base_init():  # no PiSSA/OLoRA SVDs of the random weights about to be replaced
            model = cls(**options)
        weights = read_gpt2_weights(path) if is_hf_folder(path) else read_model_weights(path)
        tensors = {k: v for k, v in weights.items() if k in header}
        for key, value in tensors.items():  # else the first step "diverges", and the learning rate is blamed
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise ValueError(f"{path}: the weights hold non-finite values (nan or inf): {key} has {bad:,} of "
                                 f"{value.numel():,}; the file is damaged, or was saved from a diverged run")  # fmt: skip
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) == 1 and (dtype := dtypes.pop()) != torch.float32:
            model.to(dtype)
        own = model.state_dict()
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value)
        model.init_adapter_from_base()  # PiSSA/OLoRA factors and DoRA magnitudes of these weights
        return model

    @classmethod
    def from_gpt2(cls, path: str | Path, **lora_options: object) -> LoRATransformer:
        """A model from a local Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors`` or
        ``pytorch_model.bin``), with the given LoRA options; nothing is fetched. The names, the fused
        ``c_attn`` and the ``Conv1D`` layout are converted as ``lora/gpt2.py`` describes."""
        gpt2_model_config(path)  # another kind of folder is refused, naming what it is
        return cls.from_pretrained(path, **lora_options)

    @classmethod
    def check_pretrained(
        cls, path: str | Path, **lora_options: object
    ) -> tuple[dict, dict[str, torch.Tensor]]:
        """Check a model folder before anything is allocated: its ``config.json`` against its weights file's
        header (names, shapes, dtypes), on a model built on the ``meta`` device. Returns the constructor's
        options and the header of the tensors to load; a folder that does not fit raises a one-line
        ``ValueError``."""
        unknown = sorted(set(lora_options) - set(FROM_PRETRAINED_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown from_pretrained options {unknown}; expected some of {list(FROM_PRETRAINED_OPTIONS)}"
            )
        if is_hf_folder(path):  # a Hugging Face GPT-2 folder, checked in GPT-2's names and converted
            arch = gpt2_model_config(path)
            header = read_gpt2_header(path, arch)
        else:
            arch = read_model_config(path)
            header = read_model_header(path)  # names, shapes, dtypes: nothing read or allocated yet
        # the blocks first: even on the meta device, a model of 10**8 blocks would take minutes to build
        blocks = {k.split(".")[1] for k in header if k.startswith("blocks.")}
        if len(blocks) != arch.num_layers:
            raise ValueError(f"{Path(path) / WEIGHTS_NAME} holds {len(blocks)} blocks, but {CONFIG_NAME} says "
                             f"num_layers {arch.num_layers}")  # fmt: skip
        options = {**arch.to_dict(), **lora_options}
        try:
            with (
                torch.device("meta"),
                deferred_base_init(),
            ):  # the expected tensors, none allocated or derived
                probe = cls(**options)
        except ValueError as e:
            raise ValueError(f"{Path(path) / CONFIG_NAME}: cannot build the model ({e})") from None
        expected = probe.base_state_dict()
        if probe.cls_head is not None and probe.config.num_classes == arch.num_classes:
            expected.update(probe._head_state())
        else:  # no head asked for, or another number of classes: a saved head is not loaded
            header = {k: v for k, v in header.items() if not k.startswith("cls_head.")}
        problem = describe_mismatch(header, expected)
        if problem:  # a config.json that disagrees with the weights is refused before the model is built
            raise ValueError(f"{Path(path) / WEIGHTS_NAME}: {problem}")
        return options, header

    def save_adapter(
        self, path: str | Path, adapter_name: str | None = None, extra: dict | None = None
    ) -> Path:
        """Write adapter ``adapter_name`` (default: the active one) to the folder ``path``.

        ``extra`` facts (task, run, ...) go into ``adapter_config.json`` beside the settings, the per-module
        ranks, the base's architecture and fingerprint and the project's version.
        """
        name = self.active_adapter if adapter_name is None else adapter_name
        adapter = self.get_adapter(name)
        adapter = dataclasses.replace(adapter, extra={**adapter.extra, **(extra or {})})
        return write_adapter_folder(
            path, adapter, name, self.config, self.base_fingerprint(), self.base_quantization
        )

    def load_adapter(self, path: str | Path, adapter_name: str = "default", force: bool = False) -> str:
        """Load the adapter in ``path`` as ``adapter_name`` and make it active; returns the name.

        Refuses (``ValueError`` saying what differs) an adapter made for a base of another architecture, or
        for other base weights (fingerprint); ``force=True`` skips only the fingerprint check. The adapter
        may have another rank, targets or head than the model had: layers are reconfigured.

        ``path`` may also be a Hugging Face PEFT LoRA folder for GPT-2 (its ``adapter_config.json`` names a
        ``peft_type``; converted by ``lora/peft_format.py``). PEFT records no fingerprint of the base
        weights, so only the shapes can be checked: loading it on another GPT-2 of the same shape succeeds.
        """
        if is_peft_folder(path):
            adapter = adapter_from_peft(path, self.config, self._fused_row_norms())
            ranks = {m: s.r for m, s in adapter.layers.items()}
            self._check_adapter_tensors(adapter.tensors(), ranks, None, path, settings=adapter.settings)
            self._activate(adapter_name, adapter)
            return adapter_name
        folder = read_adapter_folder(path)
        for w in self.check_adapter_fits(folder, force):
            warnings.warn(w, stacklevel=2)
        self._activate(adapter_name, self.adapter_from_folder(folder))
        return adapter_name

    def export_peft(
        self, path: str | Path, adapter_name: str | None = None, base_model_name_or_path: str | None = None
    ) -> Path:
        """Write adapter ``adapter_name`` (default: the active one) as a Hugging Face PEFT LoRA folder:
        ``PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), path)`` then computes this model's
        logits (q, k, v fused into ``c_attn``: ``lora/peft_format.py``). An adapter with a head is refused."""
        name = self.active_adapter if adapter_name is None else adapter_name
        adapter = self.get_adapter(name)
        return write_peft_folder(path, adapter, self.config, base_model_name_or_path, self._fused_row_norms())

    def _fused_row_norms(self) -> dict[str, torch.Tensor]:
        """``||W0||_row`` (float32, (C,)) of every q, k, v projection: the DoRA magnitude that leaves a
        projection unchanged, for the rows of PEFT's fused ``c_attn`` that an adapter does not train. Those of
        the full-precision weights, also for a 4-bit base (PEFT loads the adapter on the full-precision one)."""
        if self._full_precision_norms is not None:
            return dict(self._full_precision_norms)
        return {name: layer.base_weight().detach().float().norm(dim=1)
                for name, layer in lora_modules(self) if name.endswith(("q_proj", "k_proj", "v_proj"))}  # fmt: skip

    def merge_and_export(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write a LoRA-free model folder with the active adapter merged; this model is left unchanged.

        ``from_pretrained(path)`` gives a model whose logits equal base + adapter (to float rounding).
        """
        merged = {"merged_adapter": {"name": self._active, **(extra or {})}}
        return write_model_folder(path, self.config, self.merged_state_dict(), merged)


def _dropout_p(layer: LoRALinear) -> float:
    return float(layer.lora_dropout.p) if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


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
    print(f"LoRA on {list(model.lora_config.lora_targets)} of every attention block\n")
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
