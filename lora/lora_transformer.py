"""The LoRA-capable model: the decoder (``lora/decoder.py``) with its adapters, its base and its folders.

:class:`LoRATransformer` is the :class:`~lora.decoder.Decoder` (GPT-2's layout by default, or a Llama-family
one: its family fields) whose projections carry LoRA adapters. It adds what an adapted model needs around the
architecture: ``configure_lora_training`` and ``get_parameter_stats``, LoRA state dicts, merge and unmerge,
the frozen base's tensors and fingerprint, storing the base narrower (4-bit NF4 or bf16), and the public
adapter methods, delegated to its :class:`~lora.adapter_set.AdapterSet` (``model.adapters``). Model folders
are read by ``lora/pretrained.py`` and written by ``lora/formats.py``.

No training and no argument parsing here. Run ``python lora/lora_transformer.py`` for a demonstration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # `python lora/lora_transformer.py` without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora.adapter import Adapter
from lora.adapter_set import AdapterSet
from lora.base_storage import (
    QUANTIZATIONS,
    as_stored,
    check_narrowable,
    dense_weights,
    freeze_half,
    kept_as,
    narrow_base_,
)
from lora.decoder import Decoder
from lora.files import describe_mismatch, tensors_fingerprint
from lora.formats import AdapterFolder, write_model_folder
from lora.hf_export import export_hf
from lora.lora_layer import (
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
from lora.model_config import LoRAConfig, ModelConfig
from lora.pretrained import BaseSource, load_base_into, resolve_base
from lora.skeleton import build_on_meta, fill

__all__ = ["LoRATransformer"]

# the keyword arguments from_pretrained passes on to the constructor (the architecture comes from the folder)
FROM_PRETRAINED_OPTIONS = (
    *(f.name for f in dataclasses.fields(LoRAConfig)),
    "adapt_attention",
    "num_classes",
    "dropout",
)


class LoRATransformer(Decoder):
    """The decoder (``lora/decoder.py``) whose attention (and optionally MLP) projections carry LoRA adapters.

    ``lora_targets`` picks the projections to adapt (used when ``adapt_attention``): q, k, v, o, and the MLP's
    (GPT-2's fc1, fc2; a gated MLP's gate, up, down), or the shortcuts mlp and all (:class:`LoRAConfig`);
    ``adapt_feedforward`` adapts every MLP projection. ``lora_r = 0`` builds a LoRA-free model.
    With ``num_classes`` the model also has a classification head over the last token's hidden state.
    ``model.config`` (:class:`ModelConfig`) and ``model.lora_config`` (:class:`LoRAConfig`) say what it is;
    ``gradient_checkpointing``, ``fused_qkv``, :meth:`lm_loss` and :meth:`generate` are the decoder's.

    The model owns its adapters (``model.adapters``, :class:`~lora.adapter_set.AdapterSet`): the active one
    lives in the ``LoRALinear`` parameters (so ``state_dict`` and an optimizer see only it), the others wait
    as :class:`Adapter` values. ``load_adapter``, ``set_adapter``, ``save_adapter`` ... switch and move them;
    switching never touches the base weights.
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
        **family: Any,
    ) -> None:
        """The model of these settings; ``family`` takes :class:`ModelConfig`'s family keys (``norm``,
        ``mlp``, ``positions``, ``num_kv_heads``, ``bias``, ``tied_head``, ``rope_theta``), GPT-2's values by
        default."""
        unknown = sorted(set(family) - {*ModelConfig.FAMILY_SHAPE_KEYS, *ModelConfig.FAMILY_VALUE_KEYS})
        if unknown:
            raise TypeError(f"LoRATransformer got unexpected keyword arguments {unknown}")
        config = ModelConfig(vocab_size, d_model, num_heads, num_layers, d_ff, max_seq_len, dropout, num_classes,
                             layer_norm_eps, activation, **family)  # fmt: skip
        lora = LoRAConfig(lora_r, lora_alpha, lora_dropout, lora_targets if adapt_attention else (),
                          adapt_feedforward, use_rslora, use_dora, lora_init)  # fmt: skip
        loading = base_init_deferred()  # within from_pretrained: the weights are not the ones to keep
        with deferred_base_init():  # the layers' start is derived once, after the decoder's weight init
            super().__init__(config, lora)
        if not loading:  # (from_pretrained derives it once the file's weights are in)
            self.init_adapter_from_base()
        self.adapters = AdapterSet(self)
        # set by quantize_base: the data type of the block weights and the full-precision base's fingerprint
        self._quantization: tuple[str, str] | None = None
        # ||W0||_row of each projection PEFT may fuse, of the full-precision weights: kept by quantize_base (DoRA)
        self._full_precision_norms: dict[str, torch.Tensor] | None = None
        self.base_source: BaseSource | None = None  # the folder from_pretrained read (export_hf's base)
        # a half-precision file's dtype, its base kept so (from_pretrained): saved and merged back in it
        self._half: torch.dtype | None = None

    @classmethod
    def from_config(cls, config: ModelConfig, lora: LoRAConfig | None = None) -> LoRATransformer:
        """The model for typed settings (``lora`` ``None``: no adapter)."""
        lora = lora or LoRAConfig(lora_r=0)
        return cls(**config.to_dict(), **{**lora.to_dict(), "lora_targets": lora.lora_targets})

    def init_adapter_from_base(self) -> None:
        """Derive the adapter's base-dependent start from the current base weights (PiSSA/OLoRA factors, DoRA
        magnitudes: ``LoRALinear.init_from_base``); the constructor and :meth:`from_pretrained` call it."""
        for _, layer in self.lora_layers():
            layer.init_from_base()

    QUANTIZATIONS = QUANTIZATIONS

    def quantize_base(self, kind: str = "nf4", fingerprint: str | None = None) -> LoRATransformer:
        """Store the frozen base narrower than the adapter, which stays float32 and trains as before: ``"nf4"``
        (QLoRA's 4-bit NormalFloat blocks, bfloat16 embeddings) or ``"bf16"`` (``lora/base_storage.py`` says
        what each stores and computes). Returns the model.

        The base fingerprint is taken first, of the full-precision weights (``fingerprint``: taken already, by
        a caller whose model is on the ``meta`` device, its values read later: ``lora/fsdp.py``): an adapter
        trained on the narrow base loads on the full-precision one and the other way round. The weights must
        be frozen (call :meth:`configure_lora_training` first) and unmerged; merging into the narrow base is
        refused.
        """
        if self._quantization is not None and kind in QUANTIZATIONS:
            if self._quantization[0] != kind:
                raise ValueError(f"the base is already stored in {self._quantization[0]}, not {kind}")
            return self
        check_narrowable(self, kind)  # before any layer changes
        fingerprint = self.base_fingerprint() if fingerprint is None else fingerprint
        self._full_precision_norms = None if self.wte.weight.is_meta else self.fused_row_norms()
        narrow_base_(self, kind)
        self._quantization = (kind, fingerprint)
        return self

    @property
    def hf_model_type(self) -> str | None:
        """The ``model_type`` of the Hugging Face folder the base was read from; ``None`` for a model made here
        or read from this project's folder. PEFT's module names follow it (``lora/peft_names.py``)."""
        source = self.base_source
        return source.importer if source is not None and source.hf_model else None

    @property
    def base_quantization(self) -> str | None:
        """How the block weights are stored: ``None`` (as loaded), ``"nf4"`` or ``"bf16"`` (:meth:`quantize_base`)."""
        return None if self._quantization is None else self._quantization[0]

    # ----------------------------------------------------------------------------------------------------
    # Generation

    @contextmanager
    def generation_context(self) -> Iterator[None]:
        """:meth:`generate` with a 4-bit base dequantized once for the whole call (:meth:`dense_base`), not once
        per token, and DoRA's row norms computed once (:func:`~lora.lora_layer.fixed_dora_norms`)."""
        with self.dense_base(), fixed_dora_norms(self):
            yield

    @contextmanager
    def dense_base(self) -> Iterator[None]:
        """Within the block a narrow base's weights are dense, dequantized or widened once
        (:func:`~lora.base_storage.dense_weights`); nothing happens for a base as loaded."""
        narrow = self._quantization is not None or self._half is not None
        with dense_weights(self) if narrow else contextlib.nullcontext():
            yield

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

    def prepare_training(self, method: str = "lora", storage: str = "none") -> dict:
        """Make the model what a run of ``method`` trains, and return :meth:`get_parameter_stats`: ``"lora"``
        trains the adapter (:meth:`configure_lora_training`) with the frozen base stored as ``storage``
        (``"none"``, or ``"bf16"``/``"nf4"``: :meth:`quantize_base`); ``"full"`` trains every weight (LoRA
        layers freeze their base weights when built), its base stored as it is."""
        if method == "full":
            if storage != "none" or self._half is not None:
                what = f"{self._half} as its file" if storage == "none" else storage
                raise ValueError(f"a full fine-tune trains its base: it cannot be stored as {what} (load it with "
                                 "from_pretrained(..., base_dtype=torch.float32))")  # fmt: skip
            self.requires_grad_(True)
            return self.get_parameter_stats()
        if method != "lora":
            raise ValueError(f"method must be lora or full, got {method!r}")
        stats = self.configure_lora_training()
        if storage != "none":
            self.quantize_base(storage)
        return stats

    def get_parameter_stats(self) -> dict:
        """Counts of total / trainable / LoRA / frozen parameters (tied weights counted once);
        ``lora_params_by_projection`` counts the LoRA tensors on each of the family's targets
        (``q, k, v, o, fc1, fc2`` or ``q, k, v, o, gate, up, down``), 0 where none is adapted."""
        return self.adapters.parameter_stats()

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
            if not self.is_base_key(key):
                continue
            module, _, leaf = key.rpartition(".")
            layer = layers.get(module)
            if leaf == "weight" and layer is not None and layer.merged:
                value = layer.base_weight()
            out[key] = value.detach()
        return as_stored(out, self._half)

    def base_fingerprint(self) -> str:
        """First 16 hex digits of a sha256 over the names, shapes and float32 values of the base tensors.

        Deterministic (sorted names, unmerged values); independent of the adapters and of a classification head.
        The values are hashed as float32, which holds fp16 and bf16 exactly: a half-precision base widened to
        float32 for training keeps its fingerprint (a float32 base's is what it always was). A 4-bit base
        (:meth:`quantize_base`) gives the fingerprint its full-precision weights had; a merged one, its ``W0``'s.
        """
        if self._quantization is not None:
            return self._quantization[1]
        return tensors_fingerprint(self.base_state_dict())

    def head_state(self) -> dict[str, torch.Tensor]:
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
        return {**tensors, **self.head_state()}

    def merged_model(self) -> LoRATransformer:
        """A LoRA-free copy (``lora_r = 0``, eval mode) with the active adapter merged in; its tensors in this
        model's dtypes (a half-precision file's base kept so)."""
        tensors = {k: v.clone() for k, v in self.merged_state_dict().items()}
        plain = build_on_meta(lambda: LoRATransformer.from_config(self.config))  # (no random draw)
        plain._half = self._half
        fill(plain, kept_as(plain, tensors, self._half) if self._half else tensors)
        if self._half:
            freeze_half(plain)
        return plain.eval()

    # ----------------------------------------------------------------------------------------------------
    # The adapter set (lora/adapter_set.py): the public spelling, delegated

    def list_adapters(self) -> list[str]:
        """Adapter names, the active one first."""
        return self.adapters.names()

    @property
    def active_adapter(self) -> str | None:
        """Name of the active adapter, ``None`` if there is none (layers given an adapter by hand, with
        ``reset_lora``, count as the adapter ``"default"``)."""
        return self.adapters.active_name()

    def get_adapter(self, name: str | None = None) -> Adapter:
        """Adapter ``name`` (default: the active one) as an :class:`Adapter`; the active one is copied."""
        return self.adapters.get(name)

    def set_adapter(self, name: str) -> None:
        """Make adapter ``name`` active: no reload of the base, and (unmerged) base weights untouched."""
        self.adapters.set(name)

    def delete_adapter(self, name: str) -> None:
        """Forget adapter ``name``; deleting the active one leaves the model with no adapter (the base)."""
        self.adapters.delete(name)

    def add_weighted_adapter(self, weights: Mapping[str, float], name: str) -> str:
        """Add (not activate) adapter ``name`` with ``ΔW = Σ_i w_i s_i B_i A_i`` exactly (ranks concatenated)."""
        return self.adapters.add_weighted(weights, name)

    def check_adapter_fits(self, folder: AdapterFolder, force: bool = False) -> list[str]:
        """Raise ``ValueError`` if the adapter's base differs from this one; return warnings (with ``force``).

        Other shapes always refuse; the same shapes with other weights (fingerprint) refuse unless ``force``.
        """
        return self.adapters.check_fits(folder, force)

    def adapter_from_folder(self, folder: AdapterFolder) -> Adapter:
        """The adapter a folder holds, its modules and tensor shapes checked against this model."""
        return self.adapters.from_folder(folder)

    # ----------------------------------------------------------------------------------------------------
    # On disk (the formats are lora/formats.py's)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the base model (``config.json`` + ``model.safetensors``, no LoRA tensors) to ``path``."""
        if self._quantization is not None:
            raise ValueError(f"a {NARROW_BASES[self._quantization[0]]} base is not saved: its weights are rounded; "
                             "save the full-precision base it was made from")  # fmt: skip
        return write_model_folder(path, self.config, {**self.base_state_dict(), **self.head_state()})

    @classmethod
    def from_pretrained(
        cls, path: str | Path | BaseSource, base_dtype: torch.dtype | None = None, **lora_options: object
    ) -> LoRATransformer:
        """A model with the architecture and weights saved in ``path`` and the given LoRA options.

        ``path`` is a model folder of this project's or a Hugging Face one (:func:`~lora.pretrained.resolve_base`),
        or a :class:`~lora.pretrained.BaseSource` made of one (its config is not parsed again, nor a header read
        again). ``lora_options`` are any of ``lora_r, lora_alpha, lora_dropout, lora_targets, adapt_attention,
        adapt_feedforward, use_rslora, use_dora, lora_init, num_classes, dropout``. A saved classification head
        is loaded when ``num_classes`` matches it; another ``num_classes`` gets a fresh head.

        The file's tensors, memory-mapped, become the weights as they are: no random model is made first and
        no copy (``lora/skeleton.py``; the adapter and the random generator are what building the model
        would have made). A half-precision file (every tensor bfloat16, or float16) stays half
        (``lora/base_storage.py``): its linear weights, embeddings and head in its dtype, the norms and the
        adapter float32; ``base_dtype=torch.float32`` widens it (a float32 copy; what full fine-tuning needs,
        whose AdamW would lose updates on half-precision weights). Other files are read as float32.

        As loaded, only the block projections' base weights are frozen (each LoRA layer freezes its own): the
        embeddings, norms and an untied LM head still require grad, and :meth:`get_parameter_stats` counts them
        as trainable until :meth:`configure_lora_training` (or ``prepare_training``) freezes all but the adapter.
        """
        _refuse_unknown(lora_options)  # before the folder is read
        if base_dtype not in (None, torch.float32):
            raise ValueError(
                f"base_dtype must be None (as the file stores it) or torch.float32, got {base_dtype}"
            )
        source = path if isinstance(path, BaseSource) else resolve_base(path)
        options = {**source.architecture.to_dict(), **lora_options}
        try:
            model = build_on_meta(lambda: cls(**options))
        except ValueError as e:
            raise ValueError(f"{source.config_path}: cannot build the model ({e})") from None
        model._half = load_base_into(model, source, widen=base_dtype is not None)
        model.init_adapter_from_base()  # PiSSA/OLoRA factors and DoRA magnitudes of these weights
        model.base_source = source
        return model

    @classmethod
    def from_gpt2(cls, path: str | Path, **lora_options: object) -> LoRATransformer:
        """A model from a local Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors`` or
        ``pytorch_model.bin``), with the given LoRA options; nothing is fetched. The names, the fused
        ``c_attn`` and the ``Conv1D`` layout are converted as ``lora/gpt2.py`` describes."""
        source = resolve_base(path)
        if source.importer != "gpt2":  # another kind of folder is refused, naming what it is
            what = (
                "a model folder of this project's"
                if source.importer == "lora"
                else f"a {source.importer} folder"
            )
            raise ValueError(f"{source.config_path}: not a Hugging Face GPT-2 folder (model_type 'gpt2'): {what}; "
                             "load it with from_pretrained")  # fmt: skip
        return cls.from_pretrained(source, **lora_options)

    def save_adapter(
        self,
        path: str | Path,
        adapter_name: str | None = None,
        extra: dict | None = None,
        *,
        base_fingerprint: str | None = None,
    ) -> Path:
        """Write adapter ``adapter_name`` (default: the active one) to the folder ``path``.

        ``extra`` facts (task, run, ...) go into ``adapter_config.json`` beside the settings, the per-module
        ranks, the base's architecture and fingerprint (``base_fingerprint``, where the caller has taken it
        already, else computed now) and the project's version.
        """
        return self.adapters.save(path, adapter_name, extra, base_fingerprint)

    def load_adapter(self, path: str | Path, adapter_name: str = "default", force: bool = False) -> str:
        """Load the adapter in ``path`` as ``adapter_name`` and make it active; returns the name.

        Refuses (``ValueError`` saying what differs) an adapter made for a base of another architecture, or
        for other base weights (fingerprint); ``force=True`` skips only the fingerprint check. The adapter
        may have another rank, targets or head than the model had: layers are reconfigured.

        ``path`` may also be a Hugging Face PEFT LoRA folder (its ``adapter_config.json`` names a ``peft_type``)
        for this model's family: GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma or Phi-3, with the module names of
        the Hugging Face folder the base was read from (``hf_model_type``; GPT-2's or Llama's by the layout
        otherwise), converted by ``lora/peft_format.py``. PEFT records no fingerprint of the base weights, so
        only the shapes can be checked: loading it on another model of the same shape succeeds.
        """
        return self.adapters.load(path, adapter_name, force)

    def export_peft(
        self, path: str | Path, adapter_name: str | None = None, base_model_name_or_path: str | None = None
    ) -> Path:
        """Write adapter ``adapter_name`` (default: the active one) as a Hugging Face PEFT LoRA folder:
        ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)`` then computes this
        model's logits. The modules are named as the family of the folder the base was read from names them
        (``hf_model_type``; GPT-2's or Llama's by the layout otherwise): ``q_proj`` ... ``down_proj``, or fused
        (GPT-2's ``c_attn``, Phi-3's ``qkv_proj`` and ``gate_up_proj``: ``lora/peft_format.py``). An adapter
        with a head is refused, as is a model of a layout no Hugging Face family has."""
        return self.adapters.export_peft(path, adapter_name, base_model_name_or_path)

    def fused_row_norms(self) -> dict[str, torch.Tensor]:
        """``||W0||_row`` (float32, (out,)) of every projection PEFT may fuse (q, k, v; gate, up): the DoRA
        magnitude that leaves a projection unchanged, for the rows of a fused PEFT module (GPT-2's ``c_attn``,
        Phi-3's ``qkv_proj``, ``gate_up_proj``) that an adapter does not train. Those of the full-precision
        weights, also for a 4-bit base (PEFT loads the adapter on the full-precision one)."""
        if self._full_precision_norms is not None:
            return dict(self._full_precision_norms)
        fused = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
        return {name: layer.base_weight().detach().float().norm(dim=1)
                for name, layer in lora_modules(self) if name.endswith(fused)}  # fmt: skip

    def merge_and_export(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write a LoRA-free model folder with the active adapter merged; this model is left unchanged.

        ``from_pretrained(path)`` gives a model whose logits equal base + adapter (to float rounding).
        """
        merged = {"merged_adapter": {"name": self.adapters.active, **(extra or {})}}
        return write_model_folder(path, self.config, self.merged_state_dict(), merged)

    def export_hf(self, path: str | Path, base: BaseSource | None = None, max_shard_size: int | str = "5GB") -> Path:  # fmt: skip
        """Write the model with the active adapter merged (float32 math, the weights' dtype kept) as a Hugging Face
        folder (``lora/hf_export.py``: the family's names, ``base``'s config.json and tokenizer files, ``base``
        by default the folder :meth:`from_pretrained` read); refused: a classification head, a 4-bit base."""
        return export_hf(path, self.config, self.merged_state_dict, base or self.base_source, max_shard_size)


def _refuse_unknown(lora_options: Mapping[str, object]) -> None:
    """Refuse a ``from_pretrained`` keyword that is not a LoRA option (the architecture is the folder's)."""
    unknown = sorted(set(lora_options) - set(FROM_PRETRAINED_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown from_pretrained options {unknown}; expected some of {list(FROM_PRETRAINED_OPTIONS)}"
        )


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
