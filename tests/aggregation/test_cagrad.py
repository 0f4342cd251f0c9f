"""CAGrad: the direction is in the ball around the mean and maximises the worst improvement."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from jdoptim.aggregation import CAGrad, CAGradWeighting
from tests.aggregation._jacobians import jacobian_from_seed

DTYPES = [torch.float32, torch.float64]
CS = [0.1, 0.5, 1.0, 4.0]


def dual_weights(weights: Tensor, rows: int) -> Tensor:
    """The ``w ∈ Δ`` of ``1/m + λ w``."""
    extra = weights - 1 / rows
    return extra / extra.sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_orthonormal_rows_by_hand(dtype: torch.dtype) -> None:
    # By symmetry g_w = g₀ = [½, ½], so d = g₀ + c g₀ = (1 + c) g₀.
    jacobian = torch.eye(2, dtype=dtype)
    torch.testing.assert_close(CAGrad(c=0.5)(jacobian), torch.tensor([0.75, 0.75], dtype=dtype))
    torch.testing.assert_close(CAGrad(c=0.0)(jacobian), torch.tensor([0.5, 0.5], dtype=dtype))


@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize(
    ("rows", "cols", "rank", "tolerance"),
    # Exact for a non-singular G; about √reg_eps (1e-5) when G is singular (rank < rows).
    [(3, 5, 3, 1e-10), (4, 7, 4, 1e-10), (8, 20, 8, 1e-10), (5, 3, 3, 1e-4), (8, 20, 6, 1e-4)],
)
def test_optimality_certificate(
    c: float, rows: int, cols: int, rank: int, tolerance: float
) -> None:
    """Feasible d and a dual point w ∈ Δ with equal values: d solves the primal.

    Weak duality: every d' in the ball has minᵢ gᵢᵀd' ≤ g_wᵀg₀ + c‖g₀‖‖g_w‖ for any w ∈ Δ.
    """
    jacobian = jacobian_from_seed(rows * cols + rank, rows, cols, rank=rank)
    weights = CAGrad(c).compute_weights(jacobian)
    direction = weights @ jacobian
    mean = jacobian.mean(dim=0)
    radius = c * mean.norm()
    assert (direction - mean).norm() <= radius * (1 + 1e-11)
    dual = dual_weights(weights, rows)
    assert (dual >= 0).all()
    combined = dual @ jacobian
    primal_value = (jacobian @ direction).min()
    dual_value = combined @ mean + radius * combined.norm()
    scale = jacobian.norm(dim=1).max() * mean.norm()
    assert abs(float(dual_value - primal_value)) <= tolerance * float(scale)


@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize(
    ("jacobian", "tolerance"),
    [
        (torch.tensor([[1.0, 0.2], [-0.6, 1.0]], dtype=torch.float64), 0.0),
        (torch.tensor([[1.0, 0.2], [-0.6, 1.0], [0.3, -0.4]], dtype=torch.float64), 1e-4),
        # The rows' hull contains 0 and the dual cone {d₁ = 0, d₂ ≥ 0} meets the ball: optimum 0.
        (torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), 1e-4),
    ],
    ids=["regular", "singular", "hull-holds-zero"],
)
def test_beats_every_point_of_the_ball_in_the_plane(
    c: float, jacobian: Tensor, tolerance: float
) -> None:
    """Brute force in R²: the worst improvement is maximal over a fine polar grid of the ball."""
    direction = CAGrad(c)(jacobian)
    mean = jacobian.mean(dim=0)
    radius = float(c * mean.norm())
    assert float((direction - mean).norm()) <= radius * (1 + 1e-11)
    angles = torch.linspace(0, 2 * math.pi, 20_001, dtype=torch.float64)
    circle = torch.stack([angles.cos(), angles.sin()], dim=1)
    radii = torch.linspace(0, radius, 101, dtype=torch.float64)
    candidates = mean + (radii[:, None, None] * circle[None]).reshape(-1, 2)
    best = float((candidates @ jacobian.T).min(dim=1).values.max())
    ours = float((jacobian @ direction).min())
    # Between grid points the objective moves by at most maxᵢ‖gᵢ‖ times the grid's spacing.
    spacing = radius * float(angles[1] - angles[0]) + float(radii[1] - radii[0])
    scale = float(jacobian.norm(dim=1).max() * mean.norm())
    assert ours >= best - tolerance * scale - 1e-12
    assert ours <= best + float(jacobian.norm(dim=1).max()) * spacing


def test_zero_mean_gives_the_mean() -> None:
    jacobian = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(CAGrad(c=1.0)(jacobian), torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float32_agrees_with_float64(dtype: torch.dtype) -> None:
    jacobian = jacobian_from_seed(4, 4, 9, rank=4)
    expected = CAGrad(c=0.5)(jacobian)
    result = CAGrad(c=0.5)(jacobian.to(dtype))
    assert result.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 1e-12
    assert (result.double() - expected).norm() <= tolerance * expected.norm()


def test_weights_are_scale_free_and_duplicated_rows_work() -> None:
    jacobian = jacobian_from_seed(6, 3, 5, rank=3)
    gramian = jacobian @ jacobian.T
    weighting = CAGradWeighting(c=0.4)
    torch.testing.assert_close(weighting(gramian * 1e15), weighting(gramian), rtol=1e-9, atol=0)
    duplicated = torch.cat([jacobian, jacobian[:1]])
    assert torch.isfinite(CAGrad(c=0.4)(duplicated)).all()


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="c must be"):
        CAGradWeighting(c=-1.0)
    with pytest.raises(ValueError, match="c must be"):
        CAGradWeighting(c=float("nan"))
    with pytest.raises(ValueError, match="norm_eps"):
        CAGradWeighting(c=0.5, norm_eps=-1.0)
    CAGradWeighting(c=0.5, norm_eps=0.0)  # unused, accepted as TorchJD accepts it
    with pytest.raises(ValueError, match="symmetric"):
        CAGradWeighting(c=0.5)(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        CAGradWeighting(c=0.5)(torch.ones(2, 3))
    assert repr(CAGrad(0.5)) == "CAGrad(c=0.5, norm_eps=0.0001, reg_eps=1e-10)"


def test_setting_c_on_the_aggregator_reaches_the_weighting_and_is_validated() -> None:
    matrix = jacobian_from_seed(0, 3, 5, rank=3)
    aggregator = CAGrad(c=0.1)
    aggregator.c = 5.0
    assert aggregator.weighting.c == 5.0 and aggregator.c == 5.0  # type: ignore[attr-defined]
    torch.testing.assert_close(aggregator(matrix), CAGrad(c=5.0)(matrix))
    with pytest.raises(ValueError, match="c must be non-negative"):
        aggregator.c = -1.0
    with pytest.raises(ValueError, match="c must be non-negative"):
        aggregator.weighting.c = -1.0  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="c must be a real number"):
        aggregator.c = "big"
    assert aggregator.c == 5.0


def test_jacobian_that_requires_grad_is_aggregated_without_a_graph() -> None:
    """The solver is not differentiable: the result does not require grad (no wrong graph)."""
    matrix = jacobian_from_seed(0, 3, 5, rank=3).requires_grad_()
    result = CAGrad(c=0.5)(matrix)
    assert not result.requires_grad
    torch.testing.assert_close(result, CAGrad(c=0.5)(matrix.detach()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [1.0, 2.0, 5.0])
def test_zero_in_the_hull_gives_no_conflict_for_c_at_least_one(
    c: float, dtype: torch.dtype
) -> None:
    """With 0 strictly inside the rows' hull and rank J = n, only d = 0 has J d ≥ 0, and the ball
    holds 0 when c ≥ 1: the optimum is d = 0, also when the float32 Gramian rounds to an
    indefinite matrix."""
    for seed in range(30):
        generator = torch.Generator().manual_seed(seed)
        base = torch.randn(3, 3, generator=generator, dtype=torch.float64)
        positive = torch.rand(3, generator=generator, dtype=torch.float64) + 0.1
        jacobian = torch.cat([base, -(positive @ base)[None]])
        direction = CAGrad(c)(jacobian.to(dtype)).double()
        scale = float(jacobian.norm(dim=1).max())
        # CAGrad is exact to about sqrt(reg_eps) of the radius on singular Gramians.
        assert float((jacobian @ direction).min()) >= -1e-4 * c * scale**2
        assert float(direction.norm()) <= 1e-4 * c * scale
