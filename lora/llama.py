"""Hugging Face Llama-layout folders (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2/2.5, Qwen3, Gemma) read
as this project's models.

A family importer, a pure converter as ``lora/gpt2.py`` is: the ``config.json`` dict ->
:class:`ModelConfig`, the names a checkpoint holds, its tensors -> this model's. It reads nothing itself
(``lora/pretrained.py`` does). The layout is the decoder's with the family fields RMSNorm, a gated (SwiGLU)
MLP, rotary positions, grouped-query attention, no biases (Qwen2: on q, k, v), a separate or tied head
(Qwen3: a head size of its own and an RMSNorm over each head of q and k; Gemma: RMSNorm scaled by
``1 + weight``, the embeddings times ``sqrt(hidden_size)``, a GeGLU MLP), so converting is a renaming (no transpose: Llama's ``nn.Linear`` weights are ``(out, in)`` as ours):

=============================================  ======================================
Llama (``model.`` prefix)                        here
=============================================  ======================================
``embed_tokens``                                 ``wte``
``layers.{i}.input_layernorm``                   ``blocks.{i}.ln_1``
``layers.{i}.self_attn.{q,k,v,o}_proj``          ``blocks.{i}.attn.{q,k,v,o}_proj``
``layers.{i}.post_attention_layernorm``          ``blocks.{i}.ln_2``
``layers.{i}.mlp.{gate,up,down}_proj``           ``blocks.{i}.mlp.{gate,up,down}_proj``
``norm``                                         ``ln_f``
``lm_head`` (no prefix; absent when tied)        ``lm_head`` (tied: ``wte``)
=============================================  ======================================

Phi-3 (``phi3``) is this layout with q, k, v stored as one ``qkv_proj`` and gate, up as one
``gate_up_proj``: they are split on import (:func:`convert_phi3`).

The way back, for the merged export (``lora/hf_export.py``): :func:`llama_tensors` and :func:`phi3_tensors`
(fused again), and :func:`llama_hf_config` for a model that has no ``config.json`` of Hugging Face's.

Mistral's ``sliding_window`` is honoured by refusal: the model's ``max_seq_len`` is the window when it is
shorter than ``max_position_embeddings``, so no sequence exceeds it. Rotary scaling (``rope_scaling``, or
``rope_parameters``' type) ``linear`` and ``llama3`` (Llama 3.1 on) are honoured; another is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lora.errors import quote
from lora.files import describe_mismatch
from lora.model_config import ModelConfig

__all__ = [
    "ARCHITECTURES",
    "LLAMA_TYPES",
    "check_llama_tensors",
    "convert_llama",
    "llama_config",
    "llama_hf_config",
    "llama_names",
    "llama_tensors",
    "phi3_tensors",
    "strip_llama",
]

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")  # the model_type values this importer reads
# each model_type's class in transformers (config.json's "architectures"), Phi-3's too
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "phi3": "Phi3ForCausalLM"}  # fmt: skip
_QKV_BIAS = ("qwen2",)  # families whose q, k, v projections have biases (and no other projection)
_QK_NORM = ("qwen3",)  # families that normalise each head of q and k (q_norm, k_norm)
# this model's activation -> hidden_act, when a config is written from it
_HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}
# settings a Llama config may have that this model cannot honour, with the value it can
_UNSUPPORTED = {
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "use_bidirectional_attention": False,
}
# what transformers' config classes assume for a key a config.json lacks, where it is not our default
_DEFAULTS = {"mistral": {"sliding_window": 4096}, "qwen2": {"use_sliding_window": False},
             "qwen3": {"head_dim": 128, "use_sliding_window": False}, "gemma": {"head_dim": 256},
             "phi3": {"rms_norm_eps": 1e-5}}  # fmt: skip


def llama_config(hf: Mapping, where: object) -> ModelConfig:
    """The :class:`ModelConfig` of a Llama-layout ``config.json`` mapping read from ``where``; a setting this
    model cannot honour raises a one-line ``ValueError`` naming it."""
    hf = {**_DEFAULTS.get(hf.get("model_type"), {}), **hf}  # what transformers assumes where a key is missing
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "max_position_embeddings") if k not in hf]  # fmt: skip
    if missing:
        raise ValueError(f"{where}: missing {hf.get('model_type')} keys {missing}")
    for key, value in _UNSUPPORTED.items():
        if hf.get(key) is not None and hf[key] != value:  # (null: the default)
            raise ValueError(f"{where}: {key} {quote(hf[key])} is not supported (only {value})")
    for holder in (hf, hf.get("rope_parameters") or {}):  # (transformers 5 keeps it in rope_parameters)
        if holder.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: partial_rotary_factor {quote(holder['partial_rotary_factor'])} is not "
                             "supported (only 1.0: every dimension of a head rotated)")  # fmt: skip
    gemma = hf.get("model_type") == "gemma"
    act = hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if gemma and act == "gelu":  # transformers runs Gemma's "gelu" as the tanh approximation
        act = "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
        raise ValueError(
            f"{where}: hidden_act {quote(act)} is not supported; expected one of {', '.join(_ACTIVATIONS)}"
        )
    heads, d = hf["num_attention_heads"], hf["hidden_size"]
    max_len = hf["max_position_embeddings"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None  # (Qwen's switch)
    if isinstance(window, int) and 0 < window < max_len:  # no sequence may exceed the window
        max_len = window
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=d, num_heads=heads, num_layers=hf["num_hidden_layers"],
            d_ff=hf["intermediate_size"], max_seq_len=max_len, dropout=hf.get("attention_dropout", 0.0),
            layer_norm_eps=hf.get("rms_norm_eps", 1e-6), activation=_ACTIVATIONS[act],
            norm="rmsnorm_plus_one" if gemma else "rmsnorm",
            mlp="gated", positions="rotary", num_kv_heads=hf.get("num_key_value_heads") or heads, bias=False,
            tied_head=bool(hf.get("tie_word_embeddings", gemma)), rope_theta=_rope_theta(hf),
            rope_scaling=_rope_scaling(hf),
            qkv_bias=hf.get("model_type") in _QKV_BIAS, qk_norm=hf.get("model_type") in _QK_NORM,
            head_dim=hf.get("head_dim"), scale_embeddings=gemma,
        )  # fmt: skip
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _rope_theta(hf: Mapping) -> float:
    """The rotary base from either spelling: ``rope_theta``, or ``rope_parameters``' (transformers 5)."""
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _rope_scaling(hf: Mapping) -> dict | None:
    """The rotary scaling from either spelling (``rope_scaling``, or ``rope_parameters``), ``None`` when the
    positions are not scaled; what is not :data:`~lora.model_config.ROPE_SCALINGS`' is refused by ModelConfig."""
    for scaling in (
        hf.get("rope_parameters") or {},
        hf.get("rope_scaling") or {},
    ):  # the newer spelling first
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind != "default":
            rest = {k: v for k, v in scaling.items() if k not in ("rope_type", "type", "rope_theta")}
            return {"rope_type": kind, **rest}
    return None


def llama_hf_config(config: ModelConfig) -> dict:
    """A ``config.json`` mapping for ``config`` of a Llama-layout family, the one its fields name (Qwen3: q/k
    norms; Qwen2: q, k, v biases; Gemma: RMSNorm of ``1 + weight``; else Llama), in the older spelling of the
    rotary settings (``rope_theta``, ``rope_scaling``: what transformers 4 and 5, vLLM and llama.cpp read).
    :func:`llama_config` reads it back into ``config`` or tells what it cannot hold (the exporter checks that
    it does: a mixture no family has, such as Gemma's norm without its embedding scale, is refused there). No
    token ids: a model made here knows none."""
    kind = "llama"
    for name, field in (("gemma", config.norm == "rmsnorm_plus_one"), ("qwen2", config.qkv_bias),
                        ("qwen3", config.qk_norm)):  # fmt: skip
        kind = name if field else kind  # (the last that holds: a Qwen3 with Qwen2's biases is refused)
    act = _HF_ACTIVATIONS[config.activation]
    out = {"model_type": kind, "architectures": [ARCHITECTURES[kind]], "vocab_size": config.vocab_size,
           "hidden_size": config.d_model, "intermediate_size": config.d_ff, "num_hidden_layers": config.num_layers,
           "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
           "head_dim": config.head_dim, "max_position_embeddings": config.max_seq_len,
           "rms_norm_eps": config.layer_norm_eps, "hidden_act": act, "rope_theta": config.rope_theta,
           "rope_scaling": config.rope_scaling, "tie_word_embeddings": config.tied_head,
           "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None}  # fmt: skip
    if kind != "qwen2":  # (Qwen2's q, k, v biases are its class's, not a setting)
        out["attention_bias"] = False
    if kind.startswith("qwen"):
        out["use_sliding_window"] = False
    return out


def llama_names(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors a Llama checkpoint of ``config`` holds: ``{their name: (our name, shape)}`` (the LM head
    only when it is not tied)."""
    shapes = config.projection_shapes()
    C = config.d_model
    names = {"model.embed_tokens.weight": ("wte.weight", (config.vocab_size, C)),
             "model.norm.weight": ("ln_f.weight", (C,))}  # fmt: skip
    if not config.tied_head:
        names["lm_head.weight"] = ("lm_head.weight", (config.vocab_size, C))
    for i in range(config.num_layers):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        names[f"{h}input_layernorm.weight"] = (f"{b}ln_1.weight", (C,))
        names[f"{h}post_attention_layernorm.weight"] = (f"{b}ln_2.weight", (C,))
        for ours, shape in shapes.items():
            theirs = ours.replace("attn.", "self_attn.", 1)
            names[f"{h}{theirs}.weight"] = (f"{b}{ours}.weight", shape)
            if config.qkv_bias and ours in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
                names[f"{h}{theirs}.bias"] = (f"{b}{ours}.bias", shape[:1])
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                names[f"{h}self_attn.{norm}.weight"] = (f"{b}attn.{norm}.weight", (config.head_dim,))
    return names


def strip_llama(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Llama file's tensors without the rotary buffers older checkpoints saved (``rotary_emb.inv_freq``)."""
    return {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}


def check_llama_tensors(tensors: Mapping[str, torch.Tensor], config: ModelConfig, where: object) -> None:
    """Refuse (a one-line ``ValueError`` in the file's names) stripped tensors that are not ``config``'s
    Llama checkpoint. A tied model's file may also hold ``lm_head.weight``, equal to the embedding."""
    _check(tensors, config, where, {k: s for k, (_, s) in llama_names(config).items()})


def _check(
    tensors: Mapping[str, torch.Tensor],
    config: ModelConfig,
    where: object,
    names: Mapping[str, tuple[int, ...]],
) -> None:
    """:func:`check_llama_tensors` against ``names`` (the file's names and shapes)."""
    layers = {k.split(".")[2] for k in tensors if k.startswith("model.layers.")}
    if len(layers) != config.num_layers:  # before listing the names of 10**8 layers
        raise ValueError(f"{where} holds {len(layers)} layers, but config.json says num_hidden_layers "
                         f"{config.num_layers}")  # fmt: skip
    expected = {k: torch.empty(s, device="meta") for k, s in names.items()}
    got = {k: v for k, v in tensors.items() if not (config.tied_head and k == "lm_head.weight")}
    problem = describe_mismatch(got, expected)
    if problem:
        raise ValueError(f"{where}: {problem}")
    head = tensors.get("lm_head.weight") if config.tied_head else None
    if head is not None and head.shape != expected["model.embed_tokens.weight"].shape:
        raise ValueError(f"{where}: lm_head.weight has shape {tuple(head.shape)}, but the head is tied "
                         f"(tie_word_embeddings) to embed_tokens {tuple(expected['model.embed_tokens.weight'].shape)}")  # fmt: skip
    if (
        head is not None
        and head.device.type != "meta"
        and not torch.equal(head, tensors["model.embed_tokens.weight"])
    ):
        raise ValueError(f"{where}: lm_head.weight differs from embed_tokens.weight, but config.json ties them "
                         "(tie_word_embeddings true)")  # fmt: skip


def convert_llama(tensors: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Checked Llama tensors -> this model's names (``meta`` ones too)."""
    return {ours: tensors[theirs] for theirs, (ours, _) in llama_names(config).items()}


# Phi-3 stores q, k, v as one qkv_proj (rows q, then k, then v) and gate, up as one gate_up_proj (gate first)
_PHI3_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}  # fmt: skip


def phi3_names(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a Phi-3 checkpoint of ``config`` holds, with their shapes: Llama's, with q, k, v and gate,
    up each stacked into one weight."""
    names = {k: s for k, (_, s) in llama_names(config).items()}
    for i in range(config.num_layers):
        h = f"model.layers.{i}."
        for fused, parts in _PHI3_FUSED.items():
            shapes = [names.pop(f"{h}{p}.weight") for p in parts]
            names[f"{h}{fused}.weight"] = (sum(s[0] for s in shapes), shapes[0][1])
    return names


def check_phi3_tensors(tensors: Mapping[str, torch.Tensor], config: ModelConfig, where: object) -> None:
    """:func:`check_llama_tensors` in Phi-3's names (``qkv_proj``, ``gate_up_proj``)."""
    _check(tensors, config, where, phi3_names(config))


def convert_phi3(tensors: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Checked Phi-3 tensors -> this model's: ``qkv_proj`` split into q ``(nh hs, C)``, k and v
    ``(nkv hs, C)`` each, ``gate_up_proj`` into gate and up ``(F, C)`` each, then renamed as Llama's."""
    out = dict(tensors)
    q, kv, F = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.d_ff
    sizes = {"self_attn.qkv_proj": [q, kv, kv], "mlp.gate_up_proj": [F, F]}
    for i in range(config.num_layers):
        h = f"model.layers.{i}."
        for fused, parts in _PHI3_FUSED.items():
            for part, piece in zip(parts, out.pop(f"{h}{fused}.weight").split(sizes[fused]), strict=True):
                out[f"{h}{part}.weight"] = piece.contiguous()
    return convert_llama(out, config)


def llama_tensors(tensors: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """This model's tensors -> a Llama checkpoint's names (:func:`convert_llama` inverted; a tied head not
    stored, as transformers saves it)."""
    return {theirs: tensors[ours] for theirs, (ours, _) in llama_names(config).items()}


def phi3_tensors(tensors: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """This model's tensors -> a Phi-3 checkpoint's (:func:`convert_phi3` inverted): Llama's names, then q, k, v
    stacked into ``qkv_proj`` ``(nh hs + 2 nkv hs, C)`` and gate, up into ``gate_up_proj`` ``(2F, C)``."""
    out = llama_tensors(tensors, config)
    for i in range(config.num_layers):
        h = f"model.layers.{i}."
        for fused, parts in _PHI3_FUSED.items():
            out[f"{h}{fused}.weight"] = torch.cat([out.pop(f"{h}{p}.weight") for p in parts])
    return out
