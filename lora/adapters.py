"""Adapters on disk and in memory: save/load a base model, save/load/switch/combine adapters, export.

Formats (safetensors and JSON only; nothing is ever read through pickle):

* a model folder: ``config.json`` (the architecture, ``model.config``) and ``model.safetensors`` (every
  non-LoRA tensor, unmerged; the tied ``lm_head`` is stored once as ``wte.weight``; a classification head
  if the model has one);
* an adapter folder: ``adapter_config.json`` (the LoRA settings, the per-module ranks, the base's
  architecture and fingerprint, this project's version) and ``adapter_model.safetensors`` (``lora_A``
  ``(r, in)`` and ``lora_B`` ``(out, r)`` of every adapted module, plus ``cls_head.*`` if any).

Several adapters share one base. The active one lives in the ``LoRALinear`` parameters (so the model's
``state_dict`` and an optimizer see only it); the others wait in ``model._adapter_state``, a plain attribute
that is neither a parameter nor a buffer. Switching re-creates the LoRA tensors and never touches the base
weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lora import __version__
from lora.lora_layer import LoRALinear, lora_modules
from lora.lora_transformer import LoRATransformer, describe_mismatch, parse_targets

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "active_adapter",
    "add_weighted_adapter",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "base_fingerprint",
    "base_state_dict",
    "check_adapter_fits",
    "delete_adapter",
    "from_pretrained",
    "list_adapters",
    "load_adapter",
    "merge_and_export",
    "merged_model",
    "merged_state_dict",
    "parse_adapter",
    "read_adapter",
    "read_json",
    "read_safetensors",
    "save_adapter",
    "save_pretrained",
    "set_adapter",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ARCH_KEYS = (
    "vocab_size",
    "d_model",
    "num_heads",
    "num_layers",
    "d_ff",
    "max_seq_len",
    "dropout",
    "num_classes",
)
# architecture keys an adapter must agree on (dropout is a training setting; the head belongs to the adapter)
SHAPE_KEYS = ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_seq_len")
LORA_OPTIONS = (
    "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "adapt_attention", "adapt_feedforward",
    "use_rslora", "num_classes", "dropout",
)  # fmt: skip
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "adapt_feedforward", "use_rslora")
_LEAVES = ("lora_A", "lora_B")


# ---------------------------------------------------------------------------------------------------------
# Files: atomic writes, checked reads


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, ``os.replace``.

    A reader sees the old file or the new one, never half of one, even if the process dies mid-write;
    the folder is fsynced after the rename so that the rename survives a power cut too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (a power cut after this keeps the new file)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders (Windows): the rename is still atomic
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Save ``tensors`` (moved to CPU, made contiguous) as a safetensors file, atomically."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, safetensors_bytes(cpu, metadata={"format": "pt", **(metadata or {})}))


def _atomic_write_json(path: Path, obj: dict) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _existing_folder(path: str | Path, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such {what} folder")
    return folder


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``; a missing or unparseable file raises a one-line ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file (on CPU). Never unpickles; a bad file raises a one-line ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError and friends: truncated, corrupt, or not safetensors at all
        raise ValueError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# ---------------------------------------------------------------------------------------------------------
# The base model: its tensors, fingerprint, save and load


def base_state_dict(model: LoRATransformer) -> dict[str, torch.Tensor]:
    """Every frozen base tensor, unmerged: no LoRA tensors, no ``cls_head``, the tied ``lm_head`` once.

    A merged layer's weight is returned as ``W - scaling B A`` (computed in float32, as ``unmerge()``).
    """
    layers = dict(lora_modules(model))
    out = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if leaf in _LEAVES or key.startswith("cls_head."):
            continue
        if key == "lm_head.weight" and model.lm_head.weight is model.wte.weight:
            continue
        layer = layers.get(module)
        if leaf == "weight" and layer is not None and layer.merged:
            value = (value.float() - layer.delta_weight()).to(value.dtype)
        out[key] = value.detach()
    return out


def base_fingerprint(model: LoRATransformer) -> str:
    """First 16 hex digits of a sha256 over the names, shapes, dtypes and bytes of the base tensors.

    Deterministic (sorted names, unmerged values); independent of the adapters and of a classification head.
    """
    h = hashlib.sha256()
    for key, value in sorted(base_state_dict(model).items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{key}|{_shape(t)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_pretrained(model: LoRATransformer, path: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (base weights unmerged, plus ``cls_head`` if any)."""
    folder = Path(path)
    tensors = base_state_dict(model)
    if model.cls_head is not None:
        tensors.update({f"cls_head.{k}": v for k, v in model.cls_head.state_dict().items()})
    atomic_save_safetensors(tensors, folder / WEIGHTS_NAME)
    _atomic_write_json(folder / CONFIG_NAME, {k: model.config[k] for k in ARCH_KEYS})
    return folder


def _architecture(config: dict, path: Path) -> dict:
    missing = [k for k in SHAPE_KEYS if k not in config]
    if missing:
        raise ValueError(f"{path}: missing architecture keys {missing}")
    return {k: config[k] for k in ARCH_KEYS if k in config}


def from_pretrained(path: str | Path, **lora_options: object) -> LoRATransformer:
    """A :class:`LoRATransformer` with the architecture and weights in ``path`` and the given LoRA options.

    ``lora_options`` are any of ``lora_r, lora_alpha, lora_dropout, lora_targets, adapt_attention,
    adapt_feedforward, use_rslora, num_classes, dropout``. A saved classification head is loaded when
    ``num_classes`` matches it; another ``num_classes`` gets a fresh head. The model takes the file's
    dtype when all its floating tensors share one.
    """
    folder = _existing_folder(path, "model")
    unknown = sorted(set(lora_options) - set(LORA_OPTIONS))
    if unknown:
        raise ValueError(f"unknown from_pretrained options {unknown}; expected some of {list(LORA_OPTIONS)}")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    arch = _architecture(read_json(config_path), config_path)
    try:
        model = LoRATransformer(**{**arch, **lora_options})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: cannot build the model ({_first_line(e)})") from None
    tensors = read_safetensors(weights_path)
    expected = base_state_dict(model)
    saved_head = {k: v for k, v in tensors.items() if k.startswith("cls_head.")}
    if model.cls_head is not None and model.config["num_classes"] == arch.get("num_classes"):
        expected.update({f"cls_head.{k}": v for k, v in model.cls_head.state_dict().items()})
    else:
        tensors = {k: v for k, v in tensors.items() if k not in saved_head}
    _check_tensors(tensors, expected, weights_path)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) != torch.float32:
        model.to(dtype)
    own = model.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    return model


def _check_tensors(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: Path) -> None:
    problem = describe_mismatch(got, expected)
    if problem:
        raise ValueError(f"{path}: {problem}")


# ---------------------------------------------------------------------------------------------------------
# Adapters in memory


@dataclass
class LayerAdapter:
    """One module's adapter: ``scaling * B A`` with ``A: (r, in)``, ``B: (out, r)``."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    lora_A: torch.Tensor  # noqa: N815 - the layer's own names
    lora_B: torch.Tensor  # noqa: N815


@dataclass
class Adapter:
    """An adapter not currently active: its tensors per module, its head, and its settings (``info``)."""

    layers: dict[str, LayerAdapter]
    cls_head: dict[str, torch.Tensor] | None
    info: dict


@dataclass
class AdapterState:
    """Which adapter is active (``None``: none) and the inactive ones, kept as a plain model attribute."""

    active: str | None
    active_extra: dict = field(default_factory=dict)  # the active adapter's fields other than LORA_KEYS
    inactive: dict[str, Adapter] = field(default_factory=dict)


def _state(model: LoRATransformer) -> AdapterState:
    state = model.__dict__.get("_adapter_state")
    if state is None:
        has = any(layer.r > 0 for _, layer in lora_modules(model)) or model.cls_head is not None
        state = AdapterState(active="default" if has else None)
        model._adapter_state = state
    return state


def _dropout_p(layer: LoRALinear) -> float:
    return float(layer.lora_dropout.p) if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


def _capture(model: LoRATransformer, info: dict) -> Adapter:
    """A copy of the active adapter as an :class:`Adapter` (an optimizer still holding the old
    parameters cannot change it)."""
    layers = {}
    for name, layer in lora_modules(model):
        if layer.r > 0:
            layers[name] = LayerAdapter(
                layer.r, layer.lora_alpha, _dropout_p(layer), layer.use_rslora,
                layer.lora_A.detach().clone(), layer.lora_B.detach().clone(),
            )  # fmt: skip
    head = None if model.cls_head is None else {k: v.clone() for k, v in model.cls_head.state_dict().items()}
    return Adapter(layers, head, {**_lora_settings(model), **info})


def _lora_settings(model: LoRATransformer) -> dict:
    return {k: model.lora_config[k] for k in LORA_KEYS}


def _install(model: LoRATransformer, adapter: Adapter | None) -> None:
    """Put ``adapter`` (``None``: no adapter) in the layers, unmerged; base weights are not touched."""
    model.unmerge_lora()
    layers = {} if adapter is None else adapter.layers
    with torch.no_grad():
        for name, layer in lora_modules(model):
            spec = layers.get(name)
            if spec is None:
                layer.reset_lora(0)
                continue
            layer.reset_lora(spec.r, spec.lora_alpha, spec.lora_dropout, spec.use_rslora)
            layer.lora_A.copy_(spec.lora_A)
            layer.lora_B.copy_(spec.lora_B)
        head = None if adapter is None else adapter.cls_head
        if head is None:
            model.cls_head = None
        else:
            n, d = head["weight"].shape
            if model.cls_head is None or model.cls_head.weight.shape != (n, d):
                w = model.wte.weight
                model.cls_head = nn.Linear(d, n, device=w.device, dtype=w.dtype)
            model.cls_head.load_state_dict(head)
        model.config["num_classes"] = None if head is None else int(head["weight"].shape[0])
    if adapter is not None:
        model.lora_config.update({k: adapter.info[k] for k in LORA_KEYS if k in adapter.info})
    else:
        model.lora_config.update(lora_r=0, lora_targets=[], adapt_feedforward=False)


def list_adapters(model: LoRATransformer) -> list[str]:
    """Names of all adapters on ``model``, the active one first."""
    state = _state(model)
    return ([state.active] if state.active else []) + sorted(state.inactive)


def active_adapter(model: LoRATransformer) -> str | None:
    """The name of the active adapter (``None`` if the model has none)."""
    return _state(model).active


def _activate(model: LoRATransformer, name: str, adapter: Adapter) -> None:
    """Park the active adapter with the inactive ones and put ``adapter`` in the layers as ``name``.

    A merged model is unmerged, switched and merged again (float rounding of that round trip applies).
    """
    state = _state(model)
    was_merged = any(layer.merged for _, layer in lora_modules(model))
    model.unmerge_lora()
    if state.active is not None:
        state.inactive[state.active] = _capture(model, state.active_extra)
    state.inactive.pop(name, None)
    _install(model, adapter)
    state.active = name
    state.active_extra = {k: v for k, v in adapter.info.items() if k not in LORA_KEYS}
    if was_merged:
        model.merge_lora()


def set_adapter(model: LoRATransformer, name: str) -> None:
    """Make adapter ``name`` active: no reload of the base, and (unmerged) base weights untouched."""
    state = _state(model)
    if name == state.active:
        return
    if name not in state.inactive:
        raise ValueError(f"no adapter named {name!r}; the adapters are {list_adapters(model)}")
    _activate(model, name, state.inactive[name])


def delete_adapter(model: LoRATransformer, name: str) -> None:
    """Forget adapter ``name``; deleting the active one leaves the model with no adapter (the base)."""
    state = _state(model)
    if name == state.active:
        _install(model, None)
        state.active, state.active_extra = None, {}
    elif name in state.inactive:
        del state.inactive[name]
    else:
        raise ValueError(f"no adapter named {name!r}; the adapters are {list_adapters(model)}")


def _get(model: LoRATransformer, name: str | None) -> tuple[str, Adapter]:
    state = _state(model)
    name = state.active if name is None else name
    if name is not None and name == state.active:
        return name, _capture(model, state.active_extra)
    if name in state.inactive:
        return name, state.inactive[name]
    raise ValueError(f"no adapter named {name!r}; the adapters are {list_adapters(model)}")


def add_weighted_adapter(model: LoRATransformer, weights: Mapping[str, float], name: str) -> str:
    """Add adapter ``name`` with ``ΔW = Σ_i w_i s_i B_i A_i`` exactly, by concatenating ranks.

    Per module ``A = [A_1; A_2; ...]`` ``(Σ r_i, in)`` and ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``
    ``(out, Σ r_i)`` with scaling 1 (``lora_alpha = r``, no rsLoRA), so ``B A = Σ w_i s_i B_i A_i``.
    The new adapter is not activated. Adapters with classification heads cannot be combined.
    """
    state = _state(model)
    if not weights:
        raise ValueError("add_weighted_adapter needs at least one adapter and weight")
    if name in list_adapters(model):
        raise ValueError(f"an adapter named {name!r} exists already; delete it first or pick another name")
    sources = {n: _get(model, n)[1] for n in weights}
    heads = [n for n, a in sources.items() if a.cls_head is not None]
    if heads:
        raise ValueError(f"adapters {heads} have classification heads, which cannot be combined exactly")
    modules = sorted({m for a in sources.values() for m in a.layers})
    kw = {"device": model.wte.weight.device, "dtype": torch.float32}  # parked adapters may be elsewhere
    layers = {}
    for m in modules:
        parts = [(float(weights[n]), a.layers[m]) for n, a in sources.items() if m in a.layers]
        A = torch.cat([s.lora_A.to(**kw) for _, s in parts], dim=0)  # (Σ r_i, in)
        B = torch.cat([w * _scaling(s) * s.lora_B.to(**kw) for w, s in parts], dim=1)  # (out, Σ r_i)
        r = A.shape[0]
        dtype = parts[0][1].lora_A.dtype
        layers[m] = LayerAdapter(r, float(r), 0.0, False, A.to(dtype), B.to(dtype))
    r_max = max((s.r for s in layers.values()), default=0)
    targets = sorted({m.rsplit(".", 1)[-1][0] for m in modules if m.endswith("_proj")})
    info = {
        "lora_r": r_max, "lora_alpha": float(r_max), "lora_dropout": 0.0,
        "lora_targets": list(parse_targets(targets)), "use_rslora": False,
        "adapt_feedforward": any(m.endswith(("fc1", "fc2")) for m in modules),
        "made_from": {"method": "add_weighted_adapter", "weights": {n: float(w) for n, w in weights.items()}},
    }  # fmt: skip
    state.inactive[name] = Adapter(layers, None, info)
    return name


def _scaling(spec: LayerAdapter) -> float:
    return spec.lora_alpha / (math.sqrt(spec.r) if spec.use_rslora else spec.r)


# ---------------------------------------------------------------------------------------------------------
# Adapters on disk


def _adapter_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    out = {}
    for m, spec in adapter.layers.items():
        out[f"{m}.lora_A"], out[f"{m}.lora_B"] = spec.lora_A, spec.lora_B
    for k, v in (adapter.cls_head or {}).items():
        out[f"cls_head.{k}"] = v
    return out


def save_adapter(
    model: LoRATransformer, path: str | Path, adapter_name: str | None = None, extra: dict | None = None
) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) to ``path``; ``extra`` goes into its config.

    ``adapter_model.safetensors`` holds only the LoRA tensors (and ``cls_head.*``);
    ``adapter_config.json`` the settings, per-module ranks, base architecture and fingerprint, version.
    """
    name, adapter = _get(model, adapter_name)
    info = dict(adapter.info)
    clash = sorted(set(extra or {}) & _RESERVED)
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite adapter settings")
    config = {
        **info,
        **(extra or {}),
        "adapter_name": name,
        "scaling": "alpha/sqrt(r)" if info.get("use_rslora") else "alpha/r",
        "num_classes": None if adapter.cls_head is None else int(adapter.cls_head["weight"].shape[0]),
        "modules": {m: {"r": s.r, "lora_alpha": s.lora_alpha} for m, s in sorted(adapter.layers.items())},
        "base": {k: model.config[k] for k in SHAPE_KEYS},
        "base_fingerprint": base_fingerprint(model),
        "version": __version__,
    }
    folder = Path(path)
    atomic_save_safetensors(_adapter_tensors(adapter), folder / ADAPTER_WEIGHTS_NAME, {"adapter_name": name})
    _atomic_write_json(folder / ADAPTER_CONFIG_NAME, config)
    return folder


_RESERVED = {
    "adapter_name",
    "scaling",
    "num_classes",
    "modules",
    "base",
    "base_fingerprint",
    "version",
    *LORA_KEYS,
}


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of the adapter folder ``path``, with the config's required keys checked."""
    folder = _existing_folder(path, "adapter")
    config_path = folder / ADAPTER_CONFIG_NAME
    config = read_json(config_path)
    missing = [k for k in ("modules", "base", "base_fingerprint", *LORA_KEYS) if k not in config]
    if missing:
        raise ValueError(f"{config_path}: missing keys {missing}")
    return config, read_safetensors(folder / ADAPTER_WEIGHTS_NAME)


def check_adapter_fits(model: LoRATransformer, config: dict, force: bool = False) -> list[str]:
    """Raise ``ValueError`` if the adapter's base differs from ``model``'s; return warnings (with ``force``).

    Other shapes always refuse; the same shapes with other weights (fingerprint) refuse unless ``force``.
    """
    base = config.get("base", {})
    diff = [
        f"{k}: adapter {base.get(k)!r}, model {model.config[k]!r}"
        for k in SHAPE_KEYS
        if base.get(k) != model.config[k]
    ]
    if diff:
        raise ValueError("adapter was trained on a base of another architecture: " + "; ".join(diff))
    own = base_fingerprint(model)
    if config["base_fingerprint"] != own:
        msg = (
            f"adapter was trained on other base weights (fingerprint {config['base_fingerprint']}, "
            f"this base {own})"
        )
        if not force:
            raise ValueError(msg + "; pass force=True (--force) to load it anyway")
        return [msg + "; loaded anyway (force)"]
    return []


def parse_adapter(model: LoRATransformer, config: dict, tensors: dict, path: Path) -> Adapter:
    """Check the tensors against ``model``'s layers and the config's ranks; build an :class:`Adapter`."""
    where = path / ADAPTER_WEIGHTS_NAME
    layers_by_name = dict(lora_modules(model))
    modules = config["modules"]
    expected = {}
    for m, spec in modules.items():
        layer = layers_by_name.get(m)
        if layer is None:
            raise ValueError(f"{path / ADAPTER_CONFIG_NAME}: module {m!r} is not a LoRA layer of this model")
        r = spec.get("r") if isinstance(spec, dict) else None
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{path / ADAPTER_CONFIG_NAME}: module {m!r} has bad rank {r!r}")
        expected[f"{m}.lora_A"] = torch.empty(r, layer.in_features)
        expected[f"{m}.lora_B"] = torch.empty(layer.out_features, r)
    num_classes = config.get("num_classes")
    if num_classes is not None:
        d = model.config["d_model"]
        expected.update(
            {"cls_head.weight": torch.empty(num_classes, d), "cls_head.bias": torch.empty(num_classes)}
        )
    _check_tensors(tensors, expected, where)
    use_rslora, dropout = bool(config["use_rslora"]), float(config["lora_dropout"])
    layers = {
        m: LayerAdapter(
            spec["r"],
            float(spec.get("lora_alpha", config["lora_alpha"])),
            dropout,
            use_rslora,
            tensors[f"{m}.lora_A"],
            tensors[f"{m}.lora_B"],
        )
        for m, spec in modules.items()
    }
    head = None if num_classes is None else {k: tensors[f"cls_head.{k}"] for k in ("weight", "bias")}
    info = {k: v for k, v in config.items() if k not in _RESERVED - set(LORA_KEYS)}
    return Adapter(layers, head, info)


def load_adapter(
    model: LoRATransformer, path: str | Path, adapter_name: str = "default", force: bool = False
) -> str:
    """Load the adapter in ``path`` as ``adapter_name`` and make it active; returns the name.

    Refuses (``ValueError`` saying what differs) an adapter made for a base of another architecture, or
    for other base weights (fingerprint); ``force=True`` skips only the fingerprint check. The adapter
    may have another rank, targets or head than the model had: layers are reconfigured.
    """
    path = Path(path)
    config, tensors = read_adapter(path)
    for w in check_adapter_fits(model, config, force):
        warnings.warn(w, stacklevel=2)
    adapter = parse_adapter(model, config, tensors, path)
    _activate(model, adapter_name, adapter)
    return adapter_name


# ---------------------------------------------------------------------------------------------------------
# Merge and export


def merged_state_dict(model: LoRATransformer) -> dict[str, torch.Tensor]:
    """Base tensors with the active adapter folded in (``W0 + scaling B A`` in float32, cast once)."""
    layers = dict(lora_modules(model))
    tensors = base_state_dict(model)
    for key in tensors:
        module, _, leaf = key.rpartition(".")
        layer = layers.get(module)
        if leaf == "weight" and layer is not None and layer.r > 0 and layer._adapter_enabled:
            w = tensors[key]
            tensors[key] = (w.float() + layer.delta_weight()).to(w.dtype)
    if model.cls_head is not None:
        tensors.update({f"cls_head.{k}": v.detach() for k, v in model.cls_head.state_dict().items()})
    return tensors


def merged_model(model: LoRATransformer) -> LoRATransformer:
    """A LoRA-free copy of ``model`` (``lora_r = 0``, eval mode) with the active adapter merged in."""
    tensors = merged_state_dict(model)
    with torch.random.fork_rng(devices=[]):  # the fresh init is overwritten; leave the caller's RNG alone
        plain = LoRATransformer(**{k: model.config[k] for k in ARCH_KEYS}, lora_r=0)
    plain.to(device=model.wte.weight.device, dtype=model.wte.weight.dtype)
    missing, unexpected = plain.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # lm_head is tied to wte
    return plain.eval()


def merge_and_export(model: LoRATransformer, path: str | Path, extra: dict | None = None) -> Path:
    """Write a plain model folder (no LoRA tensors) with the active adapter merged; ``model`` is unchanged.

    ``from_pretrained(path)`` gives a model whose logits equal base + adapter (to float rounding).
    """
    folder = Path(path)
    config = {k: model.config[k] for k in ARCH_KEYS}
    state = _state(model)
    config["merged_adapter"] = {"name": state.active, **(extra or {})}
    atomic_save_safetensors(merged_state_dict(model), folder / WEIGHTS_NAME)
    _atomic_write_json(folder / CONFIG_NAME, config)
    return folder
