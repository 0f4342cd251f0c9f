"""MGDA against its definition: the min-norm point of the convex hull of the rows."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as peer
from hypothesis import given, settings
from torch import Tensor

from jdoptim.aggregation import MGDA, MGDAWeighting
from tests.aggregation._jacobians import gramian, jacobians


def test_hand_computed() -> None:
    # Hull of (2, 0) and (0, 1): min 4a² + b² over a + b = 1 at a = 1/5, so the point (2/5, 4/5).
    matrix = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(MGDA()(matrix), torch.tensor([0.4, 0.8], dtype=torch.float64))
    weights = MGDAWeighting()(gramian(matrix))
    assert torch.allclose(weights, torch.tensor([0.2, 0.8], dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(matrix=jacobians(max_rows=8))
def test_satisfies_the_kkt_conditions(matrix: Tensor) -> None:
    """w ∈ Δ minimises wᵀGw iff (Gw)ᵢ ≥ wᵀGw for all i, with equality where wᵢ > 0."""
    matrix_gramian = gramian(matrix)
    weights = MGDAWeighting()(matrix_gramian)
    tolerance = 1e-7 * float(matrix_gramian.trace())
    assert (weights >= 0).all() and torch.isclose(weights.sum(), torch.tensor(1.0).double())
    gradient = matrix_gramian @ weights
    objective = weights @ gradient
    assert (gradient >= objective - tolerance).all()
    assert ((gradient - objective) * weights <= tolerance).all()


@settings(max_examples=30, deadline=None)
@given(matrix=jacobians(max_rows=8))
def test_is_at_least_as_good_as_the_peer(matrix: Tensor) -> None:
    """The peer runs Frank-Wolfe to a tolerance; the exact solver must never be worse."""
    matrix_gramian = gramian(matrix)
    ours = MGDAWeighting()(matrix_gramian)
    theirs = peer.MGDAWeighting()(matrix_gramian)
    tolerance = 1e-8 * float(matrix_gramian.trace())
    assert ours @ matrix_gramian @ ours <= theirs @ matrix_gramian @ theirs + tolerance


def test_zero_gramian_gives_uniform_weights() -> None:
    assert torch.allclose(MGDAWeighting()(torch.zeros(4, 4)), torch.full((4,), 0.25))


def test_bad_reg_eps() -> None:
    with pytest.raises(ValueError, match="reg_eps"):
        MGDA(reg_eps=-1.0)


def test_repr() -> None:
    assert repr(MGDA()) == "MGDA(reg_eps=1e-10)" and str(MGDA()) == "MGDA"
