from __future__ import annotations

import itertools
import math

import pytest
import torch
import torchjd.aggregation as peer
from torch import Tensor

from jdoptim.aggregation import PCD, PCDWeighting
from tests.aggregation._jacobians import gramian_sequence, jacobian_from_seed
from tests.aggregation._stateful_checks import (
    assert_reset_restarts,
    assert_resumes_identically,
    assert_state_follows_dtype,
)


def test_hand_computed_two_objectives() -> None:
    # With β = 0 and ε = 0 the rows are normalised: g̃₀ = (1, 0), g̃₁ = (-1, 1)/√2. The constraint
    # g̃₁ᵀd ≥ 1/2 is active: d = g̃₀ + μ g̃₁ with μ = 1/2 + 1/√2, rescaled to ‖g₀‖ = 2.
    jacobian = torch.tensor([[2.0, 0.0], [-3.0, 3.0]], dtype=torch.float64)
    weights = PCDWeighting(tau=0.5, beta=0.0, eps=0.0)(jacobian @ jacobian.T)
    mu = 0.5 + 1 / math.sqrt(2)
    direction = torch.tensor([1 - mu / math.sqrt(2), mu / math.sqrt(2)], dtype=torch.float64)
    expected = 2 * direction / direction.norm()
    torch.testing.assert_close(weights @ jacobian, expected)


def test_unconstrained_when_the_primary_already_helps_enough() -> None:
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)  # cos = 1/√2 ≥ τ
    weights = PCDWeighting(tau=0.5, beta=0.0, eps=0.0)(jacobian @ jacobian.T)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(5))
def test_kkt_conditions(seed: int) -> None:
    """The normalised direction is feasible, and d̃ − g̃₀ is a non-negative combination of the
    active constraints' rows only (multipliers ≥ 0, complementary slackness)."""
    jacobian = jacobian_from_seed(seed, 4, 6, rank=4)
    taus = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    weights = PCDWeighting(tau=taus, beta=0.0, eps=0.0)(jacobian @ jacobian.T)
    norms = jacobian.norm(dim=1)
    normalized = jacobian / norms[:, None]
    coefficients = weights * norms / (weights[0] * norms[0])  # d̃ = Σ uₖ g̃ₖ with u₀ = 1
    direction = coefficients @ normalized
    slack = normalized[1:] @ direction - taus
    multipliers = coefficients[1:]
    assert bool((slack >= -1e-8).all())
    assert bool((multipliers >= -1e-8).all())
    torch.testing.assert_close(
        multipliers * slack, torch.zeros(3, dtype=torch.float64), atol=1e-8, rtol=0
    )
    torch.testing.assert_close((weights @ jacobian).norm(), norms[0])


def test_inconsistent_constraints_fall_back_to_the_primary_gradient() -> None:
    secondary = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    jacobian = torch.stack(
        [torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), secondary, -secondary]
    )
    weights = PCDWeighting(tau=0.1)(jacobian @ jacobian.T)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_zero_primary_gives_zero_weights() -> None:
    jacobian = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    assert torch.equal(PCDWeighting()(jacobian @ jacobian.T), torch.zeros(2, dtype=torch.float64))


def test_rescaling_a_secondary_objective_at_every_call_changes_nothing() -> None:
    """The moving average normalises each row, so τ is a scale-free fraction (up to ε)."""
    reference, scaled = PCDWeighting(tau=0.3, eps=0.0), PCDWeighting(tau=0.3, eps=0.0)
    factors = torch.tensor([1.0, 100.0, 1.0], dtype=torch.float64)
    for k in range(4):
        jacobian = jacobian_from_seed(k, 3, 5, rank=3)
        scaled_jacobian = jacobian * factors[:, None]
        expected = reference(jacobian @ jacobian.T) @ jacobian
        got = scaled(scaled_jacobian @ scaled_jacobian.T) @ scaled_jacobian
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "kwargs", [{}, {"tau": 0.3, "beta": 0.5}, {"tau": 0.9, "beta": 0.9, "eps": 1e-3}]
)
def test_matches_torchjd(dtype: torch.dtype, kwargs: dict[str, float]) -> None:
    ours, theirs = PCDWeighting(**kwargs), peer.PCDWeighting(**kwargs)
    for gramian in gramian_sequence(5, dtype, rows=4, cols=6):
        torch.testing.assert_close(ours(gramian), theirs(gramian), atol=1e-5, rtol=1e-5)


def test_aggregator_state_and_errors() -> None:
    jacobian = jacobian_from_seed(9, 3, 5, rank=3)
    torch.testing.assert_close(
        PCD(tau=0.2)(jacobian), PCDWeighting(tau=0.2)(jacobian @ jacobian.T) @ jacobian
    )
    matrices = gramian_sequence(5, cols=6)
    assert_resumes_identically(lambda: PCDWeighting(tau=0.3, beta=0.9), matrices, split=2)
    assert_reset_restarts(lambda: PCDWeighting(tau=0.3, beta=0.9), matrices)
    assert_state_follows_dtype(PCDWeighting, matrices)
    with pytest.raises(ValueError, match="tau must be in"):
        PCDWeighting(tau=1.5)
    with pytest.raises(ValueError, match="tau must be in"):
        PCDWeighting(tau=torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match="beta must be in"):
        PCDWeighting(beta=1.0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        PCDWeighting(eps=-1.0)
    with pytest.raises(ValueError, match="tau has 2 entries"):
        PCDWeighting(tau=torch.tensor([0.1, 0.2]))(torch.eye(4))
    weighting = PCDWeighting()
    weighting(torch.eye(3))
    with pytest.raises(ValueError, match="call reset"):
        weighting(torch.eye(2))


def enumerated_direction(normalized: Tensor, taus: Tensor) -> Tensor:
    """Ground truth by enumerating active sets: for each set S, d = g̃₀ + Σ_S μ g̃ with the S
    constraints tight; keep the feasible d (μ ≥ 0) closest to g̃₀."""
    primary, secondary = normalized[0], normalized[1:]
    bounds = taus * (secondary * secondary).sum(dim=1)
    best, best_distance = None, float("inf")
    for size in range(secondary.shape[0] + 1):
        for active in itertools.combinations(range(secondary.shape[0]), size):
            rows = secondary[list(active)]
            if size:
                system = rows @ rows.T
                rhs = (bounds[list(active)] - rows @ primary)[:, None]
                mu = torch.linalg.lstsq(system, rhs).solution[:, 0]
                if bool((mu < -1e-9).any()):
                    continue
                direction = primary + mu @ rows
            else:
                direction = primary
            if bool((secondary @ direction < bounds - 1e-9).any()):
                continue
            distance = float((direction - primary).norm())
            if distance < best_distance - 1e-12:
                best, best_distance = direction, distance
    assert best is not None
    return best


@pytest.mark.parametrize("rank", [2, 4])
def test_matches_active_set_enumeration(rank: int) -> None:
    jacobian = jacobian_from_seed(rank, 5, 6, rank=rank)
    jacobian = torch.cat([jacobian, jacobian[1:2]])  # duplicated secondary row
    taus = torch.tensor([0.05, 0.1, 0.3, 0.2, 0.1], dtype=torch.float64)
    weights = PCDWeighting(tau=taus, beta=0.0, eps=0.0)(jacobian @ jacobian.T)
    normalized = jacobian / jacobian.norm(dim=1, keepdim=True)
    expected = enumerated_direction(normalized, taus)
    expected = expected * jacobian[0].norm() / expected.norm()
    torch.testing.assert_close(weights @ jacobian, expected, atol=1e-7, rtol=1e-7)


def test_zero_secondary_rows_with_eps_zero_stay_finite() -> None:
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    weights = PCDWeighting(tau=0.5, beta=0.0, eps=0.0)(jacobian @ jacobian.T)
    assert torch.isfinite(weights).all()
    assert weights[1] == 0
    two_rows = jacobian[[0, 2]]
    expected = PCDWeighting(tau=0.5, beta=0.0, eps=0.0)(two_rows @ two_rows.T) @ two_rows
    torch.testing.assert_close(weights @ jacobian, expected)


def test_inconsistent_constraints_are_relaxed_together() -> None:
    """Secondaries g and -g cannot both gain: the guarantees are relaxed to g̃ⱼᵀd ≥ 0, so d is the
    primary gradient projected onto g's orthogonal complement, rescaled to its norm; earlier
    calls do not change that (no NaN)."""
    g = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    primary = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    jacobian = torch.stack([primary, g, -g])
    projected = primary - (primary @ g) / (g @ g) * g
    expected = projected * primary.norm() / projected.norm()
    torch.testing.assert_close(PCD()(jacobian), expected)
    warmed = PCD()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        warmed(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    direction = warmed(jacobian)
    assert torch.isfinite(direction).all()
    assert abs(float(g @ direction)) <= 1e-9 and float(primary @ direction) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_eps_zero_gives_scale_free_directions(dtype: torch.dtype, scale: float) -> None:
    matrix = jacobian_from_seed(4, 4, 6, rank=4)
    expected = PCD(tau=0.3, eps=0.0)(matrix)
    result = PCD(tau=0.3, eps=0.0)((matrix * scale).to(dtype)).double() / scale
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
