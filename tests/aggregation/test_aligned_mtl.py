"""AlignedMTL: hand-checked values, aligned gradients orthogonal with equal norms, peer values."""

from __future__ import annotations

import math

import pytest
import torch
import torchjd.aggregation as peer

from jdoptim.aggregation import AlignedMTL, AlignedMTLWeighting
from tests.aggregation._jacobians import jacobian_from_seed

DTYPES = [torch.float32, torch.float64]
MODES = ["min", "median", "rmse"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_orthogonal_rows_by_hand(dtype: torch.dtype) -> None:
    jacobian = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=dtype)
    # G = diag(9, 16), λ_min = 9: B = 3 diag(1/3, 1/4), w = B [½, ½].
    torch.testing.assert_close(
        AlignedMTL()(jacobian), torch.tensor([1.5, 1.5], dtype=dtype), rtol=1e-6, atol=0
    )
    rmse = math.sqrt(12.5)
    torch.testing.assert_close(
        AlignedMTL(scale_mode="rmse")(jacobian),
        torch.tensor([rmse / 2, rmse / 2], dtype=dtype),
        rtol=1e-6,
        atol=0,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("rows", "cols"), [(3, 6), (4, 9)])
def test_aligned_gradients_are_orthogonal_with_equal_norms(mode: str, rows: int, cols: int) -> None:
    """Row i of the aligned system B J is (B eᵢ)ᵀ J: the weights for the preference eᵢ."""
    jacobian = jacobian_from_seed(rows + cols, rows, cols, rank=rows)
    gramian = jacobian @ jacobian.T
    balance = torch.stack(
        [
            AlignedMTLWeighting(torch.eye(rows, dtype=torch.float64)[i], mode)(gramian)
            for i in range(rows)
        ]  # type: ignore[arg-type]
    )
    aligned = balance @ jacobian
    eigenvalues = torch.linalg.eigvalsh(gramian)
    scale = {"min": eigenvalues[0], "median": eigenvalues.median(), "rmse": eigenvalues.mean()}[
        mode
    ]
    torch.testing.assert_close(
        aligned @ aligned.T, scale * torch.eye(rows, dtype=torch.float64), rtol=0, atol=1e-9 * scale
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols", "rank"), [(3, 5, 3), (5, 4, 4), (6, 8, 3)])
def test_matches_the_peer(mode: str, dtype: torch.dtype, rows: int, cols: int, rank: int) -> None:
    jacobian = jacobian_from_seed(rows * 7 + rank, rows, cols, rank=rank, dtype=dtype)
    pref = torch.linspace(0.5, 2.0, rows, dtype=dtype)
    for pref_vector in (None, pref):
        ours = AlignedMTL(pref_vector, mode)(jacobian)  # type: ignore[arg-type]
        theirs = peer.AlignedMTL(pref_vector, mode)(jacobian)  # type: ignore[arg-type]
        tolerance = 1e-4 if dtype == torch.float32 else 1e-10
        assert ours.dtype == dtype
        assert (ours - theirs).norm() <= tolerance * theirs.norm()


def test_scale_free_weights_and_zero_jacobian() -> None:
    jacobian = jacobian_from_seed(2, 3, 5, rank=3)
    weighting = AlignedMTLWeighting()
    gramian = jacobian @ jacobian.T
    torch.testing.assert_close(weighting(gramian * 1e12), weighting(gramian), rtol=1e-9, atol=0)
    assert torch.equal(AlignedMTL()(torch.zeros(3, 4)), torch.zeros(4))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="scale_mode"):
        AlignedMTLWeighting(scale_mode="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pref_vector"):
        AlignedMTLWeighting(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="pref_vector has 2 entries"):
        AlignedMTL(torch.tensor([1.0, 1.0]))(torch.ones(3, 4))
    with pytest.raises(ValueError, match="symmetric"):
        AlignedMTLWeighting()(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        AlignedMTL()(torch.tensor([[1.0, float("nan")]]))
    assert repr(AlignedMTL()) == "AlignedMTL(pref_vector=None, scale_mode='min')"
