"""Where Hugging Face PEFT's LoRA adapters sit in each model family: the modules PEFT adapts, and which of
this model's projections each one holds.

PEFT names the modules of the transformers model it wraps (``base_model.model.`` + the model's own names).
Per block ``i`` (ours: ``blocks.{i}.``), each family's modules and the projections of ours they hold; a
fused module holds several, its output rows stacked in the order listed (q, k, v: ``nh hs``, ``nkv hs``,
``nkv hs`` rows; gate, up: ``F`` rows each):

- ``gpt2``, blocks ``transformer.h.{i}.``: ``attn.c_attn`` (q, k, v), ``attn.c_proj`` (o), ``mlp.c_fc``
  (fc1), ``mlp.c_proj`` (fc2); ``Conv1D`` layers, whose weight is stored ``(in, out)`` (``fan_in_fan_out``).
- ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma``, blocks ``model.layers.{i}.``:
  ``self_attn.{q,k,v,o}_proj`` (q, k, v, o), ``mlp.{gate,up,down}_proj`` (gate, up, down); ``nn.Linear``.
- ``phi3``, blocks ``model.layers.{i}.``: ``self_attn.qkv_proj`` (q, k, v), ``self_attn.o_proj`` (o),
  ``mlp.gate_up_proj`` (gate, up), ``mlp.down_proj`` (down); ``nn.Linear``.

PEFT's LoRA tensors are ``A (r, in)``, ``B (out, r)`` on either kind of layer. ``adapter_config.json`` names
targets by the module's last name (``q_proj``) in the Llama families, and by its name in the block in
GPT-2's (``attn.c_proj`` and ``mlp.c_proj`` share a last name; ``attn.c_attn`` and ``mlp.c_fc`` beside them,
as exports always named them).
"""

from __future__ import annotations

from dataclasses import dataclass

from lora.llama import LLAMA_TYPES
from lora.model_config import ModelConfig

__all__ = ["LAYOUTS", "PeftLayout", "peft_layout"]


@dataclass(frozen=True)
class PeftLayout:
    """One family's PEFT names: ``modules`` maps each adapted module of a block (``"attn.c_attn"``) to the
    block projections of ours it holds, in row order; a block's modules are ``{root}{block}.{i}.<module>``
    (``transformer.`` ``h.0.attn.c_attn``). ``default_targets`` is what PEFT adapts when ``target_modules`` is
    not given (``None``: PEFT has no default for the family)."""

    family: str
    root: str
    block: str
    modules: dict[str, tuple[str, ...]]
    fan_in_fan_out: bool
    default_targets: tuple[str, ...] | None
    short_targets: bool  # target_modules by last name (q_proj); else by the module's name in the block

    def target(self, module: str) -> str:
        """The ``target_modules`` entry for ``module`` in every block: ``q_proj``, or GPT-2's ``attn.c_attn``."""
        return module.rsplit(".", 1)[-1] if self.short_targets else module

    def rows(self, config: ModelConfig) -> dict[str, list[int]]:
        """Each module's output rows per projection it holds: ``attn.c_attn`` -> ``[C, C, C]``."""
        shapes = config.projection_shapes()
        return {m: [shapes[p][0] for p in parts] for m, parts in self.modules.items()}

    def io(self, config: ModelConfig) -> dict[str, tuple[int, int]]:
        """``(in, out)`` of each module of a block."""
        shapes = config.projection_shapes()
        return {
            m: (shapes[parts[0]][1], sum(shapes[p][0] for p in parts)) for m, parts in self.modules.items()
        }


_ATTENTION = {f"self_attn.{p}_proj": (f"attn.{p}_proj",) for p in "qkvo"}
LAYOUTS = {
    "gpt2": PeftLayout(
        "gpt2", "transformer.", "h",
        {"attn.c_attn": ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn.c_proj": ("attn.o_proj",),
         "mlp.c_fc": ("mlp.fc1",), "mlp.c_proj": ("mlp.fc2",)},
        True, ("attn.c_attn",), False,
    ),
    "llama": PeftLayout(
        "llama", "model.", "layers",
        {**_ATTENTION, **{f"mlp.{p}_proj": (f"mlp.{p}_proj",) for p in ("gate", "up", "down")}},
        False, ("q_proj", "v_proj"), True,
    ),
    "phi3": PeftLayout(
        "phi3", "model.", "layers",
        {"self_attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "self_attn.o_proj": ("attn.o_proj",),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj": ("mlp.down_proj",)},
        False, None, True,
    ),
}  # fmt: skip


def peft_layout(config: ModelConfig, model_type: str | None = None) -> PeftLayout:
    """The layout of a model of ``config`` read from a Hugging Face folder of ``model_type`` (``None``: not
    read from one; GPT-2's names for GPT-2's layout, Llama's for a gated MLP). Another raises ``ValueError``."""
    if model_type is None:
        model_type = "gpt2" if not config.family_changes() else "llama" if config.mlp == "gated" else None
    family = "llama" if model_type in LLAMA_TYPES else model_type
    if family not in LAYOUTS:
        what = f"a {model_type} model" if model_type else f"a model that differs from GPT-2 in {', '.join(sorted(config.family_changes()))}"  # fmt: skip
        raise ValueError(
            f"PEFT's names are mapped for gpt2, {', '.join(LLAMA_TYPES)} and phi3 models, not {what}"
        )
    layout = LAYOUTS[family]
    if set(config.projection_shapes()) != {p for parts in layout.modules.values() for p in parts}:
        raise ValueError(f"this model's projections ({', '.join(config.targets())}) are not a {model_type} "
                         "model's: PEFT's names cannot be mapped")  # fmt: skip
    return layout
