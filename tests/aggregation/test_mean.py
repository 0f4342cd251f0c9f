from __future__ import annotations

import torch
import torchjd.aggregation as peer

from jdoptim.aggregation import Mean, MeanWeighting
from tests.aggregation._jacobians import jacobian_from_seed


def test_hand_computed() -> None:
    matrix = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(Mean()(matrix), torch.tensor([2.0, 3.0]))
    assert torch.equal(MeanWeighting()(torch.eye(4)), torch.full((4,), 0.25))


def test_matches_the_weighted_form_and_the_peer() -> None:
    matrix = jacobian_from_seed(0, 5, 7, 5)
    weights = Mean().compute_weights(matrix)
    assert torch.allclose(Mean()(matrix), weights @ matrix, atol=1e-12)
    assert torch.allclose(Mean()(matrix), peer.Mean()(matrix), atol=1e-12)


def test_repr() -> None:
    assert repr(Mean()) == "Mean()" and repr(MeanWeighting()) == "MeanWeighting()"
