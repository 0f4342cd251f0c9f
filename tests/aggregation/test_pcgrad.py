"""PCGrad against the paper's algorithm run on the gradients themselves."""

from __future__ import annotations

import itertools

import torch
import torchjd.aggregation as peer
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from jdoptim.aggregation import PCGrad, PCGradWeighting
from jdoptim.aggregation.pcgrad import _orders_of_others
from tests.aggregation._jacobians import gramian, jacobian_from_seed, jacobians


def surgery(matrix: Tensor, orders: list[list[int]]) -> Tensor:
    """Algorithm 1 of Yu et al. (2020) on the rows, with the given order of the others per row."""
    total = torch.zeros_like(matrix[0])
    for i, order in enumerate(orders):
        projected = matrix[i].clone()
        for j in order:
            inner = projected @ matrix[j]
            if inner < 0:
                projected = projected - inner / (matrix[j] @ matrix[j]) * matrix[j]
        total += projected
    return total


def test_hand_computed() -> None:
    # g1 = (1, 0), g2 = (-1, 1): g1 -> g1 + g2/2 = (1/2, 1/2), g2 -> g2 + g1 = (0, 1).
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    assert torch.equal(PCGradWeighting()(gramian(matrix)), torch.tensor([2.0, 1.5]))
    assert torch.equal(PCGrad()(matrix), torch.tensor([0.5, 1.5]))


@settings(max_examples=40, deadline=None)
@given(matrix=jacobians(max_rows=6), seed=st.integers(0, 1000))
def test_matches_the_algorithm_with_the_same_orders(matrix: Tensor, seed: int) -> None:
    torch.manual_seed(seed)
    orders = _orders_of_others(matrix.shape[0]).tolist()
    torch.manual_seed(seed)
    result = PCGrad()(matrix)
    expected = surgery(matrix, orders)
    assert torch.allclose(result, expected, atol=1e-9 * float(matrix.abs().max()))


def test_orders_are_random_permutations_of_the_other_rows() -> None:
    torch.manual_seed(0)
    seen = set()
    for _ in range(200):
        orders = _orders_of_others(3)
        for i, order in enumerate(orders.tolist()):
            assert sorted(order) == [j for j in range(3) if j != i]
        seen.add(tuple(map(tuple, orders.tolist())))
    assert len(seen) == 8  # every combination of orders of 3 rows appears


def test_only_possible_outcomes_of_the_peer() -> None:
    """With 3 rows the orders take 8 values; the peer's result must be one of ours."""
    matrix = jacobian_from_seed(11, 3, 4, 3)
    outcomes = [
        surgery(matrix, [list(a), list(b), list(c)])
        for a, b, c in itertools.product(
            itertools.permutations([1, 2]),
            itertools.permutations([0, 2]),
            itertools.permutations([0, 1]),
        )
    ]
    for seed in range(10):
        torch.manual_seed(seed)
        theirs = peer.PCGrad()(matrix)
        assert any(torch.allclose(theirs, outcome, atol=1e-9) for outcome in outcomes)


@settings(max_examples=20, deadline=None)
@given(matrix=jacobians(max_rows=2, min_rows=2))
def test_matches_the_peer_on_two_rows(matrix: Tensor) -> None:
    assert torch.allclose(PCGrad()(matrix), peer.PCGrad()(matrix), atol=1e-9)


def test_sums_non_conflicting_rows() -> None:
    matrix = jacobian_from_seed(2, 5, 6, 3).abs()
    assert torch.allclose(PCGrad()(matrix), matrix.sum(dim=0))


def test_zero_rows_are_left_alone() -> None:
    matrix = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
    assert torch.equal(PCGradWeighting()(gramian(matrix))[1], torch.tensor(1.0))
    assert torch.allclose(PCGrad()(matrix), torch.tensor([0.5, 1.5]))


def test_repr() -> None:
    assert repr(PCGrad()) == "PCGrad()" and str(PCGradWeighting()) == "PCGrad"
