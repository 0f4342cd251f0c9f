from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as peer

from jdoptim.aggregation import Constant, ConstantWeighting
from tests.aggregation._jacobians import jacobian_from_seed


def test_hand_computed() -> None:
    matrix = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(Constant(torch.tensor([1.0, 2.0]))(matrix), torch.tensor([7.0, 10.0]))


def test_matches_the_peer() -> None:
    matrix = jacobian_from_seed(0, 4, 6, 4)
    weights = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    assert torch.allclose(Constant(weights)(matrix), peer.Constant(weights)(matrix), atol=1e-12)


def test_weights_are_copied() -> None:
    weights = torch.tensor([1.0, 2.0])
    weighting = ConstantWeighting(weights)
    weights[0] = 5.0
    assert weighting(torch.eye(2)).tolist() == [1.0, 2.0]


def test_wrong_number_of_objectives() -> None:
    with pytest.raises(ValueError, match="holds 2 weights but there are 3 objectives"):
        Constant(torch.tensor([1.0, 2.0]))(torch.ones(3, 4))


@pytest.mark.parametrize(
    ("weights", "error", "match"),
    [
        (torch.ones(2, 2), ValueError, "1-D"),
        (torch.ones(0), ValueError, "non-empty"),
        (torch.tensor([1.0, float("nan")]), ValueError, "NaN"),
        (torch.tensor([1, 2]), TypeError, "floating-point"),
        ([1.0, 2.0], TypeError, "torch.Tensor"),
    ],
    ids=["2d", "empty", "nan", "int", "list"],
)
def test_bad_weights(weights: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ConstantWeighting(weights)  # type: ignore[arg-type]


def test_repr() -> None:
    constant = Constant(torch.tensor([1.0, 0.5]))
    assert repr(constant) == "Constant(weights=tensor([1.0, 0.5]))"
    assert str(constant) == "Constant"
