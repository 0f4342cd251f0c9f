"""Behaviour every core Gramian weighting shares."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from jdoptim import Stateful
from jdoptim.aggregation import (
    DualProjWeighting,
    IMTLGWeighting,
    KrumWeighting,
    MGDAWeighting,
    PCGradWeighting,
    UPGradWeighting,
    Weighting,
)
from tests.aggregation._jacobians import gramian, jacobian_from_seed, jacobians
from tests.aggregation._methods import METHODS

#: Every exported weighting of Gramians, from the traits table (built for 5 objectives).
GRAMIAN_METHODS = [m for m in METHODS if not m.is_aggregator and m.input_kind == "gramian"]
IDS = [m.name for m in GRAMIAN_METHODS]
WEIGHTINGS: list[Weighting] = [m.make(5) for m in GRAMIAN_METHODS]  # type: ignore[misc]
weightings = pytest.mark.parametrize("weighting", WEIGHTINGS, ids=IDS)
#: deterministic, stateless weightings that treat the objectives symmetrically
SYMMETRIC_METHODS = [
    m
    for m in GRAMIAN_METHODS
    if m.traits.permutation_invariant and m.traits.deterministic and not m.traits.stateful
]
SYMMETRIC: list[Weighting] = [m.make(5) for m in SYMMETRIC_METHODS]  # type: ignore[misc]
SYMMETRIC_IDS = [m.name for m in SYMMETRIC_METHODS]
#: stateless weightings whose class declares scale invariance
SCALE_INVARIANT = [w for w in WEIGHTINGS if w.scale_invariant and not isinstance(w, Stateful)]


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
    if not weighting.requires_values and match in ("square", "symmetric"):
        # Weights of m alone (Mean, Sum...) take any [m, k] matrix, as TorchJD's: J itself too.
        assert weighting(bad).shape == (bad.shape[0],)
        return
    with pytest.raises(error, match=match):
        weighting(bad)


@weightings
def test_declared_attributes(weighting: Weighting) -> None:
    """Weightings that declare ``requires_values = False`` ignore the Gramian's values."""
    assert weighting.input_kind == "gramian"
    if not weighting.requires_values:
        torch.manual_seed(0)
        first = weighting(sample_gramian())
        torch.manual_seed(0)
        assert torch.equal(weighting(torch.eye(5, dtype=torch.float64)), first)


@pytest.mark.parametrize("weighting", SCALE_INVARIANT, ids=str)
@settings(max_examples=8, deadline=None)
@given(matrix=jacobians(min_rows=5, max_rows=5), log_scale=st.sampled_from([-40, -3, 5, 40]))
def test_scale_invariant_weights(weighting: Weighting, matrix: Tensor, log_scale: int) -> None:
    matrix_gramian = gramian(matrix)
    torch.manual_seed(0)  # the same orders for PCGrad
    expected = weighting(matrix_gramian)
    torch.manual_seed(0)
    scaled = weighting(matrix_gramian * 10.0**log_scale)
    if torch.allclose(scaled, expected, atol=1e-6, rtol=1e-6):
        return
    # On a singular Gramian the weights are not unique, the direction wᵀJ is: compare directions.
    difference = (scaled - expected) @ matrix
    assert float(difference.norm()) <= 1e-6 * max(1.0, float((expected @ matrix).norm()))


@pytest.mark.parametrize("weighting", SYMMETRIC, ids=SYMMETRIC_IDS)
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
