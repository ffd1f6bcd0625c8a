"""Loading a base: the file's tensors become the weights (no random model first, no copy), with the adapter
and the random generator exactly what building the model made before; a half-precision folder stays half
(its products those of its float32 copy, bit for bit), its adapter float32, its base untouched by training."""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, assert_close_scaled, make_llama_folder
from safetensors.torch import load_file

from lora.application import build_model
from lora.config import TrainConfig
from lora.lora_layer import deferred_base_init
from lora.lora_transformer import LoRATransformer
from lora.plan import storage_for
from lora.pretrained import read_base_tensors, resolve_base

IDX = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, gpt2_folder):
    """A tiny Llama folder in float32, the same weights in bfloat16 and in float16, and a tied GPT-2 one."""
    import transformers

    root = tmp_path_factory.mktemp("half")
    out = {"fp32": make_llama_folder(root / "fp32"), "gpt2": gpt2_folder}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out["fp32"])
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        theirs.to(dtype).save_pretrained(root / name)
        shutil.copy(out["fp32"] / "tokenizer.json", root / name)
        out[name] = root / name
    return out


def built_the_plain_way(folder, seed, **options):
    """The model as from_pretrained made it before: built on the CPU with its random weights, the file's
    copied over them; and the generator's state after building."""
    source = resolve_base(folder)
    torch.manual_seed(seed)
    with deferred_base_init():
        model = LoRATransformer(**{**source.architecture.to_dict(), **options})
    state = torch.get_rng_state()
    with_head = model.cls_head is not None and model.config.num_classes == source.architecture.num_classes
    own = model.state_dict()
    with torch.no_grad():
        for key, value in read_base_tensors(source, with_head).items():
            own[key].copy_(value)
    model.init_adapter_from_base()
    return model, state


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("fp32", {"lora_r": 4}),
        (
            "fp32",
            {
                "lora_r": 3,
                "lora_init": "gaussian",
                "use_dora": True,
                "adapt_feedforward": True,
                "lora_targets": "q,k,v,o",
                "lora_dropout": 0.1,
            },
        ),
        ("fp32", {"lora_r": 2, "lora_init": "pissa", "num_classes": 3}),  # a fresh head
        ("gpt2", {"lora_r": 4, "lora_init": "olora", "use_rslora": True}),  # tied head, biases
    ],
)
def test_the_loaded_model_and_the_generator_are_those_of_building_it_the_plain_way(folders, kind, options):
    """Nothing random is made for the base, yet every tensor (the adapter's A as drawn, a fresh head) and the
    generator's state afterwards equal building the whole model on the CPU first; so does the fingerprint."""
    expected, state = built_the_plain_way(folders[kind], 7, **options)
    torch.manual_seed(7)
    model = LoRATransformer.from_pretrained(folders[kind], **options)
    assert torch.equal(torch.get_rng_state(), state)
    ours, theirs = model.state_dict(), expected.state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    assert model.base_fingerprint() == expected.base_fingerprint()
    if model.config.tied_head:
        assert model.lm_head.weight is model.wte.weight  # stored once


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_a_half_folder_stays_half_with_a_float32_adapter_and_computes_as_its_float32_copy(folders, kind):
    """The linear weights, embeddings and head in the file's dtype, the norms and the adapter (A, B, DoRA's
    magnitudes) in float32; logits bit for bit those of the same file widened to float32, outside autocast
    and under bf16 autocast; the fingerprint that of the widened weights."""
    half = LoRATransformer.from_pretrained(folders[kind], lora_r=4, use_dora=True, adapt_feedforward=True)
    wide = LoRATransformer.from_pretrained(folders[kind], torch.float32, lora_r=4, use_dora=True,
                                           adapt_feedforward=True)  # fmt: skip
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[kind])
    for name, p in half.named_parameters():
        leaf = name.rpartition(".")[2]
        if leaf.startswith("lora_") or "norm" in name or name.split(".")[-2].startswith("ln"):
            assert p.dtype == torch.float32, name
        else:
            assert p.dtype == dtype and not p.requires_grad, name
    assert all(p.dtype == torch.float32 for p in wide.parameters())
    for _, layer in half.lora_layers():
        layer.lora_B.data.normal_(0, 0.05)  # an adapter that does something
    for a, b in zip(half.parameters(), wide.parameters(), strict=True):
        if a.dtype == torch.float32:
            b.data.copy_(a.data)
    half.eval(), wide.eval()
    with torch.no_grad():
        assert torch.equal(half(IDX), wide(IDX))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(half(IDX), wide(IDX))
    assert half.base_fingerprint() == wide.base_fingerprint()


def test_a_bf16_folder_gives_transformers_logits(folders):
    """Against transformers on the same bfloat16 file: its float32 copy within 1e-4 (we compute in float32),
    and its bfloat16 model within bfloat16's rounding (it computes in bfloat16; ours is the better number)."""
    import transformers

    ours = LoRATransformer.from_pretrained(folders["bf16"], lora_r=0).eval()
    with torch.no_grad():
        logits = ours(IDX)
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            theirs = transformers.AutoModelForCausalLM.from_pretrained(folders["bf16"], dtype=dtype).eval()
            assert_close_scaled(logits, theirs(IDX).logits.float(), tol)


def mappings(path: Path) -> list[tuple[int, int]]:
    """The address ranges where the file ``path`` is mapped into this process (Linux's ``/proc/self/maps``)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(path.resolve()):
            ranges.append(tuple(int(x, 16) for x in parts[0].split("-")))
    return ranges


def mapped(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether ``tensor``'s memory lies in one of ``ranges``."""
    return any(lo <= tensor.untyped_storage().data_ptr() < hi for lo, hi in ranges)


@pytest.mark.parametrize("kind", ["bf16", "fp32"])
def test_loading_maps_the_file_instead_of_copying_it(folders, kind):
    """The weights kept in the file's dtype are the file's own pages (a mapping of it), not a copy: a half
    folder's linear weights, embeddings and head, every tensor of a float32 one; the widened norms and the
    adapter are the only tensors allocated. Widening (``base_dtype=torch.float32``) copies."""
    path = folders[kind] / "model.safetensors"
    model = LoRATransformer.from_pretrained(folders[kind], lora_r=4)
    ranges = mappings(path)
    for name, p in model.named_parameters():
        file_dtype = kind == "fp32" or p.dtype == torch.bfloat16
        assert mapped(p, ranges) == (file_dtype and "lora_" not in name), name
    del model
    wide = LoRATransformer.from_pretrained(folders[kind], torch.float32, lora_r=4)
    assert any(mapped(p, mappings(path)) for p in wide.parameters()) == (kind == "fp32")


def test_training_leaves_a_half_base_and_its_file_bit_for_bit_unchanged(folders, tmp_path):
    """A few LoRA steps under bf16 autocast: the adapter changes, the half base (and the file it maps) does
    not; the base saves back as the file was: every tensor bfloat16, the same values."""
    before = load_file(folders["bf16"] / "model.safetensors")
    model = LoRATransformer.from_pretrained(folders["bf16"], lora_r=4, dropout=0.0)
    model.configure_lora_training()
    base = {k: v.clone() for k, v in model.base_state_dict().items()}
    a = model.blocks[0].attn.q_proj.lora_A.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(IDX[:, :-1], targets=IDX[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(model.blocks[0].attn.q_proj.lora_A, a)
    after = model.base_state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == torch.bfloat16 for k, v in base.items())
    model.save_pretrained(tmp_path / "again")
    again, file = (
        load_file(tmp_path / "again" / "model.safetensors"),
        load_file(folders["bf16"] / "model.safetensors"),
    )
    assert all(torch.equal(file[k], v) for k, v in before.items())
    assert {v.dtype for v in again.values()} == {torch.bfloat16}
    assert again.keys() == base.keys() and all(torch.equal(again[k], v) for k, v in base.items())


def test_a_half_base_merges_in_its_own_dtype(folders, tmp_path):
    """Nothing of a half file's base was rounded: merging folds the float32 adapter in, cast once to the
    file's dtype, and the merged folder computes what the merged model does."""
    model = LoRATransformer.from_pretrained(folders["bf16"], lora_r=4).eval()
    for _, layer in model.lora_layers():
        layer.lora_B.data.normal_(0, 0.05)
    q = model.blocks[0].attn.q_proj
    by_hand = (q.weight.float() + q.delta_weight()).to(torch.bfloat16)
    model.merge_and_export(tmp_path / "merged")
    merged = LoRATransformer.from_pretrained(tmp_path / "merged", lora_r=0).eval()
    assert torch.equal(merged.blocks[0].attn.q_proj.weight, by_hand)
    with torch.no_grad():
        assert torch.equal(merged(IDX), model.merged_model()(IDX))
        assert_close_scaled(merged(IDX), model(IDX), 2e-2)  # the merged weights rounded to bfloat16


def test_a_run_keeps_a_half_folder_half_unless_float32_is_asked_for(folders):
    """``--quantize_base auto`` keeps a half folder as stored; ``none`` (float32) and full fine-tuning widen
    it; ``bf16`` rounds an fp16 folder's block weights; a float32 folder is as before."""
    source = resolve_base(folders["fp16"])
    assert storage_for(TrainConfig(), CPU, source) == "half"
    assert storage_for(TrainConfig(), CPU, resolve_base(folders["fp32"])) == "none"
    auto = build_model(TrainConfig(dropout=0.0), source, None)
    assert auto.wte.weight.dtype == torch.float16 and auto.blocks[0].attn.q_proj.lora_A.dtype == torch.float32
    assert auto.base_quantization is None
    wide = build_model(TrainConfig(quantize_base="none"), source, None)
    full = build_model(TrainConfig(method="full"), source, None)
    assert all(p.dtype == torch.float32 for p in [*wide.parameters(), *full.parameters()])
    assert all(p.requires_grad for p in full.parameters())
    narrow = build_model(TrainConfig(quantize_base="bf16"), source, None)
    assert narrow.blocks[0].attn.q_proj.weight.dtype == torch.bfloat16 and narrow.base_quantization == "bf16"
    assert narrow.wte.weight.dtype == torch.float16  # (as stored: the embedding is read exactly)
    with pytest.raises(ValueError, match=r"full fine-tune trains its base.*base_dtype=torch.float32"):
        LoRATransformer.from_pretrained(folders["bf16"], lora_r=0).prepare_training("full")
    with pytest.raises(ValueError, match=r"base_dtype must be None .* or torch.float32, got torch.bfloat16"):
        LoRATransformer.from_pretrained(folders["bf16"], torch.bfloat16)
