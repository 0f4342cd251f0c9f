from __future__ import annotations

import torch

from jdoptim.aggregation import Random, RandomWeighting


def test_weights_are_a_softmax_of_a_gaussian_draw() -> None:
    torch.manual_seed(4)
    expected = torch.softmax(torch.randn(5, dtype=torch.float64), dim=0)
    torch.manual_seed(4)
    weights = RandomWeighting()(torch.eye(5, dtype=torch.float64))
    assert torch.allclose(weights, expected)
    assert (weights > 0).all() and torch.isclose(weights.sum(), torch.tensor(1.0).double())


def test_draws_change_between_calls_and_repeat_with_the_seed() -> None:
    weighting = RandomWeighting()
    torch.manual_seed(0)
    first, second = weighting(torch.eye(4)), weighting(torch.eye(4))
    torch.manual_seed(0)
    assert not torch.equal(first, second)
    assert torch.equal(weighting(torch.eye(4)), first)


def test_aggregation_is_the_weighted_rows() -> None:
    matrix = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    torch.manual_seed(1)
    weights = torch.softmax(torch.randn(3), dim=0)
    torch.manual_seed(1)
    assert torch.allclose(Random()(matrix), weights @ matrix)


def test_repr() -> None:
    assert repr(Random()) == "Random()" and str(RandomWeighting()) == "Random"
