"""The model's typed settings: its architecture (:class:`ModelConfig`) and its LoRA (:class:`LoRAConfig`).

The same words from the command line to the layer: ``lora_r`` is ``lora_r`` here, in ``TrainConfig``,
in YAML and in ``adapter_config.json``, until it becomes the layer's ``r``. The rules are checked once,
here (and the LoRA arguments by :func:`lora.lora_layer.validate_lora_args`, the layer's own rule).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lora.errors import ConfigError, did_you_mean, quote
from lora.lora_layer import BASE_DERIVED_INITS, lora_scaling, validate_lora_args, validate_lora_init

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_TARGETS",
    "FAMILY_CHOICES",
    "PROJECTIONS",
    "TARGET_MODULES",
    "LoRAConfig",
    "ModelConfig",
    "lora_targets_of",
    "parse_targets",
    "target_of",
]

ATTENTION_TARGETS = ("q", "k", "v", "o")
PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}  # target -> the module's name
# every target: a projection's short name -> the block module it adapts, in the order blocks apply them. A
# family has the attention four and one MLP's: GPT-2's plain fc1, fc2, or a gated MLP's gate, up, down
TARGET_MODULES = {**{t: f"attn.{name}" for t, name in PROJECTIONS.items()}, "fc1": "mlp.fc1", "fc2": "mlp.fc2",
                  "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
MLP_TARGETS = tuple(t for t, m in TARGET_MODULES.items() if m.startswith("mlp."))
# the shortcuts: every MLP projection of the family (what adapt_feedforward adds), every projection
MLP, ALL = "mlp", "all"
# other spellings: PEFT's module names, Llama's, GPT-2's and Phi-3's (whose fused c_attn and qkv_proj are q, k
# and v, gate_up_proj gate and up)
TARGET_SPELLINGS = {
    **{f"{t}_proj": (t,) for t in ("q", "k", "v", "o", "gate", "up", "down")},
    "c_attn": ("q", "k", "v"), "attn.c_attn": ("q", "k", "v"), "attn.c_proj": ("o",), "c_fc": ("fc1",),
    "mlp.c_fc": ("fc1",), "mlp.c_proj": ("fc2",), "qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up"),
    "all-linear": (ALL,),
}  # fmt: skip
_AMBIGUOUS = {
    "c_proj": "GPT-2's name for two projections, attn.c_proj (o) and mlp.c_proj (fc2): write o or fc2"
}
TARGETS_HELP = ("q, k, v, o (attention), gate, up, down (a gated MLP: Llama, Mistral, Qwen, Gemma, Phi-3), fc1, "
                "fc2 (GPT-2's MLP), mlp (every MLP projection), all (every projection), or PEFT's module names "
                "(q_proj ... down_proj, c_attn, c_fc, attn.c_proj, mlp.c_proj, qkv_proj, gate_up_proj, all-linear)")  # fmt: skip
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
    """``"blocks.0.attn.v_proj"`` -> ``"v"``, ``"blocks.0.mlp.gate_proj"`` -> ``"gate"`` (the keys of
    :data:`TARGET_MODULES`); anything else -> ``None``."""
    return next(
        (t for t, m in TARGET_MODULES.items() if module_name == m or module_name.endswith(f".{m}")), None
    )


def parse_targets(lora_targets: Sequence[str] | str) -> tuple[str, ...]:
    """``"q,v"`` or ``["v_proj", "q"]`` -> ``("q", "v")``: targets of :data:`TARGET_MODULES` and the shortcut
    ``mlp``, in that order, once each. ``all`` (PEFT's ``all-linear``) is q, k, v, o and mlp; PEFT's module
    names are read as the targets they adapt (:data:`TARGET_SPELLINGS`); GPT-2's ``c_proj``, which names
    two, and anything else raise. Whether the model has each is :meth:`LoRAConfig.check_family`'s question."""
    if isinstance(lora_targets, str):
        items = lora_targets.split(",")
    elif isinstance(lora_targets, Sequence) and all(isinstance(t, str) for t in lora_targets):
        items = list(lora_targets)
    else:
        raise ConfigError(f"lora_targets must be a list of {TARGETS_HELP}, got {quote(lora_targets)}")
    known = (*TARGET_MODULES, MLP, ALL)
    found = set()
    for item in (t.strip().lower() for t in items if t.strip()):
        if item in _AMBIGUOUS:
            raise ConfigError(f"lora_targets: {item} is {_AMBIGUOUS[item]}")
        targets = TARGET_SPELLINGS.get(item, (item,))
        if targets == (ALL,):
            targets = (*ATTENTION_TARGETS, MLP)
        unknown = [t for t in targets if t not in known]
        if unknown:
            hint = did_you_mean(item, [*known, *TARGET_SPELLINGS])
            raise ConfigError(
                f"lora_targets: unknown target {quote(item)}; the targets are {TARGETS_HELP}{hint}"
            )
        found.update(targets)
    return tuple(t for t in (*ATTENTION_TARGETS, MLP, *MLP_TARGETS) if t in found)


def lora_targets_of(modules: Iterable[str]) -> tuple[tuple[str, ...], bool]:
    """The ``(lora_targets, adapt_feedforward)`` that adapt the kinds of ``modules`` (``blocks.{i}.<module>``):
    every MLP projection of one family (fc1, fc2; or gate, up, down) is ``adapt_feedforward``, as a model made
    with it names them; other targets are listed. Names that are not projections are left out."""
    kinds = {target_of(m) for m in modules}
    every = _every_mlp(kinds)
    return tuple(t for t in TARGET_MODULES if t in kinds and not (every and t in MLP_TARGETS)), every


def _every_mlp(targets: Iterable[str | None]) -> bool:
    """Whether ``targets`` hold the shortcut ``mlp`` or one family's every MLP projection."""
    mlp = set(targets) & {MLP, *MLP_TARGETS}
    return MLP in mlp or mlp in ({"fc1", "fc2"}, {"gate", "up", "down"})


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

    def targets(self) -> tuple[str, ...]:
        """The LoRA targets this architecture has (of :data:`TARGET_MODULES`): q, k, v, o and its MLP's
        projections (fc1, fc2; or a gated MLP's gate, up, down)."""
        shapes = self.projection_shapes()
        return tuple(t for t, m in TARGET_MODULES.items() if m in shapes)

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

    ``lora_targets`` names projections by their targets (:data:`TARGET_MODULES`: q, k, v, o; fc1, fc2 or
    gate, up, down; :func:`parse_targets` reads the other spellings); ``adapt_feedforward`` adds every
    projection of the MLP, whichever the family has. They are kept in one form: the shortcut ``mlp`` (and
    ``all``'s) or one MLP's every projection becomes ``adapt_feedforward``, and the MLP targets it covers are
    dropped, so ``--lora_targets all`` is ``q,k,v,o`` with ``adapt_feedforward``, as before. :meth:`check_family` refuses a target the
    architecture lacks. ``lora_r = 0`` means no adapter at all. ``use_dora`` adds DoRA's magnitude vectors;
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
        for name in ("adapt_feedforward", "use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {quote(getattr(self, name))}")
        targets = parse_targets(self.lora_targets)
        every_mlp = self.adapt_feedforward or _every_mlp(targets)
        object.__setattr__(self, "adapt_feedforward", every_mlp)
        covered = (MLP, *MLP_TARGETS) if every_mlp else ()
        object.__setattr__(self, "lora_targets", tuple(t for t in targets if t not in covered))

    def adapts(self, module: str) -> bool:
        """Whether the block projection ``module`` (``"attn.q_proj"``, ``"mlp.gate_proj"``) carries an adapter."""
        return target_of(module) in self.lora_targets or (
            self.adapt_feedforward and module.startswith("mlp.")
        )

    def check_family(self, config: ModelConfig) -> None:
        """Refuse targets the architecture ``config`` lacks (GPT-2's MLP has no gate; a gated one no fc1), in
        one line naming the ones it has."""
        has = config.targets()
        lacking = [t for t in self.lora_targets if t not in has]
        if lacking:
            mlp = "gated (gate, up, down)" if config.mlp == "gated" else "plain, as GPT-2's (fc1, fc2)"
            raise ConfigError(f"lora_targets {','.join(lacking)}: this model has no such projection (its MLP is "
                              f"{mlp}); its targets are {', '.join(has)}, or mlp, all")  # fmt: skip

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
