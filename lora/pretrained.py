"""The one reader of a base folder: what it holds, read and checked once, then its tensors.

:func:`resolve_base` parses the folder's ``config.json`` once, picks the family importer (this project's
own model folder, or a Hugging Face one by its ``model_type``: :data:`IMPORTERS`, ``lora/gpt2.py`` and
``lora/llama.py``), reads the weights' header once (names, shapes, dtypes; nothing allocated), and checks
it against the architecture on a model built on the ``meta`` device once. It returns a frozen :class:`BaseSource` that everything after it asks
instead of the folder. :func:`read_base_tensors` then reads the weights themselves, under this model's
names. A folder that does not fit raises a one-line ``ValueError`` naming the file and what is wrong.
(A ``pytorch_model.bin`` has no header to read apart: it is unpickled, memory-mapped where it can be, for
the check, and again for its values.)

Weights files: ``model.safetensors``; a Hugging Face folder may instead hold the shards that
``model.safetensors.index.json`` names, or ``pytorch_model.bin``, read with ``torch.load(weights_only=True)``
(tensors and plain containers only, never arbitrary objects).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from lora.base_storage import freeze_half, half_dtype, kept_as
from lora.decoder import Decoder
from lora.errors import first_line, quote
from lora.files import (
    FLOAT_DTYPES,
    check_regular_file,
    describe_mismatch,
    existing_folder,
    read_json,
    read_safetensors,
    read_safetensors_header,
)
from lora.formats import CONFIG_NAME, WEIGHTS_NAME
from lora.gpt2 import check_gpt2_tensors, convert_gpt2, gpt2_config, is_hf_config, strip_gpt2
from lora.llama import (
    LLAMA_TYPES,
    check_llama_tensors,
    check_phi3_tensors,
    convert_llama,
    convert_phi3,
    llama_config,
    strip_llama,
)
from lora.lora_layer import deferred_base_init
from lora.model_config import LoRAConfig, ModelConfig
from lora.skeleton import construction_draws, fill
from lora.tokenizer import tokenizer_files

__all__ = ["BIN_NAME", "BaseSource", "load_base_into", "read_base_tensors", "resolve_base"]

BIN_NAME = "pytorch_model.bin"
HEAD_PREFIX = "cls_head."


class Importer(NamedTuple):
    """A family importer's four pure steps: the config dict -> :class:`ModelConfig`; the file's tensors
    stripped of what is not a weight; checked in the file's names (``meta`` tensors by shape); converted to
    this model's names and layout."""

    config: Callable[[Mapping, object], ModelConfig]
    strip: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
    check: Callable[[Mapping[str, torch.Tensor], ModelConfig, object], None]
    convert: Callable[[Mapping[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]]


# Hugging Face model_type -> its importer
IMPORTERS = {
    "gpt2": Importer(gpt2_config, strip_gpt2, check_gpt2_tensors, convert_gpt2),
    **dict.fromkeys(LLAMA_TYPES, Importer(llama_config, strip_llama, check_llama_tensors, convert_llama)),
    "phi3": Importer(llama_config, strip_llama, check_phi3_tensors, convert_phi3),
}
# mixture-of-experts layouts, named as such when refused
_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "olmoe", "jamba")


@dataclass(frozen=True)
class BaseSource:
    """A base folder, resolved: everything a run needs to know about it before reading its weights.

    ``importer`` is ``"lora"`` (a model folder of this project's) or a Hugging Face ``model_type`` whose
    importer read it (``"gpt2"``, ``"llama"``, ``"mistral"``: :data:`IMPORTERS`);
    ``architecture`` the :class:`ModelConfig`; ``header`` the tensors to load, under this model's names, as
    empty ``meta`` tensors (their dtypes are the file's); ``weights_path`` the file holding them, or a sharded
    checkpoint's ``model.safetensors.index.json`` (what messages name), and ``shards`` the files themselves;
    ``tokenizer_files`` the folder's tokenizer (``[tokenizer.json]``, ``[vocab.json, merges.txt]`` or none).
    """

    folder: Path
    importer: str
    architecture: ModelConfig
    header: Mapping[str, torch.Tensor]
    weights_path: Path
    shards: tuple[Path, ...]
    tokenizer_files: tuple[Path, ...]

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_NAME

    @property
    def hf_model(self) -> bool:
        """Whether the folder holds a Hugging Face model (which needs its own tokenizer)."""
        return self.importer != "lora"


def resolve_base(path: str | Path) -> BaseSource:
    """Read and check the base folder ``path`` once (see the module docstring)."""
    folder = existing_folder(path, "model")
    config_path = folder / CONFIG_NAME
    values = read_json(config_path)
    if is_hf_config(values):  # a Hugging Face folder: checked in its own names, then converted
        importer = values.get("model_type", "gpt2" if "n_embd" in values else None)  # (the oldest GPT-2s)
        family = _importer(importer, config_path)
        arch = family.config(values, config_path)
        weights, shards = _hf_weights(folder)
        tensors = _read(weights, shards, family.strip, header_only=True)
        family.check(tensors, arch, weights)
        header = family.convert(tensors, arch)
    else:
        importer, arch = "lora", ModelConfig.from_dict(values, where=str(config_path))
        weights = folder / WEIGHTS_NAME
        shards = (weights,)
        header = read_safetensors_header(weights)  # names, shapes, dtypes: nothing read or allocated yet
    header = _check_against_architecture(header, arch, weights)
    return BaseSource(folder, importer, arch, header, weights, shards, tuple(tokenizer_files(folder)))


def read_base_tensors(source: BaseSource, with_head: bool = False) -> dict[str, torch.Tensor]:
    """The base tensors of ``source.header``, on the CPU, in the file's dtypes, under this model's names, and with
    ``with_head`` the saved classification head (of ``architecture.num_classes``); memory-mapped from the file,
    not copied (but a GPT-2 file's transposed and a Phi-3 file's split ones). A GPT-2 file's saved LM head must
    equal its token embedding (the tied head is the only one this layout has); a tensor holding nan or inf is
    refused, naming it (else the first step "diverges", and the learning rate is blamed)."""
    keep = {k for k in source.header if with_head or not k.startswith(HEAD_PREFIX)}
    if source.importer != "lora":
        family = IMPORTERS[source.importer]
        tensors = _read(source.weights_path, source.shards, family.strip, header_only=False)
        family.check(tensors, source.architecture, source.weights_path)  # (a tied head's values)
        tensors = family.convert(tensors, source.architecture)
    else:
        tensors = read_safetensors(source.weights_path)
    tensors = {k: v for k, v in tensors.items() if k in keep}
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{source.folder}: the weights hold non-finite values (nan or inf): {key} has {bad:,} "
                             f"of {value.numel():,}; the file is damaged, or was saved from a diverged run")  # fmt: skip
    return tensors


def load_base_into(model: Decoder, source: BaseSource, widen: bool = False) -> torch.dtype | None:
    """Fill ``model``, built on the meta device (:func:`~lora.skeleton.build_on_meta`), with ``source``'s
    tensors as they are (memory-mapped, no copy) and make what the file lacks: the LoRA tensors and a fresh
    classification head, with the random draws building the model would have made (``lora/skeleton.py``).

    A saved head is loaded when the model's has its number of classes; another number gets a fresh one. A
    half-precision file (every tensor bfloat16, or every one float16) stays half, frozen, unless ``widen``
    (float32, what full fine-tuning needs); returns that dtype, or ``None`` for a float32 model.
    """
    with_head = model.cls_head is not None and model.config.num_classes == source.architecture.num_classes
    fresh = construction_draws(model, fresh_head=model.cls_head is not None and not with_head)
    tensors = read_base_tensors(source, with_head)
    half = None if widen else half_dtype(tensors)
    fill(model, {**kept_as(model, tensors, half), **fresh})
    if half is not None:
        freeze_half(model)
    return half


def _check_against_architecture(
    header: Mapping[str, torch.Tensor], arch: ModelConfig, where: Path
) -> dict[str, torch.Tensor]:
    """``header`` checked against the tensors a model of ``arch`` has (built once on the ``meta`` device);
    returned without a saved classification head that ``arch`` does not describe."""
    # the blocks first: even on the meta device, a model of 10**8 blocks would take minutes to build
    blocks = {k.split(".")[1] for k in header if k.startswith("blocks.")}
    if len(blocks) != arch.num_layers:
        raise ValueError(
            f"{where} holds {len(blocks)} blocks, but {CONFIG_NAME} says num_layers {arch.num_layers}"
        )
    try:
        with torch.device("meta"), deferred_base_init():  # the expected tensors, none allocated or derived
            probe = Decoder(arch, LoRAConfig(lora_r=0, lora_targets=()))
    except ValueError as e:
        raise ValueError(f"{where.parent / CONFIG_NAME}: cannot build the model ({e})") from None
    expected = {k: v for k, v in probe.state_dict().items() if probe.is_base_key(k)}
    if arch.num_classes is not None:  # a head config.json describes: the weights must hold it
        expected.update({f"{HEAD_PREFIX}{k}": v for k, v in probe.cls_head.state_dict().items()})
    else:  # a head config.json does not describe is not loaded
        header = {k: v for k, v in header.items() if not k.startswith(HEAD_PREFIX)}
    problem = describe_mismatch(header, expected)
    if problem:  # a config.json that disagrees with the weights is refused before the model is built
        raise ValueError(f"{where}: {problem}")
    return dict(header)


def _hf_weights(folder: Path) -> tuple[Path, tuple[Path, ...]]:
    """``(what messages name, the files holding the tensors)`` of a Hugging Face folder: ``model.safetensors``;
    the shards that ``model.safetensors.index.json`` maps the tensors to (each must be there); or a
    ``pytorch_model.bin``."""
    single, index = folder / WEIGHTS_NAME, folder / f"{WEIGHTS_NAME}.index.json"
    if single.is_file():
        return single, (single,)
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map (tensor name -> shard file)")
        names = sorted({str(f) for f in weight_map.values()})
        odd = [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]
        if odd:
            raise ValueError(f"{index}: shard {quote(odd[0])} is not a .safetensors file beside it")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ValueError(
                f"{index}: shard {missing[0]} is missing ({len(missing)} of {len(names)} shards)"
            )
        return index, tuple(folder / n for n in names)
    if (folder / BIN_NAME).is_file():
        return folder / BIN_NAME, (folder / BIN_NAME,)
    if (folder / f"{BIN_NAME}.index.json").is_file():
        raise ValueError(f"{folder}: sharded .bin checkpoints (pytorch_model.bin.index.json) are not read; save "
                         "the model with safetensors (transformers' default)")  # fmt: skip
    raise ValueError(f"{folder}: no {WEIGHTS_NAME} (or its shards, or {BIN_NAME}) beside {CONFIG_NAME}")


def _importer(model_type: object, where: Path) -> Importer:
    """The importer of ``model_type``; another is refused naming the supported ones."""
    if model_type in IMPORTERS:
        return IMPORTERS[model_type]
    kind = " (a mixture-of-experts model)" if model_type in _MOE_TYPES else ""
    raise ValueError(f"{where}: model_type {quote(model_type)}{kind} is not supported; the supported ones are "
                     f"{', '.join(IMPORTERS)}")  # fmt: skip


def _read(
    path: Path,
    shards: tuple[Path, ...],
    strip: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]],
    header_only: bool,
) -> dict[str, torch.Tensor]:
    """A Hugging Face checkpoint's tensors (``path``: what messages name; ``shards``: its files), ``strip`` ped
    of what the family does not count as weights (``meta`` ones for ``header_only``); in a ``.bin``, the
    weights must be floating point; a tensor in two shards is refused."""
    if path.name != BIN_NAME:
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            part = read_safetensors_header(shard) if header_only else read_safetensors(shard)
            twice = sorted(set(part) & set(tensors))
            if twice:
                raise ValueError(f"{path}: tensor {twice[0]} is in two shards (the second: {shard.name})")
            tensors.update(part)
        return strip(tensors)
    state = strip(_load_bin(path))
    bad = [k for k, v in state.items() if v.dtype not in FLOAT_DTYPES.values()]
    if bad:
        raise ValueError(f"{path}: tensor {bad[0]} has dtype {state[bad[0]].dtype}, expected floating point")
    return {k: v.to("meta") for k, v in state.items()} if header_only else state


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` state dict through ``torch.load(weights_only=True)``: tensors and plain
    containers only, never arbitrary objects (memory-mapped where the format allows)."""
    check_regular_file(path, 1 << 40, "checkpoint")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (pre-zip) format cannot be memory-mapped: read it whole
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors, or a corrupt file
        raise ValueError(f"{path}: not a readable weights-only PyTorch checkpoint ({first_line(e)}); convert "
                         "it with transformers: from_pretrained(folder).save_pretrained(folder)") from None  # fmt: skip
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return state
