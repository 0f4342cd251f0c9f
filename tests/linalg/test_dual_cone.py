"""The dual-cone projection against the KKT conditions of its quadratic program."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from jdoptim.linalg import prepare_dual_cone_gramian, project_to_dual_cone
from tests.aggregation._jacobians import gramian, jacobian_from_seed, jacobians


@st.composite
def problems(draw: st.DrawFn) -> tuple[Tensor, Tensor]:
    matrix = draw(jacobians(max_rows=7))
    rows = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    bounds = torch.randn(rows, matrix.shape[0], generator=generator, dtype=torch.float64)
    return gramian(matrix), bounds


@settings(max_examples=60, deadline=None)
@given(problem=problems(), reg_eps=st.sampled_from([0.0, 1e-4]))
def test_solutions_satisfy_the_kkt_conditions(
    problem: tuple[Tensor, Tensor], reg_eps: float
) -> None:
    """v minimises vᵀMv s.t. v ≥ u iff μ = Mv ≥ 0, v ≥ u and μᵢ (vᵢ − uᵢ) = 0."""
    matrix_gramian, bounds = problem
    solutions = project_to_dual_cone(matrix_gramian, bounds, reg_eps=reg_eps)
    matrix = prepare_dual_cone_gramian(matrix_gramian, reg_eps)
    scale = float(bounds.abs().max())
    # reg_eps = 0 on a singular Gramian goes through the jitter path: KKT of a 1e-8-close problem.
    tolerance = (1e-7 if reg_eps > 0 else 1e-6) * scale
    for solution, bound in zip(solutions, bounds, strict=True):
        multipliers = matrix @ solution
        assert (solution >= bound).all()
        assert (multipliers >= -tolerance).all()
        assert ((multipliers * (solution - bound)).abs() <= tolerance * scale).all()


def test_bounds_already_in_the_cone_are_returned_unchanged() -> None:
    matrix_gramian = gramian(jacobian_from_seed(0, 4, 5, 4).abs())  # all inner products ≥ 0
    bounds = torch.rand(3, 4, dtype=torch.float64)
    assert torch.equal(project_to_dual_cone(matrix_gramian, bounds), bounds)


def test_hand_computed() -> None:
    # G of g1 = (1, 0), g2 = (-1, 1); u = (1/2, 0) gives v = (1/2, 1/4): vᵀJ = (1/4, 1/4).
    matrix_gramian = torch.tensor([[1.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)
    solution = project_to_dual_cone(matrix_gramian, torch.tensor([[0.5, 0.0]]).double(), reg_eps=0)
    assert torch.allclose(solution, torch.tensor([[0.5, 0.25]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_keeps_dtype(dtype: torch.dtype) -> None:
    matrix_gramian = gramian(jacobian_from_seed(1, 4, 3, 3, dtype=dtype))
    solution = project_to_dual_cone(matrix_gramian, torch.eye(4, dtype=dtype))
    assert solution.dtype == dtype and solution.shape == (4, 4)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="reg_eps"):
        project_to_dual_cone(torch.eye(2), torch.eye(2), reg_eps=-1.0)
    with pytest.raises(ValueError, match="solver"):
        project_to_dual_cone(torch.eye(2), torch.eye(2), solver="cvxpy")  # type: ignore[arg-type]


def test_clearly_indefinite_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="not positive semi-definite"):
        project_to_dual_cone(torch.diag(torch.tensor([2.0, -1.0])), torch.tensor([[0.0, 1.0]]))
