from __future__ import annotations

import numpy as np
import pytest

from jdoptim.linalg._quadprog import inverse_cholesky_factor, solve_qp


def test_inverse_factor_whitens_a_positive_definite_matrix() -> None:
    rng = np.random.default_rng(0)
    root = rng.standard_normal((4, 6))
    matrix = root @ root.T
    factor = inverse_cholesky_factor(matrix)
    assert np.allclose(factor.T @ matrix @ factor, np.eye(4), atol=1e-10)
    assert np.allclose(np.triu(factor), factor)  # quadprog wants R⁻¹ upper triangular


@pytest.mark.parametrize(
    "matrix",
    [np.ones((3, 3)), np.diag([1.0, 1.0, -1e-14]), np.zeros((2, 2))],
    ids=["rank-one", "round-off-negative", "zero"],
)
def test_jitter_rescues_positive_semi_definite_matrices(matrix: np.ndarray) -> None:
    factor = inverse_cholesky_factor(matrix)
    assert np.isfinite(factor).all()
    # With the jitter added, R⁻ᵀ (M + jitter I) R⁻¹ = I: the factor is that of a nearby matrix.
    whitened = factor.T @ matrix @ factor
    assert np.all(np.linalg.eigvalsh(whitened) <= 1 + 1e-9)


def test_clearly_indefinite_matrix_is_an_error() -> None:
    with pytest.raises(ValueError, match="not positive semi-definite"):
        inverse_cholesky_factor(np.diag([1.0, -1.0]))


def test_solves_a_small_qp() -> None:
    # min ½‖x‖² s.t. x1 + x2 ≥ 2: x = (1, 1).
    factor = inverse_cholesky_factor(np.eye(2))
    solution = solve_qp(factor, np.zeros(2), np.array([[1.0], [1.0]]), np.array([2.0]))
    assert np.allclose(solution, [1.0, 1.0])


def test_equality_constraints_come_first() -> None:
    # min ½‖x‖² s.t. x1 + x2 = 1, x1 ≥ 0.8: x = (0.8, 0.2).
    constraints = np.array([[1.0, 1.0], [1.0, 0.0]])
    solution = solve_qp(
        inverse_cholesky_factor(np.eye(2)), np.zeros(2), constraints, np.array([1.0, 0.8]), 1
    )
    assert np.allclose(solution, [0.8, 0.2])


def test_infeasible_qp_is_a_clear_error() -> None:
    # x1 ≥ 1 and -x1 ≥ 0 cannot both hold.
    constraints = np.array([[1.0, -1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="quadprog could not solve"):
        solve_qp(inverse_cholesky_factor(np.eye(2)), np.zeros(2), constraints, np.array([1.0, 0.0]))
