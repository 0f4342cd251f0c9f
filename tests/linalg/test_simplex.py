"""Simplex problems against brute force over the faces of the simplex."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from jdoptim.linalg import min_norm_on_simplex, project_onto_simplex
from tests.aggregation._jacobians import gramian, jacobians


def brute_force_projection(vector: Tensor) -> Tensor:
    """Euclidean projection onto Δ: the closest feasible projection onto the faces' planes."""
    size = vector.shape[0]
    best, best_distance = None, float("inf")
    for support_size in range(1, size + 1):
        for support in itertools.combinations(range(size), support_size):
            index = list(support)
            candidate = torch.zeros_like(vector)
            candidate[index] = vector[index] - (vector[index].sum() - 1) / support_size
            if (candidate >= -1e-12).all():
                distance = float((candidate - vector).norm())
                if distance < best_distance:
                    best, best_distance = candidate, distance
    assert best is not None
    return best


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-5, 5, allow_nan=False, allow_infinity=False), min_size=1, max_size=5)
)
def test_projection_matches_brute_force(values: list[float]) -> None:
    vector = torch.tensor(values, dtype=torch.float64)
    assert torch.allclose(project_onto_simplex(vector), brute_force_projection(vector), atol=1e-9)


def test_projection_is_batched_over_leading_dimensions() -> None:
    vectors = torch.randn(3, 2, 4, dtype=torch.float64)
    projected = project_onto_simplex(vectors)
    for index in itertools.product(range(3), range(2)):
        assert torch.allclose(projected[index], brute_force_projection(vectors[index]), atol=1e-9)
    assert torch.allclose(projected.sum(dim=-1), torch.ones(3, 2, dtype=torch.float64))


def test_points_of_the_simplex_are_fixed() -> None:
    point = torch.tensor([0.2, 0.0, 0.8])
    assert torch.allclose(project_onto_simplex(point), point)


@settings(max_examples=40, deadline=None)
@given(matrix=jacobians(max_rows=5))
def test_min_norm_is_no_worse_than_any_face_optimum(matrix: Tensor) -> None:
    """Brute force: the min of wᵀGw over each face's affine hull, where that optimum is feasible."""
    matrix_gramian = gramian(matrix)
    weights = min_norm_on_simplex(matrix_gramian)
    objective = float(weights @ matrix_gramian @ weights)
    rows = matrix.shape[0]
    for support_size in range(1, rows + 1):
        for support in itertools.combinations(range(rows), support_size):
            index = list(support)
            block = matrix_gramian[index][:, index]
            solution = torch.linalg.lstsq(
                torch.cat(
                    [
                        torch.cat([2 * block, torch.ones(support_size, 1).double()], 1),
                        torch.cat(
                            [torch.ones(1, support_size).double(), torch.zeros(1, 1).double()], 1
                        ),
                    ]
                ),
                torch.cat([torch.zeros(support_size), torch.ones(1)]).double(),
            ).solution[:support_size]
            if (solution >= 0).all() and torch.isclose(solution.sum(), torch.tensor(1.0).double()):
                candidate = float(solution @ block @ solution)
                assert objective <= candidate + 1e-7 * float(matrix_gramian.trace())


def test_min_norm_keeps_dtype_and_sums_to_one() -> None:
    weights = min_norm_on_simplex(torch.eye(3, dtype=torch.float32))
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, torch.full((3,), 1 / 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("magnitude", [1e5, 1e8, 1e17, 1e30])
def test_projection_of_huge_vectors_sums_to_one(dtype: torch.dtype, magnitude: float) -> None:
    """Far beyond 1/eps, the projection is still a point of the simplex (the nearest vertex or edge)."""
    vectors = torch.tensor([[1.0, 0.5, -1.0, 3e-30], [1.0, 1.0, -2.0, 0.25]]) * magnitude
    projected = project_onto_simplex(vectors.to(dtype))
    torch.testing.assert_close(projected.sum(dim=-1), torch.ones(2, dtype=dtype))
    expected = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(projected, expected)


def test_projection_of_an_empty_vector_is_empty() -> None:
    assert project_onto_simplex(torch.zeros(3, 0)).shape == (3, 0)
