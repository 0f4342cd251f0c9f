"""Krum and multi-Krum against the paper's scores computed from the rows themselves."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as peer
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from jdoptim.aggregation import Krum, KrumWeighting
from tests.aggregation._jacobians import gramian, jacobians

POINTS = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]], dtype=torch.float64)


def scores(matrix: Tensor, n_byzantine: int, power: int = 2) -> list[float]:
    """Blanchard et al. (2017): sum of squared distances to the m - f - 2 closest other rows
    (``power=1`` sums the plain distances instead)."""
    rows = matrix.shape[0]
    result = []
    for i in range(rows):
        distances = sorted(
            float((matrix[i] - matrix[j]).norm()) ** power for j in range(rows) if j != i
        )
        result.append(sum(distances[: rows - n_byzantine - 2]))
    return result


def test_hand_computed() -> None:
    # With f = 1 each point keeps its 2 nearest: scores 5, 2, 2, 5 and ~19600 for the outlier.
    assert torch.equal(Krum(1)(POINTS), torch.tensor([1.0], dtype=torch.float64))
    assert torch.equal(Krum(1, n_selected=2)(POINTS), torch.tensor([1.5], dtype=torch.float64))
    # Ties go to the lower index: rows 1, 2 then 0 (score 5, like row 3).
    assert torch.equal(Krum(1, n_selected=3)(POINTS), torch.tensor([1.0], dtype=torch.float64))
    weights = KrumWeighting(1, n_selected=2)(gramian(POINTS))
    assert torch.equal(weights, torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0], dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_selects_the_lowest_scores(data: st.DataObject) -> None:
    matrix = data.draw(jacobians(min_rows=4, max_rows=8))
    n_byzantine = data.draw(st.integers(0, matrix.shape[0] - 3))
    n_selected = data.draw(st.integers(1, matrix.shape[0]))
    weights = KrumWeighting(n_byzantine, n_selected)(gramian(matrix))
    expected_scores = torch.tensor(scores(matrix, n_byzantine), dtype=torch.float64)
    chosen = weights > 0
    assert int(chosen.sum()) == n_selected
    assert torch.allclose(weights[chosen], torch.full((n_selected,), 1 / n_selected).double())
    if n_selected < matrix.shape[0]:
        tolerance = 1e-9 * float(expected_scores.abs().max())
        assert expected_scores[chosen].max() <= expected_scores[~chosen].min() + tolerance


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_matches_the_peer_where_the_definitions_agree(data: st.DataObject) -> None:
    """The paper scores with squared distances; TorchJD 0.18 sums plain distances. Both select the
    same rows when the two rankings agree with a clear gap, so compare there."""
    matrix = data.draw(jacobians(min_rows=4, max_rows=8))
    n_byzantine = data.draw(st.integers(0, matrix.shape[0] - 3))
    n_selected = data.draw(st.integers(1, matrix.shape[0]))
    for power in (2, 1):
        ranked = sorted(scores(matrix, n_byzantine, power))
        if n_selected < len(ranked):
            assume(ranked[n_selected] - ranked[n_selected - 1] > 1e-6 * (ranked[-1] + 1e-300))
    selected = set(torch.tensor(scores(matrix, n_byzantine, 2)).argsort()[:n_selected].tolist())
    peer_selected = torch.tensor(scores(matrix, n_byzantine, 1)).argsort()[:n_selected].tolist()
    assume(selected == set(peer_selected))
    ours = Krum(n_byzantine, n_selected)(matrix)
    theirs = peer.Krum(n_byzantine, n_selected)(matrix)
    assert torch.allclose(ours, theirs, atol=1e-9 * float(matrix.abs().max()))


def test_an_outlier_is_never_selected() -> None:
    matrix = torch.cat([torch.randn(6, 3, dtype=torch.float64), torch.full((1, 3), 1e6).double()])
    weights = KrumWeighting(1, n_selected=5)(gramian(matrix))
    assert weights[-1] == 0


def test_too_few_rows() -> None:
    with pytest.raises(ValueError, match="needs at least 5 rows"):
        Krum(n_byzantine=2)(torch.randn(4, 3))


def test_too_many_selected() -> None:
    with pytest.raises(ValueError, match="n_selected=6 is larger than the number of rows"):
        Krum(n_byzantine=1, n_selected=6)(torch.randn(5, 3))


@pytest.mark.parametrize(
    ("n_byzantine", "n_selected"), [(-1, 1), (1, 0), (1.5, 1), (True, 1)], ids=str
)
def test_bad_arguments(n_byzantine: int, n_selected: int) -> None:
    with pytest.raises(ValueError, match="must be an int"):
        KrumWeighting(n_byzantine, n_selected)


def test_repr() -> None:
    assert repr(Krum(1, 2)) == "Krum(n_byzantine=1, n_selected=2)"
    assert repr(KrumWeighting(0)) == "KrumWeighting(n_byzantine=0, n_selected=1)"
    assert str(Krum(1)) == "Krum" and str(KrumWeighting(1)) == "Krum"
