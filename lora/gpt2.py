"""Hugging Face GPT-2 folders (gpt2, distilgpt2, gpt2-medium, ...) read as this project's models.

A GPT-2 folder holds ``config.json`` (``"model_type": "gpt2"``) and ``model.safetensors`` (or only
``pytorch_model.bin``, read with ``torch.load(weights_only=True)``: no unrestricted unpickling). The model
here has GPT-2's layout on purpose, so reading one is a renaming, a split and a transpose:

=====================================  ==========================================================
GPT-2 (``transformer.`` prefix or not)   here
=====================================  ==========================================================
``wte``, ``wpe``, ``ln_f``               the same
``h.{i}.ln_1``, ``h.{i}.ln_2``           ``blocks.{i}.ln_1``, ``blocks.{i}.ln_2``
``h.{i}.attn.c_attn`` ``(C, 3C)``        ``blocks.{i}.attn.q_proj|k_proj|v_proj`` ``(C, C)`` each:
                                         ``W[:, jC:(j+1)C].T``, bias ``b[jC:(j+1)C]``, j = 0, 1, 2
``h.{i}.attn.c_proj`` ``(C, C)``         ``blocks.{i}.attn.o_proj`` (transposed)
``h.{i}.mlp.c_fc`` ``(C, F)``            ``blocks.{i}.mlp.fc1`` ``(F, C)`` (transposed)
``h.{i}.mlp.c_proj`` ``(F, C)``          ``blocks.{i}.mlp.fc2`` ``(C, F)`` (transposed)
``lm_head.weight``                       tied to ``wte`` (when saved, it must equal ``wte``)
=====================================  ==========================================================

GPT-2's ``Conv1D`` stores its weight as ``(in, out)`` and computes ``x W + b``; ``nn.Linear`` stores
``(out, in)``: hence the transposes. The checks speak GPT-2's names (the file's), before anything is
converted. Nothing is fetched from a network.

This is a family importer: a pure converter (the ``config.json`` dict -> :class:`ModelConfig`, the names
a checkpoint holds, its tensors -> this model's). It reads no weights: ``lora/pretrained.py`` reads a
base folder once and hands it what it read (only :func:`is_hf_folder`, for callers that have nothing but
a path, looks at a ``config.json``). GPT-2's own names (``c_attn``, ``c_fc``, ``Conv1D``) appear
only here and in the PEFT mapping (``lora/peft_format.py``). The way back is here too, for the merged export
(``lora/hf_export.py``): :func:`gpt2_hf_config` and :func:`gpt2_tensors` (q, k, v fused into ``c_attn`` again,
transposed to ``Conv1D``'s layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from lora.errors import quote
from lora.files import describe_mismatch, read_json
from lora.model_config import ModelConfig

__all__ = [
    "check_gpt2_tensors",
    "convert_gpt2",
    "gpt2_config",
    "gpt2_hf_config",
    "gpt2_names",
    "gpt2_tensors",
    "is_hf_config",
    "is_hf_folder",
    "strip_gpt2",
]

# GPT-2's activation_function -> ours ("gelu_new", "gelu_fast" and "gelu_pytorch_tanh" are the same function)
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}  # fmt: skip
# attention buffers (the causal mask) that older checkpoints saved beside the weights: not weights
_BUFFERS = ("attn.bias", "attn.masked_bias")
# settings a GPT-2 config may have that this model cannot honour, with the value it can
_UNSUPPORTED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "add_cross_attention": False, "tie_word_embeddings": True}  # fmt: skip


def is_hf_config(hf: Mapping) -> bool:
    """Whether a ``config.json`` mapping is a Hugging Face model's: it has a ``model_type`` (or, as the oldest
    GPT-2 configs, ``n_embd`` without one)."""
    return "model_type" in hf or "n_embd" in hf


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a Hugging Face model's ``config.json`` (:func:`is_hf_config`)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return is_hf_config(read_json(config))
    except ValueError:
        return False


def gpt2_config(hf: Mapping, where: object) -> ModelConfig:
    """The :class:`ModelConfig` of a GPT-2 ``config.json`` mapping read from ``where``; another architecture
    (BERT, Llama, ...) or a setting this model cannot honour raises a one-line ``ValueError`` naming it."""
    kind = hf.get("model_type", "gpt2" if "n_embd" in hf else None)  # the oldest GPT-2 configs name none
    if kind != "gpt2":
        raise ValueError(f"{where}: model_type {quote(kind)} is not supported; only GPT-2 checkpoints (model_type "
                         "'gpt2': gpt2, distilgpt2, gpt2-medium, ...) can be imported")  # fmt: skip
    for key, value in _UNSUPPORTED.items():
        if key in hf and hf[key] != value:
            raise ValueError(f"{where}: {key} {quote(hf[key])} is not supported (only {value})")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(f"{where}: activation_function {quote(act)} is not supported; expected one of "
                         f"{', '.join(ACTIVATIONS)}")  # fmt: skip
    missing = [k for k in ("vocab_size", "n_embd", "n_head", "n_layer", "n_positions") if k not in hf]
    if missing:
        raise ValueError(f"{where}: missing GPT-2 keys {missing}")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=hf["n_embd"], num_heads=hf["n_head"], num_layers=hf["n_layer"],
            d_ff=hf.get("n_inner"), max_seq_len=hf["n_positions"], dropout=hf.get("resid_pdrop", 0.1),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=ACTIVATIONS[act],
        )  # fmt: skip
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def gpt2_names(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a GPT-2 checkpoint of ``config`` holds (without prefix), with their shapes."""
    C, F = config.d_model, config.d_ff
    names: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, C), "wpe.weight": (config.max_seq_len, C),
        "ln_f.weight": (C,), "ln_f.bias": (C,),
    }  # fmt: skip
    for i in range(config.num_layers):
        shapes = {"ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
                  "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
                  "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
                  "mlp.c_fc.weight": (C, F), "mlp.c_fc.bias": (F,),
                  "mlp.c_proj.weight": (F, C), "mlp.c_proj.bias": (C,)}  # fmt: skip
        names.update({f"h.{i}.{k}": v for k, v in shapes.items()})
    return names


def strip_gpt2(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A GPT-2 file's tensors without the ``transformer.`` prefix and the attention buffers (``lm_head.weight``
    stays)."""
    out = {}
    for key, value in tensors.items():
        name = key.removeprefix("transformer.")
        if name.startswith("h.") and name.split(".", 2)[-1] in _BUFFERS:
            continue
        out[name] = value
    return out


def check_gpt2_tensors(tensors: Mapping[str, torch.Tensor], config: ModelConfig, where: object) -> None:
    """Refuse (a one-line ``ValueError`` in GPT-2's names) stripped tensors that are not ``config``'s GPT-2
    checkpoint; ``meta`` tensors are checked by shape, real ones also for the tied head's values."""
    # the blocks first: a config.json claiming 10**8 layers would take minutes to list
    blocks = {k.split(".")[1] for k in tensors if k.startswith("h.")}
    if len(blocks) != config.num_layers:
        raise ValueError(
            f"{where} holds {len(blocks)} blocks, but config.json says n_layer {config.num_layers}"
        )
    expected = {k: torch.empty(s, device="meta") for k, s in gpt2_names(config).items()}
    got = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    problem = describe_mismatch(got, expected)
    if problem:
        raise ValueError(f"{where}: {problem}")
    head = tensors.get("lm_head.weight")
    if head is not None and head.shape != expected["wte.weight"].shape:
        raise ValueError(f"{where}: lm_head.weight has shape {tuple(head.shape)}, expected "
                         f"{tuple(expected['wte.weight'].shape)} (tied to wte)")  # fmt: skip
    if head is not None and head.device.type != "meta" and not torch.equal(head, tensors["wte.weight"]):
        raise ValueError(
            f"{where}: lm_head.weight differs from wte.weight; only GPT-2's tied LM head is supported"
        )


def convert_gpt2(tensors: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Checked GPT-2 tensors -> this model's names and layout (see the module docstring); ``meta`` ones too."""
    C = config.d_model
    out = {k: tensors[k] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(config.num_layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{b}{ln}.weight"], out[f"{b}{ln}.bias"] = (
                tensors[f"{h}{ln}.weight"],
                tensors[f"{h}{ln}.bias"],
            )
        w, bias = tensors[f"{h}attn.c_attn.weight"], tensors[f"{h}attn.c_attn.bias"]  # (C, 3C), (3C,)
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{b}attn.{proj}.weight"] = w[:, j * C : (j + 1) * C].t().contiguous()  # (C, C)
            out[f"{b}attn.{proj}.bias"] = bias[j * C : (j + 1) * C].contiguous()
        for theirs, ours in (
            ("attn.c_proj", "attn.o_proj"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            out[f"{b}{ours}.weight"] = tensors[f"{h}{theirs}.weight"].t().contiguous()  # (out, in)
            out[f"{b}{ours}.bias"] = tensors[f"{h}{theirs}.bias"]
    return out


# The export direction (lora/hf_export.py): this model's config and tensors -> a GPT-2 folder's


def gpt2_hf_config(config: ModelConfig) -> dict:
    """A GPT-2 ``config.json`` mapping for ``config`` (the inverse of :func:`gpt2_config`, which reads it back
    into ``config``, or tells what it cannot hold: the exporter checks that it does). No token ids: a model
    made here knows none."""
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[config.activation]
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
            "n_embd": config.d_model, "n_head": config.num_heads, "n_layer": config.num_layers,
            "n_inner": config.d_ff, "n_positions": config.max_seq_len, "activation_function": act,
            "layer_norm_epsilon": config.layer_norm_eps, "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "scale_attn_weights": True,
            "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None}  # fmt: skip


def gpt2_tensors(tensors: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """This model's tensors -> a GPT-2 checkpoint's, as transformers saves them (``transformer.`` prefix, the
    tied head not stored): :func:`convert_gpt2` inverted, q, k, v fused into ``c_attn``
    ``(C, 3C) = [W_q^T | W_k^T | W_v^T]``, every ``nn.Linear`` ``(out, in)`` transposed to ``Conv1D``'s
    ``(in, out)``."""
    out = {f"transformer.{k}": tensors[k] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(config.num_layers):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            for leaf in ("weight", "bias"):
                out[f"{h}{ln}.{leaf}"] = tensors[f"{b}{ln}.{leaf}"]
        qkv = [f"{b}attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        out[f"{h}attn.c_attn.weight"] = torch.cat([tensors[f"{p}.weight"].t() for p in qkv], dim=1)  # (C, 3C)
        out[f"{h}attn.c_attn.bias"] = torch.cat([tensors[f"{p}.bias"] for p in qkv])  # (3C,)
        for theirs, ours in (
            ("attn.c_proj", "attn.o_proj"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            out[f"{h}{theirs}.weight"] = tensors[f"{b}{ours}.weight"].t().contiguous()  # (in, out)
            out[f"{h}{theirs}.bias"] = tensors[f"{b}{ours}.bias"]
    return out
