"""lora/checkpoint.py: exact round trips, keep-K, atomic writes, and refusing bad files before loading."""

import os
import random

import numpy as np
import pytest
import torch

from lora.checkpoint import find_latest, load_checkpoint, read_trainer_state, save_checkpoint
from lora.errors import CheckpointError
from lora.lora_transformer import LoRATransformer


def model_and_optimizer(seed: int = 0) -> tuple[LoRATransformer, torch.optim.Optimizer]:
    """A tiny LoRA model and an AdamW that has taken one step (so it has moments to save)."""
    torch.manual_seed(seed)
    model = LoRATransformer(256, d_model=16, num_heads=2, num_layers=1, max_seq_len=8, lora_r=2)
    model.configure_lora_training()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randint(0, 256, (2, 8))).sum().backward()
    optimizer.step()
    return model, optimizer


def state(step: int) -> dict:
    return {"step": step, "epoch": 0, "batch_in_epoch": step, "history": {"step": list(range(1, step + 1))}}


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_round_trip_restores_weights_optimizer_and_every_rng(tmp_path):
    model, optimizer = model_and_optimizer(0)
    path = save_checkpoint(tmp_path, model, optimizer, state(3), keep=2)
    assert path.name == "checkpoint-0000003.safetensors"
    expected = (torch.rand(4), random.random(), np.random.rand(2))  # what comes after the checkpoint
    weights, moments = trainable(model), optimizer.state_dict()["state"]

    other, other_opt = model_and_optimizer(1)  # different weights, moments and RNG positions
    restored = load_checkpoint(path, other, other_opt)
    assert restored == state(3)
    assert all(torch.equal(trainable(other)[n], w) for n, w in weights.items())
    for i, s in other_opt.state_dict()["state"].items():
        assert all(torch.equal(s[k], moments[i][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert torch.equal(torch.rand(4), expected[0])
    assert random.random() == expected[1]
    assert np.array_equal(np.random.rand(2), expected[2])


def test_keeps_the_newest_k_and_finds_the_latest_by_step(tmp_path):
    model, optimizer = model_and_optimizer()
    for step in (5, 10, 15, 100):
        save_checkpoint(tmp_path, model, optimizer, state(step), keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-0000015.safetensors", "checkpoint-0000100.safetensors"]
    assert find_latest(tmp_path).name == "checkpoint-0000100.safetensors"
    assert find_latest(tmp_path / "nothing-here") is None
    save_checkpoint(tmp_path, model, optimizer, {**state(1), "step": 12_345_678}, keep=2)  # past 7 digits
    assert find_latest(tmp_path).name == "checkpoint-12345678.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "checkpoint-0000100.safetensors"


def test_a_failed_write_leaves_the_previous_checkpoint_whole_and_loadable(tmp_path, monkeypatch):
    model, optimizer = model_and_optimizer()
    first = save_checkpoint(tmp_path, model, optimizer, state(1), keep=5)
    before = first.read_bytes()

    def crash(src, dst):  # the process "dies" between writing the temporary file and renaming it
        raise OSError(28, "No space left on device", str(src))

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, model, optimizer, state(2), keep=5)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no partial file, no leftovers
    assert first.read_bytes() == before
    assert load_checkpoint(first, *model_and_optimizer(1))["step"] == 1


def test_a_leftover_temporary_file_is_ignored_then_cleaned_up(tmp_path):
    model, optimizer = model_and_optimizer()
    save_checkpoint(tmp_path, model, optimizer, state(1), keep=5)
    partial = tmp_path / ".checkpoint-0000002.safetensors.4242.deadbeef.tmp"  # a kill -9 mid-write
    partial.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert find_latest(tmp_path).name == "checkpoint-0000001.safetensors"
    save_checkpoint(tmp_path, model, optimizer, state(2), keep=5)
    assert not partial.exists()


@pytest.mark.parametrize("damage", ["truncated", "header", "empty", "not-a-checkpoint"])
def test_damaged_files_are_refused_before_anything_is_loaded(tmp_path, damage):
    model, optimizer = model_and_optimizer()
    good = save_checkpoint(tmp_path, model, optimizer, state(1), keep=2).read_bytes()
    path = tmp_path / "bad.safetensors"
    if damage == "truncated":
        path.write_bytes(good[: len(good) - 10])
    elif damage == "header":
        path.write_bytes(b"\xff" * 8 + good[8:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid safetensors file without the trainer state: an adapter, say
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(path))
    expected = "not a training checkpoint" if damage == "not-a-checkpoint" else "truncated or corrupted"
    with pytest.raises(CheckpointError, match=expected):
        read_trainer_state(path)
    other, other_opt = model_and_optimizer(1)
    weights = trainable(other)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path, other, other_opt)
    assert all(torch.equal(trainable(other)[n], w) for n, w in weights.items())  # untouched


def test_a_checkpoint_of_another_shape_is_refused(tmp_path):
    model, optimizer = model_and_optimizer()
    path = save_checkpoint(tmp_path, model, optimizer, state(1), keep=2)
    torch.manual_seed(0)
    wider = LoRATransformer(256, d_model=16, num_heads=2, num_layers=1, max_seq_len=8, lora_r=4)
    wider.configure_lora_training()
    opt = torch.optim.AdamW([p for p in wider.parameters() if p.requires_grad])
    with pytest.raises(
        CheckpointError,
        match=r"wrong shapes: model\.blocks\.0\.attn\.q_proj\.lora_A \(2, 16\) \(expected \(4, 16\)\)",
    ):
        load_checkpoint(path, wider, opt)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors", wider, opt)
