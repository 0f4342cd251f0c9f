from __future__ import annotations

import math

import pytest
import torch
import torchjd.aggregation as peer

from jdoptim.aggregation import GradVac, GradVacWeighting
from tests.aggregation._jacobians import gramian_sequence, jacobian_from_seed
from tests.aggregation._stateful_checks import (
    assert_reset_restarts,
    assert_resumes_identically,
    assert_state_follows_dtype,
)


def test_hand_computed_two_tasks() -> None:
    # g₁ = (1, 0), g₂ = (-1, 1): cos = -1/√2 < 0 = target. g₁' = g₁ + ½ g₂ and g₂' = g₂ + g₁ are
    # each orthogonal to the other original row; the direction g₁' + g₂' has weights (2, 3/2).
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    weighting = GradVacWeighting(beta=0.5, eps=0.0)
    weights = weighting(jacobian @ jacobian.T)
    torch.testing.assert_close(weights, torch.tensor([2.0, 1.5], dtype=torch.float64))
    target = -0.5 / math.sqrt(2)  # (1 - β) · 0 + β · cos
    expected_targets = torch.tensor([[0.0, target], [target, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(weighting._state["targets"], expected_targets)


def test_correction_reaches_the_target_cosine() -> None:
    """Eq. 5: a corrected row has exactly the target cosine with the row it was corrected by."""
    jacobian = torch.tensor([[1.0, 0.2, 0.0], [-1.0, 1.0, 0.5]], dtype=torch.float64)
    gramian = jacobian @ jacobian.T
    weighting = GradVacWeighting(beta=0.5, eps=0.0)
    weighting(gramian)  # targets become β cos < 0
    targets = weighting._state["targets"].clone()
    # Make row 2 more conflicting so that both rows are corrected again, toward the old targets.
    harder = torch.tensor([[1.0, 0.2, 0.0], [-1.0, 0.3, 0.5]], dtype=torch.float64)
    weights = weighting(harder @ harder.T)
    # Recover the corrected rows: g₁' = g₁ + c₁ g₂ and g₂' = g₂ + c₂ g₁ with w = (1 + c₂, 1 + c₁).
    first = harder[0] + (weights[1] - 1) * harder[1]
    second = harder[1] + (weights[0] - 1) * harder[0]
    cosine = torch.nn.functional.cosine_similarity
    torch.testing.assert_close(cosine(first, harder[1], dim=0), targets[0, 1])
    torch.testing.assert_close(cosine(second, harder[0], dim=0), targets[1, 0])


def test_no_conflict_above_the_targets_gives_the_sum() -> None:
    jacobian = jacobian_from_seed(3, 4, 6, rank=4).abs()  # pairwise non-negative cosines
    weights = GradVacWeighting()(jacobian @ jacobian.T)
    torch.testing.assert_close(weights, torch.ones(4, dtype=torch.float64))


def test_aggregator_combines_the_rows_with_the_weights() -> None:
    jacobian = jacobian_from_seed(4, 3, 6, rank=3)
    torch.manual_seed(0)
    weights = GradVacWeighting()(jacobian @ jacobian.T)
    torch.manual_seed(0)
    torch.testing.assert_close(GradVac()(jacobian), weights @ jacobian)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rows", [2, 3, 5])
def test_matches_torchjd(dtype: torch.dtype, rows: int) -> None:
    ours, theirs = GradVacWeighting(beta=0.7), peer.GradVacWeighting(beta=0.7)
    for k, gramian in enumerate(gramian_sequence(5, dtype, rows=rows)):
        torch.manual_seed(k)
        mine = ours(gramian)
        torch.manual_seed(k)
        torch.testing.assert_close(mine, theirs(gramian))


def test_state_round_trip_reset_and_dtype() -> None:
    matrices = gramian_sequence(6)
    assert_resumes_identically(GradVacWeighting, matrices, split=3)
    assert_reset_restarts(GradVacWeighting, matrices)
    assert_state_follows_dtype(GradVacWeighting, matrices)
    assert_resumes_identically(GradVac, [jacobian_from_seed(k, 3, 5, 3) for k in range(4)], 2)


def test_bad_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match="beta must be in"):
        GradVacWeighting(beta=1.5)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        GradVacWeighting(eps=-1.0)
    weighting = GradVacWeighting()
    with pytest.raises(ValueError, match="symmetric"):
        weighting(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    weighting(torch.eye(3))
    with pytest.raises(ValueError, match="call reset"):
        weighting(torch.eye(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_eps_zero_gives_scale_free_directions(dtype: torch.dtype, scale: float) -> None:
    matrix = jacobian_from_seed(4, 4, 6, rank=4)
    torch.manual_seed(0)
    expected = GradVac(eps=0.0)(matrix)
    torch.manual_seed(0)
    result = GradVac(eps=0.0)((matrix * scale).to(dtype)).double() / scale
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
