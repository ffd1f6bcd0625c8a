"""What an adapter's update does to a weight, in numbers: the paper's analyses (Hu et al. 2021, Section 7).

For one adapted module with frozen ``W0: (d, k)`` and update ``ΔW = scaling B A`` (``A: (r, k)``,
``B: (d, r)``): the singular values of ``ΔW`` (at most ``r`` are non-zero), its size relative to ``W0``,
the subspace similarity of two adapters' ``A`` s (Section 7.2) and the amplification factor (Section 7.3).
Everything is computed in float64.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "amplification_factor",
    "numerical_rank",
    "relative_update",
    "singular_values",
    "subspace_similarity",
    "update_norm",
]


def singular_values(m: torch.Tensor) -> torch.Tensor:
    """The singular values of ``m`` (2-D), largest first, in float64."""
    return torch.linalg.svdvals(m.detach().double())


def numerical_rank(m: torch.Tensor) -> int:
    """How many singular values of ``m`` are above float rounding: ``max(d, k) * eps(float32) * s_max``."""
    s = singular_values(m)
    if s.numel() == 0 or s[0] == 0:
        return 0
    tol = max(m.shape) * torch.finfo(torch.float32).eps * s[0]
    return int((s > tol).sum())


def update_norm(a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
    """``||scaling B A||_F`` for ``A: (r, k)``, ``B: (d, r)``, without forming the ``(d, k)`` product:
    ``||B A||_F^2 = tr(A^T B^T B A) = sum((B^T B) * (A A^T))``, two ``(r, r)`` Gram matrices."""
    a, b = a.detach().double(), b.detach().double()
    squared = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0)  # rounding can take an exact 0 below it
    return abs(scaling) * float(squared.sqrt())


def relative_update(delta: torch.Tensor, w0: torch.Tensor) -> float:
    """``||ΔW||_F / ||W0||_F``: how large the update is against the weight it changes."""
    return float(
        torch.linalg.matrix_norm(delta.detach().double()) / torch.linalg.matrix_norm(w0.detach().double())
    )


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """``φ(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j)`` for ``i <= r1``, ``j <= r2``, a ``(r1, r2)`` matrix.

    ``U_i`` holds the top ``i`` right-singular vectors of ``A`` (``A: (r, k)``, so ``U: (k, r)``): the
    directions of the input space the adapter reads. ``φ`` is 1 where the subspaces coincide and 0 where
    they are orthogonal (the paper's Figure 3 compares r = 8 and r = 64 adapters this way).
    """
    u1 = torch.linalg.svd(a1.detach().double(), full_matrices=False).Vh.T  # (k, r1)
    u2 = torch.linalg.svd(a2.detach().double(), full_matrices=False).Vh.T  # (k, r2)
    overlap = (u1.T @ u2) ** 2  # (r1, r2): squared cosines between single directions
    cumulative = overlap.cumsum(0).cumsum(1)  # [i-1, j-1] = ||U1_i^T U2_j||_F^2
    i = torch.arange(1, u1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, u2.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


def amplification_factor(delta: torch.Tensor, w0: torch.Tensor, r: int) -> float:
    """``||ΔW||_F / ||U^T W0 V^T||_F`` with ``U: (d, r)``, ``V^T``'s rows the top ``r`` singular vectors of
    ``ΔW`` (Section 7.3): how much ``ΔW`` amplifies the directions of ``W0`` it works in. The paper finds
    it large (about 20 for r = 4 on GPT-3's W_q): the update boosts directions ``W0`` barely uses."""
    delta = delta.detach().double()
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    projected = torch.linalg.matrix_norm(u[:, :r].T @ w0.detach().double() @ vh[:r].T)  # of an (r, r) matrix
    if projected == 0:  # W0 has nothing in those directions: unbounded amplification
        return math.inf
    return float(torch.linalg.matrix_norm(delta) / projected)
