"""The package's shape: data flows one way, config -> data -> model -> trainer -> run folder.

Every module of ``lora/`` has a place in ``LAYERS`` (bottom first) and imports only modules below it:
no import circle, no upward import, and no import of the package's ``__init__`` from inside it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora"

LAYERS = [
    "_version",  # the version, written once
    "errors",  # errors and exit codes
    "files",  # atomic writes, checked reads
    "tracking",  # following a run: TensorBoard events (log_to), the history as CSV
    "distributed",  # torchrun's processes: the process group, sums over processes, failures
    "quantize",  # a frozen weight in 4-bit NF4 (QLoRA), dequantized on the fly (torchao)
    "versions",  # the optional libraries' versions, as reports record them
    "lora_layer",  # LoRA for one linear layer; helpers for any nn.Module
    "fused_qkv",  # LoRA layers sharing one input (q, k, v) computed in one product
    "chunked_loss",  # the LM loss with the head applied a chunk of tokens at a time
    "decoder_ops",  # the decoder's token-wise operations with their backward written out: RMSNorm, rotary
    "model_config",  # ModelConfig, LoRAConfig
    "config",  # TrainConfig: YAML and flags
    "gpt2",  # the GPT-2 importer: a Hugging Face GPT-2 config and tensors converted to this model's
    "llama",  # the Llama-layout importer (llama, mistral, qwen2, qwen3, gemma, phi3): config, tensors
    "special_tokens",  # a model folder's BOS and EOS: read, checked, whether BOS is added, generation's stop
    "tokenizer",  # text <-> token ids: bytes, or a model folder's own tokenizer
    "chat_data",  # chat and instruction files read as conversations (messages, ShareGPT, prompt, Alpaca)
    "chat_template",  # a conversation rendered by a Jinja chat template, tokenized, its answers-only loss mask
    "data",  # tasks, BatchLoader
    "chat_task",  # chat and instruct tasks: conversations as padded or packed rows, length-grouped batches
    "plotting",  # the training-curve figure
    "figures",  # pictures of weights, spectra, similarity; comparison and sweep charts
    "adapter",  # one adapter as data
    "multi_adapter",  # several adapters in one batch: each row its own adapter's update
    "analysis",  # spectra, subspace similarity, amplification
    "formats",  # model and adapter folders on disk
    "peft_names",  # where PEFT's LoRA modules sit in each family: module names, fused projections
    "peft_format",  # Hugging Face PEFT's LoRA folders for every family, both ways
    "decoder",  # the architecture: attention, MLP, block, the decoder; forward, loss, generation
    "skeleton",  # a model built on the meta device and filled with a file's tensors, its draws made again
    "adapter_set",  # a model's adapters: active and parked, fit checks, their folders
    "base_storage",  # the frozen base stored narrower: 4-bit NF4 or bf16, made dense for a while
    "pretrained",  # the one reader of a base folder (config, header, meta check), then its tensors
    "hf_export",  # the merged model written as a Hugging Face folder (config.json, shards, tokenizer files)
    "lora_transformer",  # the model: decoder + adapters + base storage, delegating to the rooms below
    "memory",  # what a run will allocate, checked first
    "fsdp",  # the base and the adapter sharded across torchrun's processes (FSDP2): loading, gathering
    "checkpoint",  # training checkpoints
    "early_stopping",  # the best validation loss, its weights, and when to stop
    "trainer",  # Trainer, LoRATrainer
    "run_folder",  # where a run's outputs go
    "report",  # report.html: a run (or several) on one self-contained page
    "base_model",  # the default base, pretrained once
    "plan",  # a run's plan: every input resolved and checked, cheapest first, nothing written
    "application",  # one run from a TrainConfig
    "train_lora",  # the command line
]


def lora_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of ``lora`` or ``lora.<module>`` anywhere in the file
    (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name) for a in node.names if a.name == "lora" or a.name.startswith("lora.")
            ]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "lora":
                found += [(node.lineno, f"lora.{a.name}") if f"lora.{a.name}" in _modules() else (node.lineno, "lora")
                          for a in node.names]  # fmt: skip
            elif node.module.startswith("lora."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "relative import"))
    return found


def _modules() -> set[str]:
    return {f"lora.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def test_every_module_has_a_layer():
    assert _modules() == {f"lora.{m}" for m in LAYERS}, "place a new module in LAYERS"


@pytest.mark.parametrize("module", LAYERS)
def test_a_module_imports_only_modules_below_it(module):
    below = {f"lora.{m}" for m in LAYERS[: LAYERS.index(module)]}
    for line, name in lora_imports(PACKAGE / f"{module}.py"):
        assert name != "lora", f"lora/{module}.py:{line} imports the package's __init__"
        assert name != "relative import", f"lora/{module}.py:{line}: use absolute imports"
        assert name in below, f"lora/{module}.py:{line} imports {name}, which is not below it"


def test_the_walk_finds_imports_inside_functions(tmp_path):
    """The test can fail: an upward import hidden in a function body is seen."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from lora.trainer import Trainer\n    import lora\n")
    assert lora_imports(path) == [(2, "lora.trainer"), (3, "lora")]


def test_the_version_is_written_once():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "lora._version.__version__"' in pyproject
    sources = [p for p in PACKAGE.glob("*.py") if "__version__ = " in p.read_text()]
    assert sources == [PACKAGE / "_version.py"]


def test_no_class_holds_several_rooms():
    """A class of more than about 450 lines holds several concepts: split it (the model's architecture, adapter
    set, base reading and storage each have a module of their own)."""
    long = [f"lora/{p.name}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in sorted(PACKAGE.glob("*.py")) for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 450]  # fmt: skip
    assert not long, long
