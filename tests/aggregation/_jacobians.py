"""Random Jacobians for property tests, drawn from a seed so that hypothesis can shrink them."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import Tensor


def jacobian_from_seed(
    seed: int, rows: int, cols: int, rank: int, dtype: torch.dtype = torch.float64
) -> Tensor:
    """A ``[rows, cols]`` matrix of rank at most ``rank``, rows of varied norms."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, cols, generator=generator, dtype=torch.float64)
    row_scales = torch.exp(torch.randn(rows, 1, generator=generator, dtype=torch.float64))
    return (row_scales * (left @ right)).to(dtype)


@st.composite
def jacobians(draw: st.DrawFn, max_rows: int = 6, max_cols: int = 8, min_rows: int = 1) -> Tensor:
    """Float64 Jacobians, including rank-deficient ones (rank below ``min(m, n)``)."""
    rows = draw(st.integers(min_rows, max_rows))
    cols = draw(st.integers(1, max_cols))
    rank = draw(st.integers(1, min(rows, cols)))
    seed = draw(st.integers(0, 2**31 - 1))
    return jacobian_from_seed(seed, rows, cols, rank)


@st.composite
def non_conflicting_jacobians(draw: st.DrawFn) -> Tensor:
    """Jacobians whose rows pairwise have non-negative inner products (non-negative entries)."""
    return draw(jacobians()).abs()


def gramian(matrix: Tensor) -> Tensor:
    return matrix @ matrix.T


def jacobian_sequence(
    count: int, dtype: torch.dtype = torch.float64, *, rows: int = 3, cols: int = 6
) -> list[Tensor]:
    """Successive full-rank Jacobians (seeds 0, 1, ...), inputs for calls of stateful methods."""
    rank = min(rows, cols)
    return [jacobian_from_seed(k, rows, cols, rank=rank, dtype=dtype) for k in range(count)]


def gramian_sequence(
    count: int, dtype: torch.dtype = torch.float64, *, rows: int = 3, cols: int = 5
) -> list[Tensor]:
    """The Gramians of :func:`jacobian_sequence`."""
    return [gramian(j) for j in jacobian_sequence(count, dtype, rows=rows, cols=cols)]
