"""Merged export to a Hugging Face folder: the model with its adapter folded in, as transformers saves one.

``AutoModelForCausalLM.from_pretrained(folder)`` then gives the merged model's logits (vLLM, llama.cpp's
converter and every other tool read the same folder). It holds:

* ``config.json``: the base folder's own (its ``model_type``, token ids, sliding window, ... kept as they
  were; only ``dtype`` / ``torch_dtype`` set to the weights'), or, for a base of this project's format, one
  written from the architecture (:func:`~lora.gpt2.gpt2_hf_config`, :func:`~lora.llama.llama_hf_config`:
  GPT-2's layout as ``gpt2``; a Llama-layout one as ``llama``, ``qwen2``, ``qwen3`` or ``gemma``). Either
  way it is read back by the family's importer, which must give the model's architecture again: what a
  Hugging Face config cannot express (a mixture of families' fields) is refused, naming the field.
* ``model.safetensors``, or above ``max_shard_size`` the shards ``model-00001-of-0000N.safetensors`` and
  ``model.safetensors.index.json`` (``metadata.total_size``: the tensors' bytes; ``weight_map``: tensor ->
  shard), in the family's names and layout (:data:`EXPORTERS`: GPT-2's ``c_attn`` fused and transposed,
  Phi-3's ``qkv_proj`` and ``gate_up_proj`` fused; a tied head stored once, as the embedding).
* the base folder's tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``) and
  :data:`TOKENIZER_EXTRAS` where it has them.

The weights keep the model's dtype: each adapted weight is ``W0 + s B A`` computed in float32 and cast once
(``LoRALinear.merged_weight``), so a bf16 base exports bf16. A base stored narrower than it was loaded (4-bit
NF4 or bf16 storage, ``quantize_base``) is refused: its weights were rounded, and the merged ones would be
rounded again; export from the full-precision base (``scripts/merge_adapter.py`` loads it so). A model with a
classification head (``cls_head``) is refused: a causal-LM folder has no place for it.

The folder is written aside and renamed into place (:func:`~lora.files.atomic_folder`): it appears whole or
not at all, and only where nothing is (a missing or empty folder). Every refusal comes before anything is
written. Memory: the merged weights of the adapted projections (the rest are the model's own tensors), and
one shard's bytes at a time.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from lora.files import (
    atomic_folder,
    atomic_write_files,
    json_bytes,
    read_json,
    read_limited,
    safetensors_file_bytes,
)
from lora.formats import CONFIG_NAME, WEIGHTS_NAME
from lora.gpt2 import gpt2_hf_config, gpt2_tensors
from lora.llama import ARCHITECTURES, LLAMA_TYPES, llama_hf_config, llama_tensors, phi3_tensors
from lora.model_config import ModelConfig
from lora.pretrained import IMPORTERS, BaseSource
from lora.tokenizer import tokenizer_files

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "EXPORTERS", "TOKENIZER_EXTRAS", "check_target", "export_hf", "hf_config",
           "parse_size", "shard"]  # fmt: skip

# model_type -> this model's tensors converted to the family's names and layout (the importers' inverses)
EXPORTERS: dict[str, Callable[[Mapping[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]]] = {
    "gpt2": gpt2_tensors,
    **dict.fromkeys(LLAMA_TYPES, llama_tensors),
    "phi3": phi3_tensors,
}
# the files beside the tokenizer that a base folder may have, copied as they are
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "generation_config.json", "tokenizer.model", "chat_template.jinja")  # fmt: skip
DEFAULT_MAX_SHARD_SIZE = "5GB"  # the Hub's long-standing shard size (transformers 5 writes up to 50GB)
INDEX_NAME = f"{WEIGHTS_NAME}.index.json"
_DTYPE_KEYS = ("dtype", "torch_dtype")  # the weights' dtype in config.json: transformers 5's, and 4's word
_MAX_COPIED_BYTES = 1 << 30  # a tokenizer file larger than 1 GiB is not a tokenizer file
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 1 << 10, "MIB": 1 << 20,
          "GIB": 1 << 30, "TIB": 1 << 40}  # fmt: skip


def parse_size(value: int | str) -> int:
    """A size in bytes: an integer, or a string ``"5GB"``, ``"500MB"``, ``"64KiB"`` (KB, MB, GB, TB decimal as
    the Hub's; KiB, MiB, GiB, TiB binary). Anything else, or a size below 1 byte, raises ``ValueError``."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        found = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", str(value))
        if not found or found[2].upper() not in _UNITS:
            raise ValueError(f"max_shard_size {value!r} is not a size; expected bytes or a number with KB, MB, "
                             "GB, TB (or KiB, MiB, GiB, TiB), such as 5GB")  # fmt: skip
        size = int(float(found[1]) * _UNITS[found[2].upper()])
    if size < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, got {value!r}")
    return size


def hf_config(config: ModelConfig, base: BaseSource | None) -> tuple[str, dict]:
    """``(model_type, config.json mapping)`` of the export of a model of ``config`` whose base is ``base``:
    a Hugging Face base folder's own ``config.json``, else one written from ``config`` (the module
    docstring). Refused (one-line ``ValueError``) unless the family's importer reads it back as ``config``."""
    if config.num_classes is not None:
        raise ValueError(f"the model has a classification head (cls_head, {config.num_classes} classes): a Hugging "
                         "Face causal-LM folder has no place for it; only a language model is exported")  # fmt: skip
    if base is not None and base.hf_model:
        where: object = base.config_path
        values = read_json(base.config_path)
        kind = values.setdefault("model_type", "gpt2" if "n_embd" in values else None)  # (old GPT-2s: none)
        values.setdefault("architectures", ["GPT2LMHeadModel" if kind == "gpt2" else ARCHITECTURES[kind]])
    else:  # a model of this project's format: its architecture written in the family's words
        where = "the model"
        values = gpt2_hf_config(config) if config.positions == "learned" else llama_hf_config(config)
        kind = values["model_type"]
    try:
        again = IMPORTERS[kind].config(values, where)
    except ValueError as e:
        raise ValueError(f"cannot write the model as a Hugging Face {kind} folder: {e}") from None
    unset = {"dropout": 0.0, "num_classes": None}  # a training setting, and the head refused above
    ours, theirs = dataclasses.replace(config, **unset), dataclasses.replace(again, **unset)
    differ = [f"{f.name} {getattr(ours, f.name)!r} (read back: {getattr(theirs, f.name)!r})"
              for f in dataclasses.fields(ModelConfig) if getattr(ours, f.name) != getattr(theirs, f.name)]  # fmt: skip
    if differ and base is not None and base.hf_model:
        raise ValueError(f"{where} describes another model than the one exported: {'; '.join(differ)}")
    if differ:
        raise ValueError(f"the model's layout has no Hugging Face family: as {kind}, its {'; '.join(differ)}")
    return kind, values


def check_target(path: str | Path) -> Path:
    """``path`` as a ``Path`` if an export may be written there (nothing there, or an empty folder); else a
    one-line ``ValueError``: an export never replaces what is there."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(
            f"{path} is not empty: a Hugging Face export is written only into a new or empty folder"
        )
    return path


def shard(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """``tensors`` in order, cut into shards of at most ``max_bytes`` as transformers cuts them: a tensor that
    would take its shard past the limit starts the next one; a tensor larger than the limit is a shard alone."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def export_hf(
    path: str | Path,
    config: ModelConfig,
    merged: Callable[[], Mapping[str, torch.Tensor]],
    base: BaseSource | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write the Hugging Face folder ``path`` (see the module docstring) of a model of ``config`` whose merged
    tensors, under this model's names, ``merged()`` returns (called once every cheap check has passed);
    ``base`` is the folder the model's base was read from (its ``config.json`` and tokenizer files), ``None``
    for none. ``check`` is called with the finished folder before it is renamed into place: what it raises
    leaves nothing written. Returns ``path``."""
    path = check_target(path)
    max_bytes = parse_size(max_shard_size)
    kind, values = hf_config(config, base)
    tensors = merged()  # (a 4-bit or bf16-stored base is refused here: its merged weights would be rounded)
    theirs = EXPORTERS[kind](tensors, config)
    probe = {k: v.to("meta") for k, v in theirs.items()}  # the names and shapes the family's reader checks
    IMPORTERS[kind].check(IMPORTERS[kind].strip(probe), config, path)
    name = str(tensors["wte.weight"].dtype).removeprefix("torch.")  # the model's weights' dtype
    for key in [k for k in _DTYPE_KEYS if k in values] or _DTYPE_KEYS:  # the base's spelling; else both
        values[key] = name
    extras = [] if base is None else [*tokenizer_files(base.folder),
                                      *(base.folder / n for n in TOKENIZER_EXTRAS if (base.folder / n).is_file())]  # fmt: skip
    parts = shard(theirs, max_bytes)
    with atomic_folder(path) as tmp:
        if len(parts) == 1:
            atomic_write_files({tmp / WEIGHTS_NAME: safetensors_file_bytes(parts[0])})
        else:
            weight_map = {}
            for i, part in enumerate(parts, 1):
                file = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
                atomic_write_files({tmp / file: safetensors_file_bytes(part)})
                weight_map.update(dict.fromkeys(part, file))
            total = sum(t.numel() * t.element_size() for t in theirs.values())
            index = {"metadata": {"total_size": total, "total_parameters": sum(t.numel() for t in theirs.values())},
                     "weight_map": dict(sorted(weight_map.items()))}  # fmt: skip
            atomic_write_files({tmp / INDEX_NAME: json_bytes(index)})
        copies = {tmp / f.name: read_limited(f, _MAX_COPIED_BYTES, "tokenizer file") for f in extras}
        atomic_write_files({**copies, tmp / CONFIG_NAME: json_bytes(values)})
        del tensors, theirs, parts  # (the check may read the whole model back)
        if check is not None:
            check(tmp)
    return path
