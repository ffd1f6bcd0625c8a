"""lora/analysis.py on cases with known answers."""

import pytest
import torch

from lora.analysis import (
    amplification_factor,
    numerical_rank,
    relative_update,
    singular_values,
    subspace_similarity,
    update_norm,
)


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q  # (n, k), orthonormal columns


def test_identical_subspaces_give_one_and_orthogonal_ones_zero():
    a = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    phi = subspace_similarity(a, a)
    assert phi.shape == (8, 8)
    torch.testing.assert_close(phi, torch.ones(8, 8, dtype=torch.float64))
    basis = orthonormal(64, 12, seed=1)  # 12 orthonormal directions: 4 for one adapter, 8 for another
    a1 = torch.randn(4, 4, dtype=torch.float64) @ basis[:, :4].T  # (4, 64), rows in the first 4 directions
    a2 = torch.randn(8, 8, dtype=torch.float64) @ basis[:, 4:].T  # (8, 64), rows in the other 8
    torch.testing.assert_close(subspace_similarity(a1, a2), torch.zeros(4, 8, dtype=torch.float64))
    # nested: a 2-direction adapter inside an 8-direction one is covered by all 8 of its directions
    phi = subspace_similarity(basis[:, :2].T, torch.randn(8, 8, dtype=torch.float64) @ basis[:, :8].T)
    torch.testing.assert_close(phi[:, -1], torch.ones(2, dtype=torch.float64))
    assert 0 < phi[0, 0] < 1  # one direction of each: only partly aligned


def test_a_rank_k_update_has_exactly_k_singular_values_above_rounding():
    g = torch.Generator().manual_seed(0)
    for k in (1, 3, 8):
        b, a = torch.randn(96, k, generator=g), torch.randn(k, 80, generator=g)
        delta = b @ a  # float32, rank k
        assert numerical_rank(delta) == k
        s = singular_values(delta)
        assert s.shape == (80,) and s[k - 1] > 1e3 * s[k]  # a cliff after the k-th value
    assert numerical_rank(torch.zeros(5, 4)) == 0


def test_amplification_factor_of_a_scaled_weight_by_hand():
    """ΔW = c W0 with W0 of rank r: the top-r directions of ΔW are W0's, U^T W0 V^T = diag(s), so the
    factor is ||c W0||_F / ||diag(s)||_F = c."""
    u, v = orthonormal(20, 3, seed=2), orthonormal(30, 3, seed=3)
    s = torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64)
    w0 = u @ torch.diag(s) @ v.T  # (20, 30), rank 3
    assert amplification_factor(2.5 * w0, w0, r=3) == pytest.approx(2.5, rel=1e-9)
    # with r = 1 only the top direction is projected: ||2.5 W0||_F / 5
    expected = 2.5 * float(torch.linalg.norm(s)) / 5.0
    assert amplification_factor(2.5 * w0, w0, r=1) == pytest.approx(expected, rel=1e-9)


def test_relative_update():
    w0 = torch.full((3, 4), 2.0)
    assert relative_update(0.1 * w0, w0) == pytest.approx(0.1)


def test_update_norm_equals_the_norm_of_the_formed_product():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 7, generator=g), torch.randn(5, 4, generator=g)
    expected = float(torch.linalg.matrix_norm(2.5 * (b.double() @ a.double())))
    assert update_norm(a, b, 2.5) == pytest.approx(expected, rel=1e-12)
    # by hand: A = [[1, 0]], B = [[3], [4]]: B A = [[3, 0], [4, 0]], ||.||_F = 5
    assert update_norm(torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0], [4.0]]), 0.5) == pytest.approx(2.5)
    assert update_norm(a, torch.zeros(5, 4), 2.0) == 0.0  # LoRA's B at init
