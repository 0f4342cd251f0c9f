from __future__ import annotations

import torch
import torchjd.aggregation as peer

from jdoptim.aggregation import Sum, SumWeighting
from tests.aggregation._jacobians import jacobian_from_seed


def test_hand_computed() -> None:
    matrix = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(Sum()(matrix), torch.tensor([4.0, 6.0]))
    assert torch.equal(SumWeighting()(torch.eye(3)), torch.ones(3))


def test_matches_the_weighted_form_and_the_peer() -> None:
    matrix = jacobian_from_seed(0, 5, 7, 5)
    assert torch.allclose(Sum()(matrix), Sum().compute_weights(matrix) @ matrix, atol=1e-12)
    assert torch.allclose(Sum()(matrix), peer.Sum()(matrix), atol=1e-12)


def test_repr() -> None:
    assert repr(Sum()) == "Sum()" and str(SumWeighting()) == "Sum"
