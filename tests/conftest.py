"""Shared fixtures: tiny configurations that train in about a second, and a random base to train on.

Every flag given must take effect (options a run would ignore are refused), so the flags depend on the
run: the architecture and ``base_steps`` only when a base is pretrained here, ``num_examples`` only for
the generated tasks, ``seq_len`` only for tasks that read text.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora.lora_transformer import LoRATransformer

TINY_ARCH = ["--d_model", "32", "--num_heads", "2", "--num_layers", "1", "--max_seq_len", "32",
             "--base_steps", "30"]  # fmt: skip
TINY_RUN = [
    "--max_steps",
    "12",
    "--batch_size",
    "32",
    "--eval_every",
    "4",
    "--eval_batches",
    "2",
    "--device",
    "cpu",
]
CIPHER_DATA = ["--num_examples", "512"]
TINY_FLAGS = [*TINY_ARCH, *TINY_RUN, *CIPHER_DATA]  # rot13 on a base pretrained here (--base_checkpoint auto)
ON_BASE_FLAGS = [*TINY_RUN, *CIPHER_DATA]  # rot13 on a given --base_checkpoint of TINY_ARCH's shape


def magnitude(*values) -> float:
    """``max(1, max |x|)`` over the finite ``x`` of ``values`` (tensors, numbers or lists of numbers): the size
    that a float computation's rounding grows with (one float32 rounding step is ~1.2e-7 of it). An inf or
    NaN does not widen the bound: assert_close wants those equal."""
    finite = [t[t.isfinite()] for t in (torch.as_tensor(v).detach().abs().double() for v in values)]
    return max(1.0, *(t.max().item() for t in finite if t.numel()))


def assert_close_scaled(actual, expected, tol: float, *, rtol: float = 0.0, msg=None) -> None:
    """``actual`` equals ``expected`` within ``tol * magnitude(actual, expected)`` (and ``rtol`` of each
    value, as torch.testing.assert_close): ``tol`` absolute for values up to 1, growing with the largest
    value compared, since BLAS kernels round differently between processors (1e-6 is ~8 float32 rounding
    steps of the largest value). ``tol=0, rtol=0`` is bit for bit; ``msg`` is put before torch's message."""
    atol = tol * magnitude(actual, expected)
    label = None if msg is None else lambda default: f"{msg}: {default}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=label)


def task_flags(flags: list[str], task: str) -> list[str]:
    """``flags`` (for rot13) changed for ``task``: text tasks take ``seq_len``, not ``num_examples``."""
    if task in ("rot13", "atbash"):
        return [*flags, "--task", task]
    i = flags.index("--num_examples")
    return [*flags[:i], *flags[i + 2 :], "--seq_len", "16", "--task", task]


@pytest.fixture
def tiny_flags(tmp_path):
    """Flags for a tiny rot13 run (its base pretrained here) writing into a fresh temporary output folder."""
    return [*TINY_FLAGS, "--output_dir", str(tmp_path / "runs")]


@pytest.fixture
def one_thread():
    """Tiny models in one thread: several threads only contend (badly, on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random base of TINY_ARCH's shape (seed 0): runs on it skip pretraining."""
    folder = tmp_path_factory.mktemp("base") / "base"
    torch.manual_seed(0)
    LoRATransformer(256, d_model=32, num_heads=2, num_layers=1, max_seq_len=32, lora_r=0).save_pretrained(
        folder
    )
    return folder


@pytest.fixture
def flags(tmp_path, base) -> list[str]:
    """A tiny rot13 run on the random base, writing into a fresh temporary output folder."""
    return [*ON_BASE_FLAGS, "--output_dir", str(tmp_path / "runs"), "--base_checkpoint", str(base)]


GPT2_TEXT = (
    "The quick brown fox jumps over the lazy dog. A tokenizer learns its merges from text like this one.\n"
    "def greet(name):\n    return 'hello ' + name\n"
) * 40


def unmerged_and_merged(model: LoRATransformer, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s outputs on ``idx`` with its adapter unmerged and merged (left unmerged again), no grad."""
    with torch.no_grad():
        unmerged = model(idx)
        model.merge_lora()
        merged = model(idx)
        model.unmerge_lora()
    return unmerged, merged


def copy_with_config(source: Path, folder: Path, **change) -> Path:
    """A copy of the model folder ``source`` at ``folder`` whose ``config.json`` has the keys of ``change``."""
    import json
    import shutil

    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    return folder


def make_gpt2_folder(folder: Path, vocab_size: int = 300, seed: int = 0, **config) -> Path:
    """A tiny GPT-2 folder as transformers writes it (random weights, ``seed``), with a byte-level BPE
    tokenizer trained here on ``GPT2_TEXT`` (``tokenizer.json``): nothing is downloaded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora.tokenizer import END_OF_TEXT, train_byte_bpe

    tokenizer = train_byte_bpe([GPT2_TEXT], vocab_size)
    eos = tokenizer.token_to_id(END_OF_TEXT)
    settings = {"n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "bos_token_id": eos,
                "eos_token_id": eos, **config}  # fmt: skip
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, **settings)).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


TINY_LLAMA = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rope_theta": 500.0}  # fmt: skip


def make_llama_folder(folder: Path, kind: str = "llama", seed: int = 0, **config) -> Path:
    """A tiny Llama-layout folder as transformers writes it (random weights, ``seed``; grouped-query
    attention, 2 key/value heads for 4), with a byte-level BPE tokenizer trained here: nothing downloaded."""
    import transformers

    from lora.tokenizer import train_byte_bpe

    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
               "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
               "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM)}  # fmt: skip
    config_class, model_class = classes[kind]
    torch.manual_seed(seed)
    model_class(config_class(**{**TINY_LLAMA, **config})).save_pretrained(folder)
    train_byte_bpe([GPT2_TEXT], TINY_LLAMA["vocab_size"]).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory) -> Path:
    """A tiny random GPT-2 folder (transformers' own files) with a tokenizer trained here."""
    return make_gpt2_folder(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (registered in ``sys.modules``, where its dataclasses look
    their module up), to call its functions and ``main`` in-process."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# two processes under torchrun (Gloo on the CPU), one thread each, the checkout importable
TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def torchrun_two(tmp_path: Path, harness: str, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """``harness`` (a Python script's text, written to ``tmp_path``) run by ``torchrun --standalone
    --nproc_per_node 2`` with ``argv``, from the checkout, ``env`` added to :data:`TORCHRUN_ENV`."""
    script = tmp_path / "harness.py"
    script.write_text(harness)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        *argv,
    ]
    return subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env={**TORCHRUN_ENV, **env},
                          capture_output=True, text=True, timeout=180)  # fmt: skip
