"""Hugging Face PEFT's LoRA adapter folders for every family read here, written and read exactly.

PEFT adapts the modules of the transformers model (GPT-2's ``Conv1D`` layers, Llama's ``nn.Linear``); this
model has their layout with every fused module split (``lora/gpt2.py``, ``lora/llama.py``). Which PEFT module
holds which of our projections, per family, is ``lora/peft_names.py``'s table: most hold one (Llama's
``q_proj`` ... ``down_proj``, GPT-2's ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``), and GPT-2's ``c_attn``
(q, k, v), Phi-3's ``qkv_proj`` (q, k, v) and ``gate_up_proj`` (gate, up) hold several, their rows stacked.

PEFT's LoRA path is ``s B A x`` with ``A: (r, in)``, ``B: (out, r)`` on a ``Conv1D`` too (``fan_in_fan_out``
only changes how it merges), so the tensors move as they are. The scaling ``s`` is ``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with ``use_rslora``, where ``r`` and ``lora_alpha`` come from ``rank_pattern`` and
``alpha_pattern`` (the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``) or ``r``, ``lora_alpha``.

Fusing (export): a fused module's parts ``p`` (rows ``o_p : o_p + n_p`` of its output, ``j``-th in order)
that the adapter adapts give ``A = [A_p; ...]`` ``(Σ r_p, in)`` and a block-diagonal ``B`` ``(Σ n, Σ r_p)``:
``B_p`` in ``p``'s rows under ``p``'s own columns, zeros elsewhere, so ``B A`` stacks ``B_p A_p`` (0 for a
part not adapted). The fused module has one scaling ``s_c`` (the first part's); a part with another ``s_p``
carries ``s_p / s_c`` in its ``B``. Parts that share one ``A`` and scaling (as an imported fused module
leaves them) keep it: ``A`` as it is, ``B = [B_p; ...]``.

Splitting (import): each part takes its rows of ``B`` and the whole ``A``, then drops the columns of its
``B`` that are exactly zero with the matching rows of ``A`` (they add nothing), so an export of ours comes
back with its own ranks; a part left with none has no adapter. A fused module whose ``B`` is all zeros (a
freshly initialised adapter) keeps its full rank in every part. A part's ``lora_alpha`` is chosen to keep
``s_c``.

DoRA (``use_dora``): PEFT's ``lora_magnitude_vector`` is ``m`` (out,), one per output row, as here; its
norms are per output row of ``W0 + s B A`` as here, so the fused rows are the parts' rows. A part of a fused
module that the adapter does not train gets ``m = ||W0||_row`` (the model's base norms): scale 1. On
import a part whose ``B`` is zero is dropped only when its ``m`` is that base norm; else it keeps its rows.

PiSSA and OLoRA adapters (``lora_A0``, ``lora_B0``) are exported as PEFT exports them for the original base
(``path_initial_model_for_weight_conversion``): plain LoRA of rank ``2r`` with ``A = [A; A0]``,
``B = [B, -B0]`` and ``lora_alpha`` chosen to keep the scaling.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lora.adapter import Adapter, LayerAdapter
from lora.errors import quote
from lora.files import (
    describe_mismatch,
    existing_folder,
    read_json,
    read_safetensors,
)
from lora.formats import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, write_adapter_files
from lora.lora_layer import lora_scaling, validate_lora_args
from lora.model_config import LoRAConfig, ModelConfig, lora_targets_of
from lora.peft_names import PeftLayout, peft_layout

__all__ = ["adapter_from_peft", "adapter_to_peft", "is_peft_config", "is_peft_folder", "write_peft_folder"]

PREFIX = "base_model.model."  # PEFT's name of the wrapped model, before the model's own names
# settings that change what the adapter computes in ways this model cannot, with why; refused when set
_UNSUPPORTED = {
    "lora_bias": "LoRA biases (lora_bias) are not supported",
    "modules_to_save": "modules_to_save (fully trained modules beside the LoRA layers) are not supported",
    "layers_to_transform": "layers_to_transform is not supported; adapt every layer",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "target_parameters is not supported",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) are not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
}
# initialisations that also change the base weights: the adapter alone is not the difference to the base
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _tidy(x: float) -> float:
    """``x`` snapped to its 12-digit rounding when a few ulps away (rounding noise): ``(16 / 3) * 6`` is 32.0,
    not 31.999999999999996; ``8 sqrt(3)`` stays as it is."""
    y = float(f"{x:.12g}")
    return y if abs(y - x) <= 4 * math.ulp(x) else x


def _alpha_for(scaling: float, r: int, use_rslora: bool) -> float:
    """The ``lora_alpha`` that gives ``scaling`` at rank ``r``: ``s r``, or ``s sqrt(r)`` with rsLoRA."""
    return _tidy(scaling * (math.sqrt(r) if use_rslora else r))


# ---------------------------------------------------------------------------------------------------------
# Ours -> PEFT


def _check_layers(adapter: Adapter, config: ModelConfig) -> None:
    """Refuse a head, no layers, or layers that are not this architecture's projections of the right shape."""
    if adapter.cls_head is not None:
        raise ValueError("the adapter has a classification head (cls_head), which a PEFT LoRA adapter for "
                         "a causal language model cannot hold")  # fmt: skip
    if not adapter.layers:
        raise ValueError("the adapter has no LoRA layers: nothing to export")
    io = {m: (d_in, d_out) for m, (d_out, d_in) in config.projection_shapes().items()}
    expected = {}
    for m, spec in adapter.layers.items():
        found = re.fullmatch(r"blocks\.(\d+)\.(.+)", m)
        if found is None or found[2] not in io or int(found[1]) >= config.num_layers:
            raise ValueError(
                f"adapter module {quote(m)} is not a projection of this {config.num_layers}-block model"
            )
        d_in, d_out = io[found[2]]
        expected[f"{m}.lora_A"] = torch.empty(spec.r, d_in)
        expected[f"{m}.lora_B"] = torch.empty(d_out, spec.r)
        if adapter.settings.use_dora:
            expected[f"{m}.lora_magnitude"] = torch.empty(d_out)
    problem = describe_mismatch(adapter.tensors(), expected)
    if problem:
        raise ValueError(f"the adapter does not fit the model: {problem}")


def _fuse(
    parts: list[tuple[int, LayerAdapter]], rows: list[int], use_rslora: bool
) -> tuple[int, float, torch.Tensor, torch.Tensor]:
    """The adapted parts ``(j, layer)`` of a fused module whose ``j``-th part has ``rows[j]`` output rows ->
    one adapter ``(r, lora_alpha, A (r, in), B (Σ rows, r))`` (``c_attn``: ``(3C, r)``)."""
    offsets = [sum(rows[:j]) for j in range(len(rows) + 1)]
    first = parts[0][1]
    s_c, dtype = first.scaling, first.lora_A.dtype
    # parts split from one fused PEFT module share their A: B_p stacked under it keeps the rank it had
    shared = len(parts) > 1 and all(
        p.r == first.r and p.scaling == s_c and torch.equal(p.lora_A, first.lora_A) for _, p in parts
    )
    A = first.lora_A if shared else torch.cat([p.lora_A.to(dtype) for _, p in parts])  # (Σ r_p, in)
    B = torch.zeros(offsets[-1], A.shape[0], dtype=dtype, device=A.device)  # (Σ rows, Σ r_p), block-diagonal
    col = 0
    for j, p in parts:
        B_p = p.lora_B if p.scaling == s_c else (p.lora_B.float() * (p.scaling / s_c)).to(dtype)
        B[offsets[j] : offsets[j + 1], col : col + p.r] = B_p
        col += 0 if shared else p.r
    r = A.shape[0]
    return r, _alpha_for(s_c, r, use_rslora), A, B


def _plain(spec: LayerAdapter) -> LayerAdapter:
    """A PiSSA/OLoRA layer as plain LoRA of the original base: rank ``2r``, ``[A; A0]``, ``[B, -B0]``, the same
    scaling; any other layer as it is."""
    if spec.lora_A0 is None:
        return spec
    a, b = spec.factors()
    alpha = _alpha_for(spec.scaling, 2 * spec.r, spec.use_rslora)
    return LayerAdapter(2 * spec.r, alpha, spec.lora_dropout, spec.use_rslora, a, b, spec.lora_magnitude)


def _fused_magnitude(
    parts: list[tuple[int, LayerAdapter]],
    names: list[str],
    module: str,
    base_norms: Mapping[str, torch.Tensor] | None,
) -> torch.Tensor:
    """DoRA's ``m`` of the fused ``module`` (Σ rows,) of projections ``names``: each adapted part's own, the base
    norm ``||W0||_row`` for the others."""
    own = dict(parts)
    rows = []
    for j, name in enumerate(names):
        if j in own:
            rows.append(own[j].lora_magnitude.float())
            continue
        if base_norms is None or name not in base_norms:
            raise ValueError(f"a DoRA adapter that leaves {name} unadapted needs the base's row norms for PEFT's "
                             f"fused {module}: export it with LoRATransformer.export_peft")  # fmt: skip
        rows.append(base_norms[name].float())
    return torch.cat(rows).to(parts[0][1].lora_magnitude.dtype)


def adapter_to_peft(
    adapter: Adapter,
    config: ModelConfig,
    base_model_name_or_path: str | None = None,
    base_norms: Mapping[str, torch.Tensor] | None = None,
    layout: PeftLayout | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json, tensors)`` of ``adapter`` as a PEFT LoRA adapter of the transformers model.

    ``layout`` (``lora/peft_names.py``; default: GPT-2's names for GPT-2's layout, Llama's for a gated MLP)
    names the modules. Tensors are ``base_model.model.<block>.<module>.lora_A.weight`` ``(r, in)`` and
    ``.lora_B.weight`` ``(out, r)`` (DoRA: also ``.lora_magnitude_vector`` ``(out,)``), with ``<block>``
    ``transformer.h.{i}`` or ``model.layers.{i}``; ``r`` and ``lora_alpha`` are the commonest values,
    ``rank_pattern`` / ``alpha_pattern`` name the other modules (``h.{i}.attn.c_attn``,
    ``layers.{i}.self_attn.q_proj``). A classification head cannot be exported. ``base_norms`` (module ->
    ``||W0||_row``) gives a DoRA adapter's untrained parts of a fused module their magnitude.
    """
    layout = peft_layout(config) if layout is None else layout
    adapter = dataclasses.replace(adapter, layers={m: _plain(spec) for m, spec in adapter.layers.items()})
    _check_layers(adapter, config)
    layers = adapter.layers
    dora = adapter.settings.use_dora
    use_rslora = adapter.settings.use_rslora
    rows = layout.rows(config)
    modules: dict[str, tuple[int, float]] = {}  # h.{i}.<module> -> (r, lora_alpha)
    tensors = {}
    for i in range(config.num_layers):
        theirs = f"{layout.block}.{i}."
        found = {}
        for peft, projections in layout.modules.items():
            names = [f"blocks.{i}.{p}" for p in projections]
            parts = [(j, layers[n]) for j, n in enumerate(names) if n in layers]
            if not parts:
                continue
            if len(projections) > 1:  # a fused module
                r, alpha, A, B = _fuse(parts, rows[peft], use_rslora)
                magnitude = _fused_magnitude(parts, names, peft, base_norms) if dora else None
                found[peft] = (r, alpha, A, B, magnitude)
                continue
            spec = parts[0][1]
            alpha = (
                spec.lora_alpha
                if spec.use_rslora == use_rslora
                else _alpha_for(spec.scaling, spec.r, use_rslora)
            )
            found[peft] = (spec.r, alpha, spec.lora_A, spec.lora_B, spec.lora_magnitude)
        for peft, (r, alpha, A, B, magnitude) in found.items():
            modules[theirs + peft] = (r, alpha)
            key = f"{PREFIX}{layout.root}{theirs}{peft}"
            tensors[f"{key}.lora_A.weight"] = A
            tensors[f"{key}.lora_B.weight"] = B
            if magnitude is not None:
                tensors[f"{key}.lora_magnitude_vector"] = magnitude
    r = Counter(r for r, _ in modules.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in modules.values()).most_common(1)[0][0]
    targets = []  # a module in every block by its kind; else each by its name
    for kind in layout.modules:
        blocks = [i for i in range(config.num_layers) if f"{layout.block}.{i}.{kind}" in modules]
        every = len(blocks) == config.num_layers
        targets += [layout.target(kind)] if every else [f"{layout.block}.{i}.{kind}" for i in blocks]
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": adapter.settings.lora_dropout, "use_rslora": use_rslora,
        "target_modules": targets, "rank_pattern": {m: mr for m, (mr, _) in modules.items() if mr != r},
        "alpha_pattern": {m: ma for m, (_, ma) in modules.items() if ma != alpha},
        "fan_in_fan_out": layout.fan_in_fan_out, "bias": "none", "use_dora": dora, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "init_lora_weights": True, "inference_mode": True,
    }  # fmt: skip
    return peft_config, tensors


def write_peft_folder(
    folder: str | Path,
    adapter: Adapter,
    config: ModelConfig,
    base_model_name_or_path: str | None = None,
    base_norms: Mapping[str, torch.Tensor] | None = None,
    layout: PeftLayout | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (:func:`adapter_to_peft`), atomically and
    together; ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)`` loads them."""
    peft_config, tensors = adapter_to_peft(adapter, config, base_model_name_or_path, base_norms, layout)
    return write_adapter_files(folder, tensors, peft_config)


# ---------------------------------------------------------------------------------------------------------
# PEFT -> ours


def is_peft_config(config: Mapping[str, Any]) -> bool:
    """Whether an ``adapter_config.json`` is PEFT's (it names a ``peft_type``) rather than this project's."""
    return "peft_type" in config


def is_peft_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a readable ``adapter_config.json`` written by PEFT."""
    config = Path(path) / ADAPTER_CONFIG_NAME
    try:
        return config.is_file() and is_peft_config(read_json(config))
    except ValueError:
        return False


def _check_settings(peft: Mapping[str, Any], where: Path) -> None:
    """Refuse what this model cannot compute: another method, DoRA, biases, extra trained modules, ..."""
    if peft.get("peft_type") != "LORA":
        raise ValueError(
            f"{where}: peft_type {quote(peft.get('peft_type'))} is not supported; only LORA adapters"
        )
    for key, why in _UNSUPPORTED.items():
        if peft.get(key) not in (None, False, [], {}):
            raise ValueError(f"{where}: {why} ({key} {quote(peft[key])})")
    if peft.get("bias", "none") != "none":
        raise ValueError(
            f"{where}: bias {quote(peft['bias'])} is not supported; only 'none' (no trained biases)"
        )
    init = str(peft.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"{where}: init_lora_weights {quote(peft['init_lora_weights'])} also changes the base "
                         "weights; convert it to plain LoRA with PEFT (path_initial_model_for_weight_conversion)")  # fmt: skip


def _pattern(peft: Mapping[str, Any], key: str, name: str, default: Any, where: Path) -> Any:
    """PEFT's rule: the value of the first key ``k`` of ``peft[key]`` (``rank_pattern``, ``alpha_pattern``) with
    ``(.*\\.)?(k)$`` matching the module's ``name``, else ``default``."""
    patterns = peft.get(key) or {}
    if not isinstance(patterns, dict):
        raise ValueError(f"{where}: {key} must be a JSON object, got {quote(patterns)}")
    for k, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({k})$", name):
                return value
        except re.error as e:
            raise ValueError(f"{where}: {key} key {quote(k)} is not a regular expression ({e})") from None
    return default


def _targeted(peft: Mapping[str, Any], config: ModelConfig, layout: PeftLayout, where: Path) -> list[str]:
    """The modules (``h.{i}.attn.c_attn``, ``layers.{i}.self_attn.q_proj``, ...) that ``target_modules`` and
    ``exclude_modules`` pick, matched as PEFT does against the model's names (``transformer.h.{i}...``,
    ``model.layers.{i}...``); a target that picks none of them is refused."""
    kinds = list(layout.modules)
    names = [f"{layout.root}{layout.block}.{i}.{kind}" for i in range(config.num_layers) for kind in kinds]
    targets = peft.get("target_modules")
    if targets is None and layout.default_targets is None:
        raise ValueError(f"{where}: target_modules is not set, and PEFT has no default for {layout.family}")
    targets = list(layout.default_targets) if targets is None else targets  # PEFT's default for the family
    targets = kinds if targets == "all-linear" else targets  # every linear layer but the LM head

    def matches(spec: Any, name: str) -> bool:
        if isinstance(spec, str):
            try:
                return re.fullmatch(spec, name) is not None
            except re.error as e:
                raise ValueError(f"{where}: {quote(spec)} is not a regular expression ({e})") from None
        return name in spec or any(name.endswith(f".{t}") for t in spec)

    if not isinstance(targets, (str, list)) or not all(isinstance(t, str) for t in targets):
        raise ValueError(
            f"{where}: target_modules must be a list of names or a pattern, got {quote(targets)}"
        )
    if isinstance(targets, str):  # one pattern
        lacking = [] if any(matches(targets, n) for n in names) else [targets]
    else:
        lacking = [t for t in targets if not any(matches([t], n) for n in names)]
    if lacking:
        raise ValueError(f"{where}: target_modules {lacking} are not in this model; {layout.family}'s LoRA layers "
                         f"are {', '.join(kinds)}")  # fmt: skip
    exclude = peft.get("exclude_modules") or []
    picked = [n for n in names if matches(targets, n) and not matches(exclude, n)]
    if not picked:
        raise ValueError(
            f"{where}: target_modules {quote(targets)} and exclude_modules leave no module to adapt"
        )
    return [n.removeprefix(layout.root) for n in picked]


def _tensor_names(raw: Mapping[str, torch.Tensor], root: str, where: Path) -> dict[str, torch.Tensor]:
    """``[base_model.model.][transformer.]h.0.attn.c_attn.lora_A.weight`` -> ``h.0.attn.c_attn.lora_A`` (``root``
    the model's own prefix of its blocks: ``transformer.``, ``model.``)."""
    out = {}
    for key, value in raw.items():
        name = key.removeprefix(PREFIX).removeprefix(root)
        if re.fullmatch(r".+\.(lora_[AB]|lora_magnitude_vector)\.[^.]+\.weight", name):
            raise ValueError(f"{where}: tensor {key} carries an adapter name; only PEFT's saved form "
                             "(<module>.lora_A.weight, as save_pretrained writes) is read")  # fmt: skip
        if name in out:
            raise ValueError(f"{where}: tensor {key} appears twice (with and without a prefix)")
        if not value.is_floating_point():
            raise ValueError(f"{where}: tensor {key} has dtype {value.dtype}, expected floating point")
        out[name.removesuffix(".weight")] = value
    return out


def _split(
    r: int,
    alpha: float,
    pair: tuple[torch.Tensor, torch.Tensor],
    parts: dict[str, int],
    dropout: float,
    use_rslora: bool,
    magnitude: torch.Tensor | None = None,
    base_norms: Mapping[str, torch.Tensor | None] | None = None,
) -> dict[str, LayerAdapter]:
    """A fused module's adapter, ``pair = (A (r, in), B (Σ n_p, r))``, -> one adapter per part (``parts``: its
    name -> its rows ``n_p``, in row order; ``c_attn``: q, k, v of ``C`` each), zero columns of ``B`` dropped.

    With DoRA's ``magnitude`` (Σ n_p,) each part takes its rows; a part whose ``B`` is zero is dropped only if
    its rows equal ``base_norms[part]`` (``||W0||_row``: it computes the base), else kept with its zero ``B``.
    """
    A, B = pair
    s_c = lora_scaling(r, alpha, use_rslora)
    blocks = B.split(list(parts.values()))  # (n_p, r) each
    keep = [b.ne(0).any(dim=0) for b in blocks]  # (r,) each: the columns that contribute
    every = torch.ones(r, dtype=torch.bool, device=B.device)
    if not any(k.any() for k in keep):  # B = 0: a fresh adapter keeps its full rank to train on
        keep = [every] * len(parts)
    rows = [None] * len(parts) if magnitude is None else magnitude.split(list(parts.values()))  # (n_p,) each
    out = {}
    for proj, b, k, m in zip(parts, blocks, keep, rows, strict=True):
        m = None if m is None else m.contiguous()
        norm = (base_norms or {}).get(proj)
        if m is not None and not k.any() and (norm is None or not torch.allclose(m.float(), norm, rtol=1e-6)):
            k = every  # its magnitude rescales the base's rows: kept
        r_p = int(k.sum())
        if r_p:
            alpha_p = alpha if r_p == r else _alpha_for(s_c, r_p, use_rslora)
            out[proj] = LayerAdapter(
                r_p, alpha_p, dropout, use_rslora, A[k].contiguous(), b[:, k].contiguous(), m
            )
    return out


def adapter_from_peft(
    path: str | Path,
    config: ModelConfig,
    base_norms: Mapping[str, torch.Tensor] | None = None,
    layout: PeftLayout | None = None,
) -> Adapter:
    """The PEFT LoRA adapter folder ``path`` (trained on a model of ``config``'s shape, its modules named as
    ``layout`` says: ``lora/peft_names.py``; default as :func:`adapter_to_peft`'s) as an :class:`Adapter`.

    Reads ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ``use_dora``,
    ``target_modules`` and ``exclude_modules``; a fused module (``c_attn``, ``qkv_proj``, ``gate_up_proj``) is
    split as the module docstring says (DoRA's untrained parts recognised by ``base_norms``, the model's
    ``||W0||_row`` per projection). What this
    model cannot compute (another ``peft_type``, biases, ``modules_to_save``, ...), a target it lacks, and missing,
    unexpected, mis-shaped or non-float tensors raise a one-line ``ValueError``. PEFT records no fingerprint
    of the base weights: only the shapes can be checked.
    """
    layout = peft_layout(config) if layout is None else layout
    folder = existing_folder(path, "adapter")
    config_path, weights_path = folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_WEIGHTS_NAME
    peft = read_json(config_path)
    _check_settings(peft, config_path)
    use_rslora, dropout = peft.get("use_rslora", False), peft.get("lora_dropout", 0.0)
    dora = peft.get("use_dora", False)
    for key, value in (("use_rslora", use_rslora), ("use_dora", dora)):
        if not isinstance(value, bool):
            raise ValueError(f"{config_path}: {key} must be true or false, got {quote(value)}")
    modules = {}  # h.{i}.<module> -> (r, lora_alpha)
    for m in _targeted(peft, config, layout, config_path):
        name = f"{layout.root}{m}"  # as PEFT matches it; PEFT's defaults are r 8, lora_alpha 8
        r = _pattern(peft, "rank_pattern", name, peft.get("r", 8), config_path)
        alpha = _pattern(peft, "alpha_pattern", name, peft.get("lora_alpha", 8), config_path)
        try:
            validate_lora_args(r, alpha, dropout)
        except ValueError as e:
            raise ValueError(f"{config_path}: module {m}: {e}") from None
        if r == 0:
            raise ValueError(f"{config_path}: module {m} has rank 0")
        modules[m] = (r, float(alpha))
    if not weights_path.is_file() and (folder / "adapter_model.bin").is_file():
        raise ValueError(f"{folder}: only adapter_model.bin, a pickle, which is not read; save the adapter with "
                         "safe_serialization=True (PEFT's default) to get adapter_model.safetensors")  # fmt: skip
    tensors = _tensor_names(read_safetensors(weights_path), layout.root, weights_path)
    io, expected = (
        layout.io(config),
        {},
    )  # shapes only, on the meta device: a claimed r of 10**9 allocates nothing
    for m, (r, _) in modules.items():
        d_in, d_out = io[m.split(".", 2)[2]]
        expected[f"{m}.lora_A"] = torch.empty(r, d_in, device="meta")
        expected[f"{m}.lora_B"] = torch.empty(d_out, r, device="meta")
        if dora:
            expected[f"{m}.lora_magnitude_vector"] = torch.empty(d_out, device="meta")
    problem = describe_mismatch(tensors, expected)
    if problem:
        raise ValueError(f"{weights_path}: {problem}")
    layers = {}
    rows = layout.rows(config)
    for m, (r, alpha) in modules.items():
        _, i, kind = m.split(".", 2)
        A, B = tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"]
        magnitude = tensors.get(f"{m}.lora_magnitude_vector")
        parts = {f"blocks.{i}.{p}": n for p, n in zip(layout.modules[kind], rows[kind], strict=True)}
        if len(parts) > 1:  # a fused module
            layers.update(_split(r, alpha, (A, B), parts, dropout, use_rslora, magnitude, base_norms))
        else:
            layers[next(iter(parts))] = LayerAdapter(r, alpha, dropout, use_rslora, A, B, magnitude)
    targets, every_mlp = lora_targets_of(layers)
    settings = LoRAConfig(
        lora_r=max(s.r for s in layers.values()),
        lora_alpha=Counter(s.lora_alpha for s in layers.values()).most_common(1)[0][0],
        lora_dropout=dropout, lora_targets=targets, adapt_feedforward=every_mlp, use_rslora=use_rslora,
        use_dora=dora,
    )  # fmt: skip
    extra = {"imported_from": "peft", "peft_base_model_name_or_path": peft.get("base_model_name_or_path")}
    return Adapter(dict(sorted(layers.items())), None, settings, extra)
