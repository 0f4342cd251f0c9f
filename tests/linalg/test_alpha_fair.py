"""solve_alpha_fair: the positive solution of G w = w^(-1/α), checked against the equation."""

from __future__ import annotations

import pytest
import torch

from jdoptim.linalg import solve_alpha_fair
from tests.aggregation._jacobians import jacobian_from_seed

ALPHAS = [0.2, 0.5, 1.0, 2.0, 8.0]


@pytest.mark.parametrize("alpha", ALPHAS)
def test_diagonal_gramian_has_the_closed_form(alpha: float) -> None:
    diagonal = torch.tensor([4.0, 0.25, 9.0], dtype=torch.float64)
    weights, residual = solve_alpha_fair(torch.diag(diagonal), alpha)
    # Gᵢᵢ wᵢ = wᵢ^(-1/α)  ⇔  wᵢ = Gᵢᵢ^(-α/(α+1))
    torch.testing.assert_close(weights, diagonal.pow(-alpha / (alpha + 1)), rtol=1e-12, atol=0)
    assert residual < 1e-12


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("rows", "cols"), [(3, 5), (6, 40), (5, 3)])
def test_solution_satisfies_the_equation(alpha: float, rows: int, cols: int) -> None:
    jacobian = jacobian_from_seed(rows * cols, rows, cols, rank=min(rows, cols))
    gramian = jacobian @ jacobian.T + 1e-6 * torch.eye(rows, dtype=torch.float64)
    weights, residual = solve_alpha_fair(gramian, alpha)
    assert (weights > 0).all()
    lhs, rhs = gramian @ weights, weights.pow(-1 / alpha)
    scale = gramian.abs() @ weights + rhs
    assert ((lhs - rhs).abs() / scale).max() < 1e-9
    assert residual == pytest.approx(float(((lhs - rhs).abs() / scale).max()), abs=1e-12)


def test_warm_start_reaches_the_same_solution() -> None:
    jacobian = jacobian_from_seed(1, 4, 6, rank=4)
    gramian = jacobian @ jacobian.T
    cold, _ = solve_alpha_fair(gramian, 1.0)
    warm, residual = solve_alpha_fair(gramian, 1.0, initial=torch.full((4,), 50.0))
    torch.testing.assert_close(warm, cold, rtol=1e-9, atol=0)
    assert residual < 1e-10


def test_stopping_early_reports_a_large_residual() -> None:
    gramian = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    _, residual = solve_alpha_fair(gramian, 1.0, initial=torch.tensor([100.0, 1e-3]), max_iters=1)
    assert residual > 1e-3
