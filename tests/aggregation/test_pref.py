from __future__ import annotations

import pytest
import torch

from jdoptim._named import tensor_repr
from jdoptim.aggregation._pref import check_pref_vector, pref_weights


def test_none_is_uniform() -> None:
    like = torch.zeros(4, 4, dtype=torch.float64)
    assert torch.equal(pref_weights(None, like), torch.full((4,), 0.25, dtype=torch.float64))


def test_given_vector_follows_the_input_dtype() -> None:
    pref = check_pref_vector(torch.tensor([1.0, 3.0]))
    weights = pref_weights(pref, torch.zeros(2, 2, dtype=torch.float64))
    assert weights.dtype == torch.float64 and weights.tolist() == [1.0, 3.0]


def test_wrong_length() -> None:
    with pytest.raises(ValueError, match="2 entries but there are 3 objectives"):
        pref_weights(torch.ones(2), torch.zeros(3, 3))


@pytest.mark.parametrize(
    ("pref", "error", "match"),
    [
        (torch.ones(2, 2), ValueError, "1-D"),
        (torch.ones(0), ValueError, "non-empty"),
        (torch.tensor([1.0, -1.0]), ValueError, "non-negative"),
        (torch.zeros(3), ValueError, "at least one positive"),
        (torch.tensor([1.0, float("inf")]), ValueError, "NaN or infinite"),
        (torch.tensor([1, 2]), TypeError, "floating-point"),
    ],
    ids=["2d", "empty", "negative", "zero", "inf", "int"],
)
def test_bad_pref_vectors(pref: torch.Tensor, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_pref_vector(pref)


def test_repr_rebuilds_the_tensor_exactly() -> None:
    """Rounded to 3 digits, 1 and 1.00001 printed alike, and the int-looking entries made an int64
    tensor when evaluated."""
    assert tensor_repr(None) == "None"
    assert tensor_repr(torch.tensor([0.25, 2.0])) == "tensor([0.25, 2.0])"
    for value in (
        torch.tensor([1.0, 1.00001, 1e-8, 1 / 3]),
        torch.tensor([1 / 3, 2.0], dtype=torch.float64),
        torch.tensor([[1.0, 2.5], [0.1, 3.0]]),
    ):
        rebuilt = eval(tensor_repr(value), {"tensor": torch.tensor, "torch": torch})
        assert rebuilt.dtype == value.dtype and torch.equal(rebuilt, value)
