from __future__ import annotations

import pytest
import torch

from jdoptim.linalg import (
    check_finite,
    check_generalized_gramian,
    check_gramian,
    check_matrix,
    check_square,
    check_tensor,
)


def test_valid_inputs_are_returned() -> None:
    matrix = torch.ones(2, 3)
    assert check_tensor(matrix, "x") is matrix
    assert check_matrix(matrix) is matrix
    gramian = torch.eye(2, dtype=torch.float64)
    assert check_square(gramian) is gramian and check_gramian(gramian) is gramian
    assert check_generalized_gramian(torch.ones(2, 3, 3, 2)).shape == (2, 3, 3, 2)
    check_finite(torch.ones(0), "empty")  # nothing to complain about


@pytest.mark.parametrize(
    ("check", "value", "error", "match"),
    [
        (check_tensor, [1.0], TypeError, "x must be a torch.Tensor, got list"),
        (check_tensor, torch.ones(2, dtype=torch.int32), TypeError, "floating-point"),
        (check_matrix, torch.ones(3), ValueError, "2-dimensional"),
        (check_matrix, torch.ones(0, 2), ValueError, "at least one row"),
        (check_matrix, torch.tensor([[float("-inf")]]), ValueError, "NaN or infinite"),
        (check_square, torch.ones(2, 3), ValueError, "square"),
        (check_gramian, torch.tensor([[1.0, 2.0], [0.0, 1.0]]), ValueError, "symmetric"),
        (check_generalized_gramian, torch.ones(2, 2, 2), ValueError, "even number"),
        (check_generalized_gramian, torch.ones(2, 3, 2, 3), ValueError, "reversed"),
        (check_generalized_gramian, torch.ones(0, 0), ValueError, "not be empty"),
    ],
)
def test_errors_name_the_problem(
    check: object, value: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        if check is check_tensor:
            check_tensor(value, "x")
        else:
            check(value)  # type: ignore[operator]


def test_symmetry_tolerance_is_relative() -> None:
    gramian = torch.tensor([[1.0, 1.0], [1.0 + 1e-9, 1.0]], dtype=torch.float64) * 1e30
    check_gramian(gramian)  # round-off level asymmetry at a huge scale is fine
    with pytest.raises(ValueError, match="symmetric"):
        check_gramian(torch.tensor([[1.0, 1.0], [1.001, 1.0]], dtype=torch.float64) * 1e-30)


@pytest.mark.parametrize(
    ("matrix", "match"),
    [
        ([[1.0, 0.0], [0.0, -1.0]], "negative diagonal"),
        ([[0.0, 1.0], [1.0, 0.0]], "Cauchy-Schwarz"),
        ([[1.0, 2.0], [2.0, 1.0]], "Cauchy-Schwarz"),
    ],
)
def test_matrices_that_cannot_be_gramians_are_rejected(
    matrix: list[list[float]], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        check_gramian(torch.tensor(matrix))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_gramians_with_rounding_pass(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    jacobian = torch.randn(3, 50, dtype=dtype)
    jacobian = torch.cat([jacobian, jacobian[:1] * (1 + 1e-7), -jacobian[1:2]])
    check_gramian(jacobian @ jacobian.T)
