from __future__ import annotations

import math

import pytest
import torch
import torchjd.aggregation as peer

from jdoptim.aggregation import ExcessMTL, ExcessMTLWeighting
from tests.aggregation._jacobians import jacobian_sequence
from tests.aggregation._stateful_checks import (
    assert_reset_restarts,
    assert_resumes_identically,
    assert_state_follows_dtype,
)


def test_hand_computed_two_calls() -> None:
    # Call 1: S = (1, 4), e = (1/1, 4/2) = (1, 2) is the baseline; weights stay uniform.
    # Call 2: S = (2, 4), e = (1/√2, 0), ratios (1/√2, 0): w ∝ (exp(η/√2), 1).
    weighting = ExcessMTLWeighting(robust_step_size=0.5)
    first = weighting(torch.tensor([[1.0], [2.0]], dtype=torch.float64))
    torch.testing.assert_close(first, torch.tensor([0.5, 0.5], dtype=torch.float64))
    second = weighting(torch.tensor([[1.0], [0.0]], dtype=torch.float64))
    factor = math.exp(0.5 / math.sqrt(2))
    expected = torch.tensor([factor, 1.0], dtype=torch.float64) / (factor + 1)
    torch.testing.assert_close(second, expected)


def test_warmup_keeps_uniform_weights_and_averages_the_baseline() -> None:
    weighting = ExcessMTLWeighting(robust_step_size=1.0, n_warmup_steps=2)
    uniform = torch.full((2,), 0.5, dtype=torch.float64)
    # risks: call 1 (1, 1); call 2 with S = (2, 5): (1/√2, 4/√5). Baseline: their means.
    torch.testing.assert_close(
        weighting(torch.tensor([[1.0], [1.0]], dtype=torch.float64)), uniform
    )
    torch.testing.assert_close(
        weighting(torch.tensor([[1.0], [2.0]], dtype=torch.float64)), uniform
    )
    baseline = torch.tensor([(1 + 1 / math.sqrt(2)) / 2, (1 + 4 / math.sqrt(5)) / 2])
    third = weighting(torch.tensor([[1.0], [1.0]], dtype=torch.float64))
    risks = torch.tensor([1 / math.sqrt(3), 1 / math.sqrt(6)])
    expected = torch.softmax(risks / baseline, dim=0).double()
    torch.testing.assert_close(third, expected)


def test_the_task_with_the_larger_relative_excess_risk_gains_weight() -> None:
    weighting = ExcessMTLWeighting()
    weighting(torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64))
    weights = weighting(torch.tensor([[3.0, 3.0], [0.1, 0.1]], dtype=torch.float64))
    assert weights[0] > 0.5 > weights[1]


def test_weights_ignore_the_scale_of_the_jacobian() -> None:
    reference, scaled = ExcessMTLWeighting(), ExcessMTLWeighting()
    for jacobian in jacobian_sequence(4):
        torch.testing.assert_close(scaled(jacobian * 1e3), reference(jacobian))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n_warmup_steps", [1, 3])
def test_matches_torchjd_after_a_warmup(dtype: torch.dtype, n_warmup_steps: int) -> None:
    """With a warmup both definitions agree (they differ only on the first call without one)."""
    ours = ExcessMTLWeighting(0.7, n_warmup_steps)
    theirs = peer.ExcessMTLWeighting(0.7, n_warmup_steps)
    for jacobian in jacobian_sequence(6, dtype):
        torch.testing.assert_close(ours(jacobian), theirs(jacobian))


def test_aggregator_and_state() -> None:
    jacobians = jacobian_sequence(5)
    weighting = ExcessMTLWeighting()
    aggregator = ExcessMTL()
    for jacobian in jacobians:
        torch.testing.assert_close(aggregator(jacobian), weighting(jacobian) @ jacobian)
    assert_resumes_identically(lambda: ExcessMTLWeighting(0.5, 1), jacobians, split=2)
    assert_reset_restarts(lambda: ExcessMTLWeighting(0.5, 1), jacobians)
    assert_state_follows_dtype(ExcessMTLWeighting, jacobians)


def test_bad_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match="robust_step_size must be positive"):
        ExcessMTLWeighting(robust_step_size=0.0)
    with pytest.raises(ValueError, match="n_warmup_steps must be non-negative"):
        ExcessMTLWeighting(n_warmup_steps=-1)
    with pytest.raises(TypeError, match="n_warmup_steps must be an int"):
        ExcessMTLWeighting(n_warmup_steps=1.5)  # type: ignore[arg-type]
    weighting = ExcessMTLWeighting()
    with pytest.raises(ValueError, match="NaN"):
        weighting(torch.tensor([[float("nan")]]))
    weighting(torch.ones(2, 3))
    with pytest.raises(ValueError, match="call reset"):
        weighting(torch.ones(3, 3))
    with pytest.raises(ValueError, match="shape"):
        weighting(torch.ones(2, 4))


def test_zero_baseline_and_huge_ratios_stay_finite() -> None:
    weighting = ExcessMTLWeighting(robust_step_size=50.0)
    weighting(torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64))  # task 0: no baseline
    for _ in range(3):
        weights = weighting(torch.tensor([[1e3, 1e3], [1e-3, 1e-3]], dtype=torch.float64))
        assert torch.isfinite(weights).all()
    # Task 0 has ratio 0 and task 1 a small positive one: task 1 gains weight.
    assert weights[1] > weights[0]
    assert weights.sum() == pytest.approx(1.0)
    float32 = ExcessMTLWeighting(robust_step_size=1e3)
    float32(torch.ones(2, 2))
    assert torch.isfinite(float32(torch.tensor([[1e4, 1e4], [1.0, 1.0]]))).all()
