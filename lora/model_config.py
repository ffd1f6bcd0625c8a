"""The model's typed settings: its architecture (:class:`ModelConfig`) and its LoRA (:class:`LoRAConfig`).

The same words from the command line to the layer: ``lora_r`` is ``lora_r`` here, in ``TrainConfig``,
in YAML and in ``adapter_config.json``, until it becomes the layer's ``r``. The rules are checked once,
here (and the LoRA arguments by :func:`lora.lora_layer.validate_lora_args`, the layer's own rule).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lora.errors import ConfigError, quote
from lora.lora_layer import BASE_DERIVED_INITS, lora_scaling, validate_lora_args, validate_lora_init

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_TARGETS",
    "FAMILY_CHOICES",
    "PROJECTIONS",
    "LoRAConfig",
    "ModelConfig",
    "parse_targets",
    "target_of",
]

ATTENTION_TARGETS = ("q", "k", "v", "o")
PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}  # target -> the module's name
FEEDFORWARD = ("fc1", "fc2", "gate_proj", "up_proj", "down_proj")  # a plain MLP's, a gated MLP's
# the MLP's activation: gelu_tanh is GPT-2's (tanh-approximated GELU), gelu the exact (erf) one
ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "silu")
# What differs between decoder families, as ModelConfig fields, and the values this version builds, GPT-2's
# first (its values are the defaults, so every config.json and adapter folder written before reads
# unchanged). lora/decoder.py branches on them; a family is a set of values, not a copy of the model.
FAMILY_CHOICES: dict[str, tuple[object, ...]] = {
    # the blocks' and the final normalisation: LayerNorm (weight and bias), RMSNorm (weight only), or Gemma's
    # RMSNorm that scales by 1 + weight (its weights start at 0)
    "norm": ("layernorm", "rmsnorm", "rmsnorm_plus_one"),
    # plain: fc2(act(fc1(x))); gated (SwiGLU): down_proj(act(gate_proj(x)) * up_proj(x))
    "mlp": ("plain", "gated"),
    # learned: an embedding wpe (max_seq_len, d_model) added to wte; rotary: q and k rotated (rope_theta)
    "positions": ("learned", "rotary"),
    "bias": (True, False),  # biases on every block projection (False: on none)
    "qkv_bias": (False, True),  # biases on q, k and v even where bias is False (Qwen2)
    "qk_norm": (False, True),  # an RMSNorm over each head of q and of k, before the rotation (Qwen3)
    "scale_embeddings": (False, True),  # the token embeddings times sqrt(d_model) (Gemma)
    "tied_head": (True, False),  # the LM head is the token embedding (wte), stored once; else its own weight
}


def target_of(module_name: str) -> str | None:
    """``"blocks.0.attn.v_proj"`` -> ``"v"``; an MLP layer -> ``"ff"``; anything else -> ``None``."""
    leaf = module_name.rsplit(".", 1)[-1]
    if leaf in FEEDFORWARD:
        return "ff"
    return next((t for t, name in PROJECTIONS.items() if name == leaf), None)


def parse_targets(lora_targets: Sequence[str] | str) -> tuple[str, ...]:
    """``"q,v"`` or ``["v", "q"]`` -> ``("q", "v")``: in q, k, v, o order, once each; others raise."""
    if isinstance(lora_targets, str):
        items = lora_targets.split(",")
    elif isinstance(lora_targets, Sequence) and all(isinstance(t, str) for t in lora_targets):
        items = list(lora_targets)
    else:
        raise ConfigError(f"lora_targets must be a list of q, k, v, o, got {quote(lora_targets)}")
    items = [t.strip().lower() for t in items if t.strip()]
    bad = [t for t in items if t not in ATTENTION_TARGETS]
    if bad:
        raise ConfigError(f"lora_targets must be a subset of q,k,v,o, got {','.join(items)}")
    return tuple(t for t in ATTENTION_TARGETS if t in items)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {quote(value)}")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a decoder; ``d_ff`` defaults to ``4 d_model``, ``num_kv_heads`` to ``num_heads``.

    ``layer_norm_eps`` and ``activation`` (of :data:`ACTIVATIONS`) change no tensor's shape; they are GPT-2's
    ``layer_norm_epsilon`` and ``activation_function`` for an imported checkpoint. ``norm``, ``mlp``,
    ``positions``, ``num_kv_heads``, ``bias`` and ``tied_head`` name what decoder families differ in
    (:data:`FAMILY_CHOICES`); their defaults are GPT-2's, the layout this version builds.
    :meth:`projection_shapes` is the one place the block's linear layers take their shapes from.
    """

    vocab_size: int
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 6
    d_ff: int | None = None
    max_seq_len: int = 512
    dropout: float = 0.1
    num_classes: int | None = None
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"
    norm: str = "layernorm"
    mlp: str = "plain"
    positions: str = "learned"
    num_kv_heads: int | None = None
    bias: bool = True
    tied_head: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    head_dim: int | None = None
    scale_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "max_seq_len"):
            _positive_int(name, getattr(self, name))
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        _positive_int("d_ff", self.d_ff)
        if self.head_dim is None:  # the usual head size; Qwen3 and Gemma name their own
            if self.d_model % self.num_heads:
                raise ConfigError(
                    f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        _positive_int("head_dim", self.head_dim)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ConfigError(f"dropout must be a number in [0, 1), got {quote(self.dropout)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {quote(self.dropout)}")
        if self.num_classes is not None and (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or self.num_classes < 2
        ):
            raise ConfigError(f"num_classes must be an integer >= 2 or None, got {quote(self.num_classes)}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f"layer_norm_eps must be a number in (0, 1), got {quote(eps)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"activation must be one of {', '.join(ACTIVATIONS)}, got {quote(self.activation)}"
            )
        for name, choices in FAMILY_CHOICES.items():
            value = getattr(self, name)
            if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
                raise ConfigError(f"{name} {quote(value)} is not supported; this version builds "
                                  f"{' or '.join(quote(c) for c in choices)}")  # fmt: skip
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        _positive_int("num_kv_heads", self.num_kv_heads)
        if self.num_heads % self.num_kv_heads:  # grouped-query attention: each key/value head serves a group
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                              f"({self.num_kv_heads})")  # fmt: skip
        theta = self.rope_theta
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < float("inf"):
            raise ConfigError(f"rope_theta must be a positive number, got {quote(theta)}")
        _check_rope_scaling(self.rope_scaling)
        if self.positions == "rotary" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head size, got {self.head_dim}")

    # the keys an adapter must agree on with its base (dropout is a training setting; a head is the adapter's)
    SHAPE_KEYS = ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_seq_len")
    # the family fields that fix a base tensor's shape or name too; recorded where they are not GPT-2's
    FAMILY_SHAPE_KEYS = ("norm", "mlp", "positions", "num_kv_heads", "bias", "tied_head", "qkv_bias", "qk_norm",
                         "head_dim")  # fmt: skip
    # family keys that change no tensor's shape or name (like layer_norm_eps and activation)
    FAMILY_VALUE_KEYS = ("rope_theta", "rope_scaling", "scale_embeddings")
    # the block's projections that write into the residual stream: GPT-2 starts them smaller
    RESIDUAL_PROJECTIONS = ("attn.o_proj", "mlp.fc2", "mlp.down_proj")

    def shape(self) -> dict[str, Any]:
        """The architecture keys that fix every base tensor's shape: :attr:`SHAPE_KEYS`, and the family keys
        whose value is not GPT-2's (so an adapter folder of a GPT-2 layout records what it always did)."""
        family = {k: v for k, v in self.family_changes().items() if k in self.FAMILY_SHAPE_KEYS}
        return {**{k: getattr(self, k) for k in self.SHAPE_KEYS}, **family}

    def family_changes(self) -> dict[str, Any]:
        """The family keys whose value is not GPT-2's (``num_kv_heads`` other than ``num_heads``)."""
        gpt2 = self.gpt2_family(self.num_heads, self.d_model)
        keys = (*self.FAMILY_SHAPE_KEYS, *self.FAMILY_VALUE_KEYS)
        return {k: getattr(self, k) for k in keys if getattr(self, k) != gpt2[k]}

    @staticmethod
    def gpt2_family(num_heads: int | None, d_model: int | None) -> dict[str, Any]:
        """The family keys' values of GPT-2's layout (what a file that records none of them means)."""
        head_dim = d_model // num_heads if isinstance(d_model, int) and isinstance(num_heads, int) else None
        return {**_GPT2_FAMILY, "num_kv_heads": num_heads, "head_dim": head_dim, "rope_theta": 10000.0,
                "rope_scaling": None}  # fmt: skip

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """Every linear projection of one block, ``name -> (out_features, in_features)``, in the order the block
        applies them: what the block builds (and so the memory estimate's meta block) and the nf4 tile check
        ask; weight init asks :attr:`RESIDUAL_PROJECTIONS` which of them start smaller."""
        C, F = self.d_model, self.d_ff
        q, kv = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )  # (q: C unless head_dim is set)
        attention = {
            "attn.q_proj": (q, C),
            "attn.k_proj": (kv, C),
            "attn.v_proj": (kv, C),
            "attn.o_proj": (C, q),
        }
        if self.mlp == "gated":
            return {**attention, "mlp.gate_proj": (F, C), "mlp.up_proj": (F, C), "mlp.down_proj": (C, F)}
        return {**attention, "mlp.fc1": (F, C), "mlp.fc2": (C, F)}

    def to_dict(self) -> dict[str, Any]:
        """Every field: the constructor's keywords (``LoRATransformer(**config.to_dict())``)."""
        return dataclasses.asdict(self)

    def to_file_dict(self) -> dict[str, Any]:
        """What ``config.json`` records: every field but the family keys at GPT-2's values (read back as the
        defaults), so a GPT-2-layout model folder is written as it always was."""
        changes = self.family_changes()
        family = (*self.FAMILY_SHAPE_KEYS, *self.FAMILY_VALUE_KEYS)
        return {k: v for k, v in self.to_dict().items() if k not in family or k in changes}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "config") -> ModelConfig:
        """From a ``config.json`` mapping: the shape keys are required, other known keys optional."""
        missing = [k for k in cls.SHAPE_KEYS if k not in values]
        if missing:
            raise ConfigError(f"{where}: missing architecture keys {missing}")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in values.items() if k in known})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


# rotary scalings: their keys (beside rope_type); linear divides every frequency by factor, llama3 (Llama 3.1
# on) divides the low frequencies, keeps the high ones and blends those between
ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}  # fmt: skip


def _check_rope_scaling(scaling: Any) -> None:
    """Refuse a rotary scaling that is not ``None`` or one of :data:`ROPE_SCALINGS` with its numbers."""
    if scaling is None:
        return
    kind = scaling.get("rope_type") if isinstance(scaling, Mapping) else None
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"rotary scaling {quote(kind if isinstance(scaling, Mapping) else scaling)} is not "
                          f"supported; the supported ones are {', '.join(ROPE_SCALINGS)}")  # fmt: skip
    for key in ROPE_SCALINGS[kind]:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ConfigError(f"rotary scaling {kind} needs a positive {key}, got {quote(value)}")
    if kind == "llama3" and not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise ConfigError("rotary scaling llama3 needs low_freq_factor < high_freq_factor")


# the family keys' values for GPT-2 (num_kv_heads: num_heads, filled in by family_changes)
_GPT2_FAMILY: dict[str, Any] = {k: v[0] for k, v in FAMILY_CHOICES.items()}


@dataclass(frozen=True)
class LoRAConfig:
    """Which projections carry adapters and how: ``scaling = lora_alpha / lora_r`` (rsLoRA: ``/ sqrt``).

    ``lora_targets`` are among the attention projections q, k, v, o; ``adapt_feedforward`` adds the MLP's
    ``fc1`` and ``fc2``. ``lora_r = 0`` means no adapter at all. ``use_dora`` adds DoRA's magnitude vectors;
    ``lora_init`` (of :data:`~lora.lora_layer.LORA_INITS`) is how ``A`` and ``B`` start.
    """

    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "v")
    adapt_feedforward: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    lora_init: str = "kaiming"

    # keys that adapters saved before they existed lack: read as their defaults
    OPTIONAL_KEYS = ("use_dora", "lora_init")

    def __post_init__(self) -> None:
        try:
            validate_lora_args(self.lora_r, self.lora_alpha, self.lora_dropout)
            validate_lora_init(self.lora_init)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        object.__setattr__(self, "lora_alpha", float(self.lora_alpha))
        object.__setattr__(self, "lora_targets", parse_targets(self.lora_targets))
        for name in ("adapt_feedforward", "use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {quote(getattr(self, name))}")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.lora_r, self.lora_alpha, self.use_rslora)

    @property
    def leaves(self) -> tuple[str, ...]:
        """The tensors each adapted module has: ``lora_A``, ``lora_B``, DoRA's ``lora_magnitude``, and after a
        PiSSA/OLoRA start ``lora_A0``, ``lora_B0``."""
        return (("lora_A", "lora_B") + (("lora_magnitude",) if self.use_dora else ())
                + (("lora_A0", "lora_B0") if self.lora_init in BASE_DERIVED_INITS else ()))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "lora_targets": list(self.lora_targets)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "config") -> LoRAConfig:
        """From a mapping holding (at least) every field but :attr:`OPTIONAL_KEYS`, as ``adapter_config.json``
        does."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in values and n not in cls.OPTIONAL_KEYS]
        if missing:
            raise ConfigError(f"{where}: missing keys {missing}")
        try:
            return cls(**{n: values[n] for n in names if n in values})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
