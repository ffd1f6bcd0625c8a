"""The architecture: a decoder-only transformer, readable on its own (no adapter set, no files).

Token embeddings (+ learned position embeddings), ``num_layers`` pre-norm blocks (causal self-attention
with separate ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, the first three computed in one fused path;
an MLP), a final norm and an LM head, optionally a classification head over the last token. What differs
between decoder families are :class:`ModelConfig`'s family fields, and the modules branch on them:

==============  ==============================================  ===========================================
field           GPT-2 (the defaults)                            Llama, Mistral, Qwen, Gemma, Phi-3
==============  ==============================================  ===========================================
``norm``        LayerNorm (weight, bias)                        RMSNorm (weight)
``mlp``         ``fc2(gelu(fc1(x)))``                           ``down_proj(silu(gate_proj(x)) * up_proj(x))``
``positions``   learned ``wpe`` added to ``wte``                rotary: q and k rotated (``rope_theta``)
kv heads        ``num_kv_heads = num_heads``                    fewer: each serves a group of query heads
``head_dim``    ``d_model / num_heads``                         Qwen3, Gemma: its own; Qwen3 norms q and k
Gemma           --                                              RMSNorm by ``1 + w``; ``wte`` x sqrt(C); GeGLU
``bias``        on every projection                             none (Qwen2: on q, k, v: ``qkv_bias``)
``tied_head``   the LM head is ``wte``                          its own weight (or tied)
==============  ==============================================  ===========================================

Every block projection is a :class:`~lora.lora_layer.LoRALinear` whose shape comes from
:meth:`ModelConfig.projection_shapes`; the ones not adapted have ``r = 0`` and are plain linear layers.
:class:`Decoder` is the module: ``forward``, ``logits``, ``lm_loss``, ``generate`` (and ``stream``: its tokens
one step at a time; ``adapter_names``: a row each its own adapter). The model that owns adapters, stores its base
narrower and reads and writes folders is :class:`~lora.lora_transformer.LoRATransformer`, built on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora.chunked_loss import chunked_lm_loss
from lora.decoder_ops import RMSNorm, rotate
from lora.fused_qkv import FrozenConcat, can_fuse, fused_lora_linear
from lora.lora_layer import LORA_LEAVES, LoRALinear
from lora.model_config import PROJECTIONS, LoRAConfig, ModelConfig
from lora.quantize import frozen_linear

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "MLP",
    "Block",
    "CausalSelfAttention",
    "Decoder",
    "KVCache",
    "packed_attention",
]


def _linear(config: ModelConfig, name: str, lora: LoRAConfig, adapted: bool) -> LoRALinear:
    """Block projection ``name`` (``"attn.q_proj"``, ...) of ``config``'s shape, with ``lora``'s adapter if
    ``adapted``, else a plain one (``r = 0``)."""
    d_out, d_in = config.projection_shapes()[name]
    r = lora.lora_r if adapted else 0
    bias = config.bias or (config.qkv_bias and name in ("attn.q_proj", "attn.k_proj", "attn.v_proj"))
    return LoRALinear(d_in, d_out, r, lora.lora_alpha, lora.lora_dropout, bias=bias,
                      use_rslora=lora.use_rslora, use_dora=lora.use_dora, lora_init=lora.lora_init)  # fmt: skip


class RMSNormPlusOne(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + weight)`` over the last dimension, in float32, cast back to
    ``x``'s dtype; ``weight`` starts at 0 (the identity scale)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim) -> (..., dim)``."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def _norm(config: ModelConfig) -> nn.Module:
    """The family's normalisation over ``d_model``: LayerNorm (weight, bias), RMSNorm (weight only), or
    Gemma's (scaled by ``1 + weight``)."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.layer_norm_eps)
    if config.norm == "rmsnorm_plus_one":
        return RMSNormPlusOne(config.d_model, config.layer_norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)


def rotary_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The rotary frequencies ``f_i = theta^(-2i / hs)``, i < hs / 2, float32 ``(hs / 2,)``; scaled as
    ``scaling`` says (:data:`~lora.model_config.ROPE_SCALINGS`): ``linear`` divides them all by ``factor``;
    ``llama3`` divides those of wavelength ``2 pi / f`` above ``L / low_freq_factor`` (``L`` the original
    context) by ``factor``, keeps those below ``L / high_freq_factor``, and between them blends
    ``(1 - s) f / factor + s f`` with ``s = (L / wavelength - low) / (high - low)``."""
    freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / freq
    scaled = torch.where(wavelength > context / low, freq / factor, freq)
    s = (context / wavelength - low) / (high - low)
    blended = (1 - s) * scaled / factor + s * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, blended, scaled)


def rotary_cos_sin(positions: torch.Tensor, freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding (RoFormer): for positions ``(T,)`` (or ``(B, T)``: packed rows) and frequencies
    ``(hs / 2,)`` (:func:`rotary_frequencies`) the ``cos`` and ``sin`` ``(..., T, hs / 2)`` of the angles
    ``p f_i``, in float32, for :func:`~lora.decoder_ops.rotate` (which pairs element ``i`` of a head with
    ``i + hs / 2``, the layout Llama's weights use). Computed once per forward, for every block."""
    angles = positions.float()[..., None] * freq.to(positions.device)  # (..., T, hs / 2)
    return angles.cos(), angles.sin()


def packed_attention(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of several sequences, ``segment_ids`` ``(B, T)`` numbering them along each row (a sequence's tokens
    are contiguous) -> ``(positions (B, T), mask (B, 1, T, T))``: each token's position from its sequence's
    first token, and ``mask[b, 0, i, j] = j <= i and segment_ids[b, j] == segment_ids[b, i]`` (block-diagonal
    causal: a token never sees another sequence's)."""
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)
    first = torch.ones_like(segment_ids, dtype=torch.bool)
    first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]  # (B, T) where a sequence starts
    starts = torch.cummax(torch.where(first, index, 0), dim=1).values  # (B, T) its sequence's first index
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return index - starts, (same & causal)[:, None]


class KVCache:
    """The keys and values of the tokens a generation has seen, per block: ``(B, nkv, T, hs)`` each, before
    grouped-query heads are repeated. ``length`` is ``T``; the next token's position."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def extend(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``index``'s keys and values with the new ``k``, ``v`` ``(B, nkv, T_new, hs)`` appended."""
        if self.keys[index] is not None:
            k = torch.cat([self.keys[index], k], dim=2)
            v = torch.cat([self.values[index], v], dim=2)
        self.keys[index], self.values[index] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate Q, K, V and output projections.

    ``q_proj``, ``k_proj``, ``v_proj`` own their parameters, but with ``fused_qkv`` (the default) they are
    computed together: one product against their stacked frozen weights, one against their stacked A's
    (``lora/fused_qkv.py``). Cases it does not cover (base weights being trained, as in full fine-tuning)
    and ``fused_qkv = False`` take one product per projection.
    """

    def __init__(self, config: ModelConfig, lora: LoRAConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim, self.qk_norm = config.head_dim, config.qk_norm
        self.rotary = config.positions == "rotary"
        self.dropout = config.dropout
        for name in PROJECTIONS.values():
            setattr(self, name, _linear(config, f"attn.{name}", lora, lora.adapts(f"attn.{name}")))
        if config.qk_norm:  # Qwen3: each head of q and of k normalised (RMSNorm over head_dim), then rotated
            self.q_norm = RMSNorm(config.head_dim, eps=config.layer_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, eps=config.layer_norm_eps)
        self.resid_drop = nn.Dropout(config.dropout)
        self.fused_qkv = True
        # the stacked frozen q/k/v weights and biases; the layers' own become views of it
        self._frozen_qkv = FrozenConcat(adopt=True)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        index: int = 0,
        start: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, T, C) -> (B, T, C)``; with ``num_kv_heads < num_heads`` each key/value head serves
        ``num_heads / num_kv_heads`` query heads (grouped-query attention, SDPA's ``enable_gqa``: the keys
        and values are not copied per group). With a ``cache`` (generation) the ``T`` tokens sit at positions
        ``start ...`` and attend to the cached ones too (block ``index``'s keys and values, extended by
        theirs): a whole prompt from ``start = 0``, then one token at a time. ``rope``: rotary positions'
        ``cos`` and ``sin`` ``(T, hs / 2)`` of those positions (:func:`rotary_cos_sin`, made once for all
        the blocks by :meth:`Decoder.hidden_states`; ``(B, 1, T, hs / 2)`` for packed rows). ``mask`` ``(B, 1, T, T)``:
        rows packed with several sequences (training only), True where a token may attend: its own sequence's
        earlier tokens (:func:`packed_attention`); ``None``: causal."""
        B, T = x.shape[:2]
        nh, nkv, hs = self.num_heads, self.num_kv_heads, self.head_dim  # (nh hs = C unless head_dim is set)
        layers = (self.q_proj, self.k_proj, self.v_proj)
        if self.fused_qkv and can_fuse(layers):  # (B, T, nh hs), 2 x (B, T, nkv hs)
            q, k, v = fused_lora_linear(x, layers, self._frozen_qkv).split(
                [nh * hs, nkv * hs, nkv * hs], dim=2
            )
        else:
            q, k, v = (layer(x) for layer in layers)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            if rope is None:
                raise ValueError("rotary positions need rope: the cos and sin of the tokens' positions")
            cos, sin = rope  # (T, hs / 2), or (B, 1, T, hs / 2) for packed rows
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:  # (B, nkv, start + T, hs): the keys and values so far
            k, v = cache.extend(index, k, v)
        if start and T != 1:
            raise ValueError("a cached step takes one token at a time")
        # one new token attends to every cached one: no mask; packed rows: the block-diagonal causal mask
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=start == 0 and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=nkv != nh,  # query head h reads key/value head h // (nh / nkv)
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, nh hs)
        return self.resid_drop(self.o_proj(y))


ACTIVATION_FUNCTIONS = {
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # GPT-2's "gelu_new"
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """``fc2(act(fc1(x)))`` (plain), or ``down_proj(act(gate_proj(x)) * up_proj(x))`` (gated: SwiGLU with
    ``silu``); ``act`` is GPT-2's tanh-approximated GELU unless the config says otherwise."""

    def __init__(self, config: ModelConfig, lora: LoRAConfig) -> None:
        super().__init__()
        self.act = ACTIVATION_FUNCTIONS[config.activation]
        self.gated = config.mlp == "gated"
        for name in config.projection_shapes():
            if name.startswith("mlp."):
                setattr(self, name[len("mlp.") :], _linear(config, name, lora, lora.adapts(name)))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        if self.gated:
            return self.drop(self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: ModelConfig, lora: LoRAConfig) -> None:
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config, lora)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config, lora)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        index: int = 0,
        start: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, T, C) -> (B, T, C)`` (``cache``, ``index``, ``start``, ``rope``, ``mask``:
        :meth:`CausalSelfAttention.forward`)."""
        x = x + self.attn(self.ln_1(x), cache, index, start, rope, mask)
        return x + self.mlp(self.ln_2(x))


class Decoder(nn.Module):
    """Embeddings -> blocks -> final norm -> head, for ``config``, with ``lora``'s adapters in the blocks.

    ``wte`` ``(V, C)``, ``wpe`` ``(max_seq_len, C)``, ``blocks``, ``ln_f``, ``lm_head`` (tied to ``wte``) and,
    with ``config.num_classes``, ``cls_head`` ``(classes, C)``. Setting ``gradient_checkpointing = True``
    stores only each block's input in training and recomputes the rest in backward: less activation memory
    for long sequences, about one more forward. ``fused_qkv = False`` computes q, k, v as three products
    instead of one fused path (same results to float rounding; for comparisons). ``loss_chunk_tokens`` is
    how many tokens' logits exist at once in :meth:`lm_loss`.
    """

    def __init__(self, config: ModelConfig, lora: LoRAConfig) -> None:
        super().__init__()
        lora.check_family(config)  # a target this architecture lacks (gate on GPT-2) is refused, not ignored
        self.config, self.lora_config = config, lora
        # Recompute each block's activations in backward instead of storing them (long sequences).
        self.gradient_checkpointing = False
        # tokens whose logits exist at once in forward(..., targets=...): the LM loss without the whole logits
        self.loss_chunk_tokens = 1024
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        learned = config.positions == "learned"  # (else rotary: q and k rotated in each attention)
        self.wpe = nn.Embedding(config.max_seq_len, config.d_model) if learned else None
        # rotary frequencies (hs / 2,): a plain attribute, not a buffer: no state-dict key, and
        # model.to(bfloat16) does not round it; moved to the input's device at its first forward there
        self.rope_freq = (None if learned else
                          rotary_frequencies(config.head_dim, config.rope_theta, config.rope_scaling))  # fmt: skip
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, lora) for _ in range(config.num_layers))
        self.ln_f = _norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tied_head:
            self.lm_head.weight = self.wte.weight  # tied, as GPT-2
        num_classes = config.num_classes
        self.cls_head = nn.Linear(config.d_model, num_classes) if num_classes else None
        self._init_weights()

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

    def embeddings(self) -> list[nn.Embedding]:
        """The embedding tables: the tokens' (``wte``, also the tied LM head) and the learned positions'."""
        return [self.wte] + ([self.wpe] if self.wpe is not None else [])

    def is_base_key(self, key: str) -> bool:
        """Whether state-dict ``key`` is a frozen base tensor: not a LoRA tensor, not the classification head,
        and not a tied LM head (stored once, as ``wte.weight``)."""
        leaf = key.rpartition(".")[2]
        tied = key == "lm_head.weight" and self.config.tied_head
        return leaf not in LORA_LEAVES and not key.startswith("cls_head.") and not tied

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), the residual projections N(0, 0.02 / sqrt(2 L)); LoRA tensors untouched."""
        residual = tuple(name.rsplit(".", 1)[-1] for name in self.config.RESIDUAL_PROJECTIONS)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, LoRALinear, nn.Embedding)):
                small = name.endswith(residual)
                std = 0.02 / math.sqrt(2 * self.config.num_layers) if small else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def hidden_states(
        self, idx: torch.Tensor, cache: KVCache | None = None, segment_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids ``(B, T)`` -> final hidden states ``(B, T, C)`` (after ``ln_f``). With a ``cache`` the
        tokens follow the ones it holds (and are added to it): generation's prompt, then one at a time.
        ``segment_ids`` ``(B, T)``: packed rows (:func:`packed_attention`), each sequence on its own."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.length
        if start + T > self.max_seq_len:
            raise ValueError(f"sequence length {start + T} exceeds max_seq_len {self.max_seq_len}")
        dtype = self.ln_f.weight.dtype  # the computation's; a 4-bit base stores its embeddings narrower
        x = self.wte(idx).to(dtype)  # (B, T, C)
        if self.config.scale_embeddings:  # Gemma: sqrt(d_model), rounded to the computation's dtype first
            x = x * torch.tensor(self.config.d_model**0.5, dtype=x.dtype)
        positions, mask = torch.arange(start, start + T, device=idx.device), None  # (T,)
        if (
            segment_ids is not None
        ):  # packed rows: (B, T) positions from each sequence's start, (B, 1, T, T) mask
            positions, mask = packed_attention(segment_ids.to(idx.device))
        if self.wpe is not None:
            x = x + self.wpe(positions).to(dtype)
        x = self.drop(x)
        rope = None  # rotary positions' cos and sin (T, hs / 2), once for every block
        if self.rope_freq is not None:
            if self.rope_freq.device != idx.device:  # moved once, not copied to the device every forward
                self.rope_freq = self.rope_freq.to(idx.device)
            rope = rotary_cos_sin(positions, self.rope_freq)
            if mask is not None:  # (B, 1, T, hs / 2): one row's positions for all its heads
                rope = (rope[0][:, None], rope[1][:, None])
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, cache, i, start, rope)
            elif self.gradient_checkpointing and torch.is_grad_enabled():
                # non-reentrant: LoRA grads flow even though x (frozen embeddings) needs no grad
                x = checkpoint(block, x, None, 0, 0, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope=rope, mask=mask)
        return self.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        lengths: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Language-model logits ``(B, T, vocab)``; with a classification head, class logits ``(B, classes)``.

        For classification, ``lengths`` (B,) gives each right-padded sequence's true length; the head reads
        the hidden state of the last real token (the causal mask means it has seen the whole sequence).
        With ``targets`` (B, T) a language model returns its mean loss instead, the head and cross-entropy
        computed ``loss_chunk_tokens`` tokens at a time (:meth:`lm_loss`): what training calls, through
        whatever wraps the model (DDP, ``torch.compile``). ``segment_ids`` ``(B, T)``: rows packed with several
        sequences, numbered along each row; a token attends only to its own sequence's earlier tokens and its
        position counts from its sequence's start (:func:`packed_attention`), so each sequence's logits are
        the ones it has alone.
        """
        if targets is not None:
            return self.lm_loss(idx, targets, self.loss_chunk_tokens, segment_ids)
        h = self.hidden_states(idx, segment_ids=segment_ids)
        if self.cls_head is None:
            return self.logits(h)
        last = (lengths - 1) if lengths is not None else torch.full((h.shape[0],), h.shape[1] - 1)
        return self.cls_head(h[torch.arange(h.shape[0], device=h.device), last.to(h.device)])  # (B, classes)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head: hidden states ``(..., C)`` -> logits ``(..., vocab)``, in ``h``'s dtype (a 4-bit
        base's bfloat16 head is widened for the product, :func:`~lora.quantize.frozen_linear`; autocast chooses
        its own)."""
        return frozen_linear(h, self.lm_head.weight)

    def lm_loss(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor,
        chunk_tokens: int = 1024,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy of ``idx`` (B, T) against ``targets`` (B, T), ``-100`` not scored.

        Equal to ``F.cross_entropy(model(idx).float().reshape(-1, V), targets.reshape(-1))`` to float
        rounding, gradients included, but the tied LM head's logits exist ``chunk_tokens`` tokens at a time,
        in forward and backward alike (:func:`~lora.chunked_loss.chunked_lm_loss`).
        """
        if self.cls_head is not None:
            raise RuntimeError("lm_loss() needs a language model; this one has a classification head")
        hidden = self.hidden_states(idx, segment_ids=segment_ids)
        return chunked_lm_loss(hidden, self.lm_head.weight, targets, chunk_tokens)

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        adapter_names: Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """Append up to ``max_new_tokens`` sampled tokens to ``idx`` (B, T) -> (B, T + n), n <= max_new_tokens.

        ``temperature == 0`` decodes greedily; ``top_k`` keeps the k most likely tokens. With ``eos_token_id``
        (an id or several), a row that has produced one of them is finished: its later tokens are the first
        EOS id, and the call returns as soon as every row is finished (n < max_new_tokens), as transformers'
        ``generate(eos_token_id=..., pad_token_id=<the first EOS id>)`` does. The prompt's keys and
        values are computed once and kept (:class:`KVCache`), so each new token costs one token's work;
        once the sequence fills ``max_seq_len`` positions, each step reads the last ``max_seq_len`` tokens
        afresh (the window slides). The whole call runs under :meth:`generation_context`.
        ``adapter_names`` (one per row, ``None`` or ``"base"``: no adapter) gives each row its own adapter
        (:meth:`per_row_adapters`). The tokens are :meth:`stream`'s, collected.
        """
        steps = list(
            self.stream(idx, max_new_tokens, temperature, top_k, generator, eos_token_id, adapter_names)
        )
        return torch.cat([idx, *(t[:, None] for t in steps)], dim=1)

    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        adapter_names: Sequence[str | None] | None = None,
    ) -> Iterator[torch.Tensor]:
        """:meth:`generate`'s tokens one step at a time, as they are made: each item is the next token of every
        row, ``(B,)`` (a finished row's is the first EOS id). The arguments are checked at once; the model stays
        in :meth:`generation_context` (and with ``adapter_names`` in its per-row adapters) until the iterator
        ends or is closed (``close()``, or dropped), which restores it. Gradients are off for each step only,
        not for the caller's code between steps."""
        if self.cls_head is not None:
            raise RuntimeError("generate() needs a language model; this one has a classification head")
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        vocab = self.config.vocab_size
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in eos):
            raise ValueError(f"eos_token_id must be token ids in [0, {vocab}), got {eos_token_id!r}")
        if adapter_names is not None and len(adapter_names) != idx.shape[0]:
            raise ValueError(f"adapter_names must name one adapter per row: {idx.shape[0]} rows, "
                             f"{len(adapter_names)} names")  # fmt: skip
        rows = nullcontext() if adapter_names is None else self.per_row_adapters(adapter_names)
        return self._steps(
            idx, max_new_tokens, temperature, top_k, generator, eos, [self.generation_context(), rows]
        )

    def generation_context(self) -> AbstractContextManager:
        """What :meth:`generate` runs under, once for all its steps: nothing here (a model that stores its
        base narrower makes it dense for the call)."""
        return nullcontext()

    def per_row_adapters(self, names: Sequence[str | None]) -> AbstractContextManager:
        """A block where row ``i`` of every batch is computed with adapter ``names[i]``: the model's adapter set's
        (``self.adapters.per_row``, :mod:`lora.multi_adapter`); a decoder without one refuses."""
        adapters = getattr(self, "adapters", None)
        if adapters is None:
            raise ValueError("adapter_names needs a model with an adapter set (LoRATransformer)")
        return adapters.per_row(names)

    def _steps(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
        eos_ids: Sequence[int],
        contexts: Sequence[AbstractContextManager] = (),
    ) -> Iterator[torch.Tensor]:
        """The steps of :meth:`stream`, within ``contexts`` (entered at the first step, left at the last)."""
        with ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            eos = torch.tensor(eos_ids, dtype=torch.long, device=idx.device) if eos_ids else None
            # (B,) whether a row is past its EOS
            finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
            cache = KVCache(len(self.blocks))
            with torch.no_grad():
                h = self.hidden_states(idx[:, -self.max_seq_len :], cache)  # the prompt, once
            for step in range(max_new_tokens):
                with torch.no_grad():
                    nxt = self._next_token(h, temperature, top_k, generator)  # (B, 1)
                # a finished row continues with EOS; a row that produces an EOS is finished
                if eos is not None:
                    nxt = torch.where(finished[:, None], eos[0], nxt)  # (B, 1)
                    finished |= torch.isin(nxt[:, 0], eos)
                idx = torch.cat([idx, nxt], dim=1)
                yield nxt[:, 0]
                if step == max_new_tokens - 1 or (eos is not None and bool(finished.all())):
                    break
                with torch.no_grad():
                    if cache is not None and cache.length < self.max_seq_len:  # a position left: one token
                        h = self.hidden_states(nxt, cache)
                    else:  # the window is full: it slides, and the last max_seq_len tokens are read afresh
                        cache = None
                        h = self.hidden_states(idx[:, -self.max_seq_len :])

    def _sample(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
        eos_ids: Sequence[int] = (),
    ) -> torch.Tensor:
        """:meth:`generate`'s result without :meth:`generation_context` (each forward as the model is): for
        comparisons."""
        steps = list(self._steps(idx, max_new_tokens, temperature, top_k, generator, eos_ids))
        return torch.cat([idx, *(t[:, None] for t in steps)], dim=1)

    def _next_token(
        self, h: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The next token of each row, ``(B, 1)``, from the last hidden state ``h`` (B, T, C)."""
        logits = self.logits(h[:, -1, :]).float()  # (B, vocab)
        if not torch.isfinite(logits).all():
            raise ValueError(
                "the model's logits are not finite (inf or nan): check the adapter's weights and lora_alpha"
            )
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
