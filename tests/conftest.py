"""Shared fixtures: a tiny configuration that trains in about a second."""

import pytest

TINY_FLAGS = [
    "--d_model", "32", "--num_heads", "2", "--num_layers", "1", "--max_seq_len", "32", "--seq_len", "16",
    "--base_steps", "30", "--max_steps", "12", "--num_examples", "512", "--batch_size", "32",
    "--eval_every", "4", "--eval_batches", "2", "--device", "cpu",
]  # fmt: skip


@pytest.fixture
def tiny_flags(tmp_path):
    """Flags for a tiny run writing into a fresh temporary output folder."""
    return [*TINY_FLAGS, "--output_dir", str(tmp_path / "runs")]
