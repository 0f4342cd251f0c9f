"""Behaviour every core Gramian weighting shares."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from jdoptim.aggregation import (
    ConstantWeighting,
    DualProjWeighting,
    IMTLGWeighting,
    KrumWeighting,
    MeanWeighting,
    MGDAWeighting,
    PCGradWeighting,
    RandomWeighting,
    SumWeighting,
    UPGradWeighting,
    Weighting,
)
from tests.aggregation._jacobians import gramian, jacobian_from_seed, jacobians

WEIGHTINGS: list[Weighting] = [
    MeanWeighting(),
    SumWeighting(),
    ConstantWeighting(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])),
    RandomWeighting(),
    UPGradWeighting(),
    DualProjWeighting(),
    MGDAWeighting(),
    PCGradWeighting(),
    IMTLGWeighting(),
    KrumWeighting(n_byzantine=1),
]
IDS = [str(weighting) for weighting in WEIGHTINGS]
weightings = pytest.mark.parametrize("weighting", WEIGHTINGS, ids=IDS)
#: deterministic weightings that treat the objectives symmetrically
SYMMETRIC = [MeanWeighting(), SumWeighting(), UPGradWeighting(), DualProjWeighting()]
SYMMETRIC += [MGDAWeighting(), IMTLGWeighting()]


def sample_gramian(dtype: torch.dtype = torch.float64) -> Tensor:
    return gramian(jacobian_from_seed(1, 5, 8, 4, dtype=dtype))


@weightings
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_weights_keep_dtype_and_device(weighting: Weighting, dtype: torch.dtype) -> None:
    weights = weighting(sample_gramian(dtype))
    assert weights.shape == (5,) and weights.dtype == dtype and weights.device.type == "cpu"


@weightings
@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.ones(5), ValueError, "2-dimensional"),
        (torch.ones(5, 4), ValueError, "square"),
        (torch.ones(0, 0), ValueError, "at least one row"),
        (torch.triu(torch.ones(5, 5)), ValueError, "symmetric"),
        (torch.full((5, 5), float("nan")), ValueError, "NaN or infinite"),
        (torch.full((5, 5), float("inf")), ValueError, "NaN or infinite"),
        (torch.eye(5, dtype=torch.int64), TypeError, "floating-point"),
    ],
    ids=["1d", "non-square", "empty", "non-symmetric", "nan", "inf", "int"],
)
def test_bad_gramians_are_rejected(
    weighting: Weighting, bad: Tensor, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        weighting(bad)


@weightings
def test_declared_attributes(weighting: Weighting) -> None:
    values_free = (MeanWeighting, SumWeighting, ConstantWeighting, RandomWeighting)
    assert weighting.requires_values == (not isinstance(weighting, values_free))
    assert weighting.input_kind == "gramian"
    assert weighting.scale_invariant


@pytest.mark.parametrize("weighting", [*SYMMETRIC, KrumWeighting(1), PCGradWeighting()], ids=str)
@settings(max_examples=15, deadline=None)
@given(matrix=jacobians(min_rows=4), log_scale=st.sampled_from([-40, -3, 5, 40]))
def test_scale_invariant_weights(weighting: Weighting, matrix: Tensor, log_scale: int) -> None:
    matrix_gramian = gramian(matrix)
    torch.manual_seed(0)  # the same orders for PCGrad
    expected = weighting(matrix_gramian)
    torch.manual_seed(0)
    scaled = weighting(matrix_gramian * 10.0**log_scale)
    assert torch.allclose(scaled, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("weighting", SYMMETRIC, ids=str)
def test_duplicated_rows_get_equal_weights(weighting: Weighting) -> None:
    base = jacobian_from_seed(2, 4, 6, 4)
    matrix = torch.cat([base, base[:1]])  # rows 0 and 4 are equal
    weights = weighting(gramian(matrix))
    assert torch.allclose(weights[0], weights[4], atol=1e-6)


@weightings
def test_float32_gramians_of_huge_and_tiny_entries(weighting: Weighting) -> None:
    base = sample_gramian()
    for scale in (1e30, 1e-30):
        weights = weighting((base * scale).float())
        assert torch.isfinite(weights).all()


@pytest.mark.parametrize(
    ("weighting", "expected"),
    [
        (UPGradWeighting(), [0.25] * 4),
        (DualProjWeighting(), [0.25] * 4),
        (MGDAWeighting(), [0.25] * 4),
        (PCGradWeighting(), [1.0] * 4),
        (IMTLGWeighting(), [0.0] * 4),
        (KrumWeighting(1, n_selected=2), [0.5, 0.5, 0.0, 0.0]),
    ],
    ids=str,
)
def test_weights_of_a_zero_gramian(weighting: Weighting, expected: list[float]) -> None:
    weights = weighting(torch.zeros(4, 4, dtype=torch.float64))
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float64))
