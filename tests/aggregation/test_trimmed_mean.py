"""TrimmedMean against a coordinate-by-coordinate loop."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as peer
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from jdoptim.aggregation import TrimmedMean
from tests.aggregation._jacobians import jacobians


def trimmed_mean_loop(matrix: Tensor, trim: int) -> Tensor:
    result = []
    for column in matrix.T.tolist():
        kept = sorted(column)[trim : len(column) - trim]
        result.append(sum(kept) / len(kept))
    return torch.tensor(result, dtype=matrix.dtype)


def test_hand_computed() -> None:
    matrix = torch.tensor([[1.0, 10.0], [2.0, -5.0], [3.0, 0.0], [100.0, 1.0]])
    assert torch.equal(TrimmedMean(1)(matrix), torch.tensor([2.5, 0.5]))


def test_no_trimming_is_the_mean() -> None:
    matrix = torch.randn(4, 3, dtype=torch.float64)
    assert torch.allclose(TrimmedMean(0)(matrix), matrix.mean(dim=0))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_matches_the_loop_and_the_peer(data: st.DataObject) -> None:
    matrix = data.draw(jacobians(max_rows=8))
    trim = data.draw(st.integers(0, (matrix.shape[0] - 1) // 2))
    expected = trimmed_mean_loop(matrix, trim)
    assert torch.allclose(TrimmedMean(trim)(matrix), expected, atol=1e-12)
    if trim > 0:
        assert torch.allclose(peer.TrimmedMean(trim)(matrix), expected, atol=1e-12)


def test_too_few_rows() -> None:
    with pytest.raises(ValueError, match="needs at least 5 rows"):
        TrimmedMean(2)(torch.randn(4, 3))


@pytest.mark.parametrize("trim", [-1, 1.0, True], ids=str)
def test_bad_trim_number(trim: int) -> None:
    with pytest.raises(ValueError, match="trim_number must be a non-negative int"):
        TrimmedMean(trim)


def test_repr() -> None:
    assert repr(TrimmedMean(2)) == "TrimmedMean(trim_number=2)"
    assert str(TrimmedMean(2)) == "TrimmedMean"


def test_coordinate_wise_columns_give_their_part_of_the_direction() -> None:
    """What ``coordinate_wise`` promises (a sharded model aggregates its own columns)."""
    matrix = torch.randn(7, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = TrimmedMean(2)(matrix)
    columns = torch.tensor([8, 1, 5])
    assert TrimmedMean.coordinate_wise
    assert torch.equal(TrimmedMean(2)(matrix[:, columns]), whole[columns])
