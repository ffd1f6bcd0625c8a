"""The training configuration: one typed dataclass, YAML files and command-line flags.

Precedence is ``TrainConfig`` defaults < YAML (``--config``) < flags actually given on the command line.
A YAML key, a dataclass field and a flag are the same word (``lora_r``, ``--lora_r``). Every option given
either takes effect or is refused: :meth:`TrainConfig.validate` names the ones the run would ignore.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lora.errors import ConfigError, did_you_mean, first_line, quote, shorten
from lora.files import MAX_SETTINGS_BYTES, read_limited
from lora.lora_layer import LORA_INITS
from lora.model_config import LoRAConfig, ModelConfig, parse_targets
from lora.tracking import TRACKERS, check_installed

__all__ = [
    "TASKS",
    "CommandLineParser",
    "TrainConfig",
    "build_parser",
    "load_config",
    "load_config_and_flags",
    "load_yaml",
    "resolve_config",
]

# Every task, and the task its default base is pretrained on (the one list of tasks).
TASKS = {"rot13": "caesar", "atbash": "caesar", "code": "english", "text": "english", "jsonl": "english",
         "chat": "english", "instruct": "english"}  # fmt: skip
GENERATED_TASKS = ("rot13", "atbash")  # data made here, sized by num_examples
CIPHER_WIDTH = 15  # tokens in a sequence of the generated tasks (8 letters and their cipher, less one)
FILE_TASKS = ("text", "jsonl", "chat")  # the user's own data in train_file (and val_file)
CHAT_TASKS = ("chat", "instruct")  # conversations through a chat template (lora/chat_task.py)
SIZED_TASKS = (*GENERATED_TASKS, "instruct")  # made here, sized by num_examples
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes
# how the frozen base's linear weights are stored (lora/quantize.py); auto: bf16 under bf16 autocast
QUANTIZATIONS = ("auto", "none", "bf16", "nf4")
# the storages a run may switch among when resumed: under bf16 autocast their products are the same, bit for
# bit, and outside it a bf16 weight is the float32 one rounded as precision, which may change too, rounds it
SAME_ADAPTER_STORAGES = {"auto", "none", "bf16"}
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # cuda:1 picks a GPU
ARCHITECTURE_KEYS = ("d_model", "num_heads", "num_layers", "max_seq_len")  # of a base pretrained here
LORA_KEYS = tuple(f.name for f in fields(LoRAConfig))
PATH_KEYS = (
    "train_file",
    "val_file",
    "base_checkpoint",
    "chat_template",
)  # saved absolute in a run's config.yaml
# what a resumed run may change: how long it trains, how often it reports and saves, where it runs
RESUME_MAY_CHANGE = ("max_steps", "epochs", "eval_every", "eval_batches", "log_every", "save_every", "keep_checkpoints",
                     "device", "precision", "compile", "compile_mode", "gradient_checkpointing", "fsdp", "debug", "resume", "overwrite",
                     "run_name", "output_dir", "log_to")  # fmt: skip


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    """Every setting of a training run, with its default. Edit a YAML file or pass ``--key value``."""

    # --- the run
    task: str = field(default="rot13", metadata=_help(f"built-in task or your data: {', '.join(TASKS)}"))
    run_name: str | None = field(
        default=None, metadata=_help("run folder name (default: <task>-lora-r<r> or <task>-full)")
    )
    output_dir: str = field(
        default="runs",
        metadata=_help("where run folders are written (run from inside lora/: the project's runs/)"),
    )
    overwrite: bool = field(default=False, metadata=_help("replace an existing run folder of the same name"))
    seed: int = field(default=0, metadata=_help("seed for data order, initialisation and dropout"))
    device: str = field(
        default="auto", metadata=_help("auto (cuda if available), cpu, cuda, cuda:<index> or mps")
    )
    precision: str = field(default="auto", metadata=_help("auto (bf16 autocast on CUDA), fp32 or bf16"))
    compile: bool = field(default=False, metadata=_help("torch.compile the model (useful on GPUs)"))
    compile_mode: str = field(
        default="default",
        metadata=_help(
            f"torch.compile's mode with --compile: {', '.join(COMPILE_MODES)} (reduce-overhead: "
            "CUDA graphs, for small shapes on a GPU)"
        ),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("recompute block activations in backward: less memory, ~1 more forward")
    )
    fsdp: bool = field(
        default=False,
        metadata=_help("under torchrun: shard the frozen base and the adapter across the processes (FSDP2), "
                       "for a base larger than one device"),
    )  # fmt: skip
    debug: bool = field(default=False, metadata=_help("show full tracebacks on errors"))
    # --- data
    train_file: str | None = field(default=None, metadata=_help("your data: UTF-8 text (task text) or JSONL"))
    val_file: str | None = field(default=None, metadata=_help("validation data (default: split off train)"))
    val_fraction: float = field(default=0.1, metadata=_help("share of train_file held out when no val_file"))
    seq_len: int = field(default=128, metadata=_help("tokens per training sequence (<= max_seq_len)"))
    num_examples: int = field(
        default=20000, metadata=_help("generated training examples (algorithmic tasks, instruct)")
    )
    chat_template: str | None = field(
        default=None,
        metadata=_help("a Jinja chat template file (tasks chat, instruct; default: the base folder's, else "
                       "the built-in <|user|> ... <|end|> one)"),
    )  # fmt: skip
    train_on_prompt: bool = field(
        default=False,
        metadata=_help("score every token of a conversation, not only the answers (tasks chat, instruct)"),
    )
    packing: bool = field(
        default=False,
        metadata=_help(
            "several conversations in one row, attention and positions kept apart (chat, instruct)"
        ),
    )
    # --- model (used when a base is pretrained; a fine-tune takes the base's architecture)
    d_model: int = field(default=256, metadata=_help("model width (pretraining a base)"))
    num_heads: int = field(default=4, metadata=_help("attention heads (pretraining a base)"))
    num_layers: int = field(default=2, metadata=_help("transformer blocks (pretraining a base)"))
    max_seq_len: int = field(default=128, metadata=_help("longest sequence the model accepts (pretraining)"))
    dropout: float = field(default=0.0, metadata=_help("dropout in the model"))
    # --- the base
    base_checkpoint: str = field(
        default="auto",
        metadata=_help("base model folder (this project's or a GPT-2 one); auto: pretrain once"),
    )
    base_steps: int = field(default=300, metadata=_help("optimizer steps when pretraining a base"))
    base_learning_rate: float = field(default=2e-3, metadata=_help("learning rate when pretraining a base"))
    # --- LoRA
    method: str = field(default="lora", metadata=_help("lora (adapters only) or full (all weights)"))
    lora_r: int = field(default=8, metadata=_help("LoRA rank r"))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA alpha; scaling = alpha / r"))
    lora_dropout: float = field(default=0.0, metadata=_help("dropout on the LoRA branch input"))
    lora_targets: list[str] = field(
        default_factory=lambda: ["q", "v"],
        metadata=_help(
            "projections to adapt: q,k,v,o (attention); gate,up,down (a gated MLP: Llama, Mistral, "
            "Qwen, Gemma, Phi-3) or fc1,fc2 (GPT-2's MLP); mlp (every MLP projection); all (every "
            "projection). PEFT's names are read too (q_proj, gate_proj, c_attn, c_fc, all-linear)"
        ),
    )
    adapt_feedforward: bool = field(
        default=False, metadata=_help("also adapt every MLP projection (fc1, fc2; or gate, up, down)")
    )
    use_rslora: bool = field(default=False, metadata=_help("rank-stabilised scaling alpha / sqrt(r)"))
    use_dora: bool = field(
        default=False,
        metadata=_help("DoRA: a trained magnitude per output row times the LoRA-updated direction"),
    )
    lora_init: str = field(
        default="kaiming",
        metadata=_help(f"how A and B start: {', '.join(LORA_INITS)} (pissa/olora: from the base's weights)"),
    )
    lora_plus_ratio: float = field(
        default=1.0, metadata=_help("LoRA+: B's learning rate is this many times A's (1: plain LoRA)")
    )
    quantize_base: str = field(
        default="auto",
        metadata=_help(
            "store the frozen base's linear weights as none (float32; a bf16/fp16 base folder widened), bf16 "
            "(nothing cast per step under bf16 autocast) or nf4 (4-bit, QLoRA); auto: a bf16/fp16 folder as "
            "stored (exact, half the memory), else bf16 where LoRA trains under bf16 autocast, else none"
        ),
    )
    # --- optimisation
    epochs: int = field(default=1, metadata=_help("passes over the training data"))
    max_steps: int | None = field(
        default=None, metadata=_help("stop after this many optimizer steps (or at the end of epochs)")
    )
    batch_size: int = field(
        default=64, metadata=_help("sequences per forward pass of each process (a micro-batch)")
    )
    grad_accum_steps: int = field(
        default=1,
        metadata=_help("micro-batches per optimizer update (of batch_size x processes x this rows)"),
    )
    learning_rate: float = field(default=3e-3, metadata=_help("peak AdamW learning rate"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    warmup_steps: int = field(default=20, metadata=_help("linear warmup steps"))
    lr_schedule: str = field(default="cosine", metadata=_help("cosine (to 10% of peak) or constant"))
    grad_clip: float = field(default=1.0, metadata=_help("clip the gradient norm to this (0: off)"))
    eval_every: int = field(default=50, metadata=_help("evaluate every N steps (and at the end)"))
    eval_batches: int = field(default=8, metadata=_help("validation batches per evaluation (0: all)"))
    early_stopping_patience: int = field(
        default=0,
        metadata=_help("stop after this many evaluations without a lower val_loss; keep the best (0: off)"),
    )
    log_every: int | None = field(
        default=None, metadata=_help("read the loss every N steps (default: 1 on CPU, 10 on a GPU)")
    )
    log_to: str = field(
        default="none",
        metadata=_help(f"follow the run live: {', '.join(TRACKERS)} (tensorboard: event files in "
                       "<run>/tensorboard/; needs the tensorboard package)"),
    )  # fmt: skip
    # --- checkpoints
    save_every: int = field(default=0, metadata=_help("write a training checkpoint every N steps (0: off)"))
    keep_checkpoints: int = field(default=2, metadata=_help("how many recent checkpoints to keep"))
    resume: str | None = field(default=None, metadata=_help("checkpoint file, run folder, or auto"))

    def validate(self, given: Collection[str] = ()) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first out-of-range value, or the first option in ``given``
        (the keys the user set) that this run would ignore."""
        checks: list[tuple[bool, str]] = [
            (self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {quote(self.task)}"),
            (self.method in ("lora", "full"), f"method must be 'lora' or 'full', got {quote(self.method)}"),
            (DEVICE.fullmatch(self.device) is not None,
             f"device must be auto, cpu, cuda, cuda:<index> or mps, got {quote(self.device)}"),
            (self.precision in ("auto", "fp32", "bf16"), f"precision must be auto, fp32 or bf16, got {quote(self.precision)}"),
            (self.lr_schedule in ("cosine", "constant"), f"lr_schedule must be cosine or constant, got {quote(self.lr_schedule)}"),
            (self.quantize_base in QUANTIZATIONS,
             f"quantize_base must be one of {', '.join(QUANTIZATIONS)}, got {quote(self.quantize_base)}"),
            (self.lora_plus_ratio > 0, f"lora_plus_ratio must be > 0, got {self.lora_plus_ratio}"),
            (self.compile_mode in COMPILE_MODES,
             f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {quote(self.compile_mode)}"),
            (self.method == "full" or self.lora_r >= 1,
             f"lora_r must be >= 1 for method lora, got {self.lora_r} (method full trains without an adapter)"),
            (0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.base_learning_rate > 0, f"base_learning_rate must be > 0, got {self.base_learning_rate}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}"),
            (self.early_stopping_patience >= 0,
             f"early_stopping_patience must be >= 0 (0: off), got {self.early_stopping_patience}"),
            (self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}"),
            (self.base_checkpoint != "auto" or self.task in GENERATED_TASKS or self.seq_len <= self.max_seq_len,
             f"seq_len ({self.seq_len}) must not exceed max_seq_len ({self.max_seq_len})"),
            (self.base_checkpoint != "auto" or self.task not in GENERATED_TASKS or self.max_seq_len >= CIPHER_WIDTH,
             f"max_seq_len ({self.max_seq_len}) must be at least {CIPHER_WIDTH} for task {self.task} "
             "(the length of its sequences)"),
            (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}"),
            (self.num_examples >= 1, f"num_examples must be >= 1, got {self.num_examples}"),
            (self.base_steps >= 1, f"base_steps must be >= 1, got {self.base_steps}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
            (self.eval_batches >= 0, f"eval_batches must be >= 0, got {self.eval_batches}"),
            (self.log_every is None or self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.log_to in TRACKERS, f"log_to must be one of {', '.join(TRACKERS)}, got {quote(self.log_to)}"),
            (self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
        ]  # fmt: skip
        for f in fields(self):  # the Python API skips _coerce: the types and NaN/inf checked here too
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        lora = self.lora_config()  # the LoRA rules: lora_alpha > 0, lora_dropout in [0, 1), known targets
        # in LoRAConfig's one form: --lora_targets all is q,k,v,o with adapt_feedforward, as a run records it
        self.lora_targets, self.adapt_feedforward = list(lora.lora_targets), lora.adapt_feedforward
        self.model_config(
            vocab_size=1
        )  # the architecture rules (any vocabulary): sizes, heads dividing d_model
        if not self.lora_targets and not self.adapt_feedforward:
            raise ConfigError("lora_targets must name at least one projection (q,k,v,o, an MLP's, mlp or all), "
                              "or set adapt_feedforward")  # fmt: skip
        if self.task in FILE_TASKS and not self.train_file:
            raise ConfigError(f"task {self.task} needs --train_file")
        name = self.run_name
        if name is not None and (
            not name.strip() or name != name.strip() or name.startswith(".") or not name.isprintable()
            or any(c in name for c in "/\\")
        ):  # fmt: skip
            raise ConfigError(f"run_name must be a plain folder name (printable, no '/' or '\\', no leading '.' "
                              f"or spaces at either end), got {quote(name)}")  # fmt: skip
        for key in ("train_file", "val_file", "base_checkpoint", "chat_template"):
            if getattr(self, key) == "":
                raise ConfigError(f"{key} is empty: name a file, or drop --{key}")
        for key, why in self._ignored():
            if key in given:
                raise ConfigError(f"{key} {why}")
        if (
            self.quantize_base == "nf4"
            and self.method == "lora"
            and importlib.util.find_spec("torchao") is None
        ):
            raise ConfigError(f"quantize_base {self.quantize_base} needs torchao, which is not installed: "
                              "pip install 'lora-transformer[quant]' (or pip install torchao)")  # fmt: skip
        check_installed(self.log_to)  # (its package found, not imported: cheap)
        return self

    def _ignored(self) -> list[tuple[str, str]]:
        """``(key, why)`` for every option this configuration does not use, with what to do instead."""
        rules: list[tuple[Sequence[str], str]] = []
        task, base = self.task, self.base_checkpoint
        # fmt: off
        if self.method == "full":
            rules.append(((*LORA_KEYS, "lora_plus_ratio", "quantize_base"),
                          "has no effect with method full (every weight trains, no adapter): drop it or use "
                          "--method lora"))
        if task in GENERATED_TASKS:
            rules.append((["seq_len"], f"has no effect on task {task}: its sequences are {CIPHER_WIDTH} tokens "
                                       "long; drop it"))
        elif task not in SIZED_TASKS:
            rules.append((["num_examples"], f"has no effect on task {task}: it sizes the generated data of "
                                            f"{', '.join(SIZED_TASKS)}; drop it"))
        if task not in CHAT_TASKS:
            rules.append((["chat_template", "train_on_prompt", "packing"],
                          f"has no effect on task {task}: it is for conversations; drop it, or use --task chat or instruct"))
        if task not in FILE_TASKS:
            rules.append((["train_file", "val_file", "val_fraction"],
                          f"has no effect on task {task}, which uses built-in data: for your own file use "
                          f"--task {' or --task '.join(FILE_TASKS)}"))
        elif self.val_file:
            rules.append((["val_fraction"], "has no effect with --val_file (that file is the validation data); "
                                            "drop one of them"))
        if base != "auto":
            rules.append((["base_steps", "base_learning_rate"],
                          f"has no effect with --base_checkpoint {base} (nothing is pretrained): drop it or use "
                          "--base_checkpoint auto"))
            rules.append((ARCHITECTURE_KEYS, f"has no effect with --base_checkpoint {base}: the architecture is "
                                             "the base's (its config.json); drop it"))
        evaluations = math.ceil(self.max_steps / max(1, self.eval_every)) if self.max_steps else None
        if evaluations is not None and evaluations <= self.early_stopping_patience:
            rules.append((["early_stopping_patience"],
                          f"has no effect: --max_steps {self.max_steps} with --eval_every {self.eval_every} evaluates "
                          f"{evaluations} time(s), too few to see {self.early_stopping_patience} without improvement "
                          "after a first one; evaluate more often (--eval_every) or drop it"))
        if not self.compile:
            rules.append((["compile_mode"], "has no effect without --compile: add --compile, or drop it"))
        if self.resume is not None:
            rules.append((["overwrite"], "has no effect with --resume: a resumed run continues in its own folder"))
        if self.resume not in (None, "auto"):
            rules.append((["run_name", "output_dir"], f"has no effect with --resume {self.resume}: the run "
                                                      "continues in that folder; drop it"))
        # fmt: on
        return [(key, why) for keys, why in rules for key in keys]

    def check_resume(self, saved: TrainConfig, where: str) -> None:
        """Refuse to resume the run made with ``saved`` with settings that would train something else
        (paths compare as the files they name: ``data.txt`` and ``./data.txt`` are one file)."""
        for f in fields(self):
            now, was = getattr(self, f.name), getattr(saved, f.name)
            if f.name in PATH_KEYS and now and was and _same_file(now, was):
                continue
            if f.name == "quantize_base" and {now, was} <= SAME_ADAPTER_STORAGES:
                continue
            if f.name not in RESUME_MAY_CHANGE and now != was:
                raise ConfigError(f"{where} was trained with {f.name} {quote(was)}, not {quote(now)}: resuming "
                                  f"would train something else; drop --{f.name}, or start a new run")  # fmt: skip

    def lora_config(self) -> LoRAConfig:
        """The LoRA settings as the model takes them (checked by :class:`LoRAConfig`'s one rule)."""
        return LoRAConfig(self.lora_r, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets),
                          self.adapt_feedforward, self.use_rslora, self.use_dora, self.lora_init)  # fmt: skip

    def model_config(self, vocab_size: int, num_classes: int | None = None) -> ModelConfig:
        """The architecture of a base pretrained here."""
        return ModelConfig(vocab_size, self.d_model, self.num_heads, self.num_layers, None, self.max_seq_len,
                           self.dropout, num_classes)  # fmt: skip

    @property
    def sequence_width(self) -> int:
        """Tokens in each training sequence: the generated tasks' fixed width, else ``seq_len``."""
        return CIPHER_WIDTH if self.task in GENERATED_TASKS else self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_saved(self) -> dict[str, Any]:
        """What a run folder's config.yaml holds: the settings, with the paths made absolute (a resumed run
        finds its data and base wherever it is started from)."""
        out = self.to_dict()
        for key in PATH_KEYS:
            if out[key] not in (None, "auto"):
                out[key] = str(Path(out[key]).resolve())
        return out


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace(" | None", " or null")


def _coerce(key: str, value: Any) -> Any:
    """Check (and gently convert) one value against the field's declared type."""
    kind = str(_FIELDS[key].type)
    optional = kind.endswith("| None")
    base = kind.replace(" | None", "")
    if value is None and optional:
        return None
    wrong = ConfigError(
        f"{key} must be {_type_name(_FIELDS[key])}, got {quote(value)} ({type(value).__name__})"
    )
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise wrong
    if base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if base == "float":
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value}")
            return float(value)
        raise wrong
    if base == "str":
        if isinstance(value, str):
            if "\x00" in value:
                raise ConfigError(f"{key} must not contain a NUL byte, got {quote(value)}")
            return value
        raise wrong
    if base == "list[str]":  # lora_targets, the only list
        if isinstance(value, (str, list)):
            return list(parse_targets(value))
        raise wrong
    raise AssertionError(f"unhandled field type {kind}")


def _unknown_key(key: str, where: str) -> ConfigError:
    return ConfigError(f"unknown key {quote(key)} in {where}{did_you_mean(key, _FIELDS)}")


MAX_YAML_DEPTH = 16  # a config is a flat mapping; a list of targets nests one level


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that sets the same key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise ConfigError(f"key {quote(key)} is set twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_structure(text: str) -> None:
    """Refuse aliases (a "billion laughs" expands them without end) and deep nesting, from the event stream:
    bounded time and memory, before anything is built."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(f"line {line}: YAML aliases (*{event.anchor}) are not allowed in a config file")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(f"line {line}: nested more than {MAX_YAML_DEPTH} levels deep; a config is "
                                  "a mapping of key: value")  # fmt: skip
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config keys; errors name the file (and the line). At most 1 MiB, a regular
    file, no aliases, no deep nesting, no key set twice."""
    path = Path(path)
    try:
        text = read_limited(path, MAX_SETTINGS_BYTES, "config file").decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except ValueError as e:  # too large, not a regular file, a NUL in the path, not UTF-8
        raise ConfigError(f"cannot read config file {path}: {first_line(e)}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        _check_structure(text)
        loader = _StrictLoader(text)  # a SafeLoader: plain data only, never Python objects
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except ConfigError as e:
        raise ConfigError(f"{path} {e}" if str(e).startswith("line") else f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"YAML syntax error in {path}{line}: {problem}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of key: value, got a {type(data).__name__}")
    return data


def resolve_config(yaml_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                   where: str = "config", yaml_is_a_run: bool = False) -> TrainConfig:  # fmt: skip
    """Defaults < ``yaml_values`` < ``overrides``; every key checked, then the whole config validated.

    The options the user set are every override and every YAML value other than its default; each must
    take effect. ``yaml_is_a_run``: the YAML is a run folder's own resolved ``config.yaml`` (resuming),
    which lists every key, so only the overrides count as set.
    """
    values: dict[str, Any] = {}
    given: set[str] = set()
    defaults = TrainConfig()
    preset: dict[str, Any] = {}  # the YAML's values alone, coerced
    for source, label in ((yaml_values or {}, where), (overrides or {}, "arguments")):
        if source is overrides:
            preset = dict(values)
        for key, value in source.items():
            if key not in _FIELDS or key == "config":
                raise _unknown_key(str(key), label)
            values[key] = _coerce(key, value)
            if source is overrides or (not yaml_is_a_run and values[key] != getattr(defaults, key)):
                given.add(key)
    cfg = TrainConfig(**values)
    for key, why in _moot_presets(cfg, preset, overrides or {}, given):
        warnings.warn(f"{where} sets {key}, which {why.split(': ')[0]}; ignored", stacklevel=2)
        given.discard(key)
    return cfg.validate(given)


def _moot_presets(cfg: TrainConfig, preset: dict[str, Any], overrides: dict[str, Any],
                  given: set[str]) -> list[tuple[str, str]]:  # fmt: skip
    """``(key, why)`` of the YAML's settings (``preset``, coerced) that only the command line made moot: a
    preset such as configs/code.yaml pretrains its base for 800 steps, and ``--base_checkpoint`` on the
    command line makes that moot. Those are reported, not refused; an option given on the command line, or
    one the YAML itself makes moot, is still refused."""
    if not overrides:
        return []
    from_yaml = {k for k in preset if k in given and k not in overrides}
    own = {key for key, _ in TrainConfig(**preset)._ignored()}
    return [(key, why) for key, why in dict(cfg._ignored()).items() if key in from_yaml and key not in own]


class CommandLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line, with a pointer to ``--help`` (exit status 2), and takes
    no abbreviations: a script's own ``--seeds`` must not swallow ``--seed``, meant for the runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):  # --lora_rank: did you mean --lora_r?
            flags = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            for word in message.split(":", 1)[1].split():
                hint = did_you_mean(word.split("=")[0], flags)
                if word.startswith("--") and hint:
                    message += hint.replace("'", "")
                    break
        self.exit(2, f"{self.prog}: error: {shorten(message)} (see --help)\n")


def build_parser(prog: str = "train_lora.py", description: str | None = None) -> argparse.ArgumentParser:
    """One flag per field; defaults are ``None`` so that only flags actually given override YAML."""
    parser = CommandLineParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", help="YAML file of settings (flags given here override it)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        shown = ",".join(default) if isinstance(default, list) else default
        text = f.metadata.get("help", "")
        if "default:" not in text:  # (a help that says its default in words keeps those)
            text += f" (default: {shown})"
        text = text.replace("%", "%%")
        kind = str(f.type).replace(" | None", "")
        if kind == "bool":
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=text)
        else:
            convert = {"int": int, "float": float}.get(kind, str)
            parser.add_argument(
                f"--{f.name}", type=convert, metavar=kind.upper().replace("[STR]", ""), help=text
            )
    return parser


def load_config(argv: Sequence[str] | None = None, description: str | None = None,
                prog: str = "train_lora.py") -> TrainConfig:  # fmt: skip
    """Parse ``argv`` (``--config`` plus flags) into a validated :class:`TrainConfig`.

    ``--resume <run folder or checkpoint>`` without ``--config`` reuses that run's saved ``config.yaml``.
    """
    return load_config_and_flags(argv, description, prog)[0]


def load_config_and_flags(argv: Sequence[str] | None = None, description: str | None = None,
                          prog: str = "train_lora.py") -> tuple[TrainConfig, frozenset[str]]:  # fmt: skip
    """:func:`load_config`'s config, and the keys given as flags (not by the YAML): a script that sets some
    keys itself refuses those flags, and only reports a preset's values of them."""
    args = vars(build_parser(prog, description=description).parse_args(argv))
    path = args.pop("config", None)
    resume = args.get("resume")
    run_config = False
    if path is None and resume not in (None, "auto"):
        folder = Path(resume).parent if Path(resume).is_file() else Path(resume)
        if (folder / "config.yaml").is_file():
            path, run_config = folder / "config.yaml", True
    yaml_values = load_yaml(path) if path else {}
    return resolve_config(
        yaml_values, args, where=str(path or "config"), yaml_is_a_run=run_config
    ), frozenset(args)
