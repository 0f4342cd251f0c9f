"""FairGrad: the α-fairness condition G w = w^(-1/α), its utility, and the peer's values."""

from __future__ import annotations

import math

import pytest
import torch
import torchjd.aggregation as peer

from jdoptim.aggregation import FairGrad, FairGradWeighting
from tests.aggregation._jacobians import jacobian_from_seed

DTYPES = [torch.float32, torch.float64]
ALPHAS = [0.5, 1.0, 2.0, 5.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_orthogonal_rows_by_hand(dtype: torch.dtype) -> None:
    # G = diag(9, 16): Gᵢᵢ wᵢ = wᵢ^(-1/α) gives wᵢ = Gᵢᵢ^(-α/(α+1)); α = 2: exponent -2/3.
    jacobian = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=dtype)
    expected = torch.tensor([9.0 ** (-2 / 3), 16.0 ** (-2 / 3)], dtype=dtype)
    torch.testing.assert_close(FairGrad(alpha=2.0).compute_weights(jacobian), expected)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols"), [(3, 5), (5, 12), (4, 3)])
def test_alpha_fairness_condition(alpha: float, dtype: torch.dtype, rows: int, cols: int) -> None:
    jacobian = jacobian_from_seed(rows * cols, rows, cols, rank=min(rows, cols), dtype=dtype)
    gramian = jacobian @ jacobian.T
    weights = FairGradWeighting(alpha)(gramian)
    assert weights.dtype == dtype and (weights > 0).all()
    # The system solved has the documented ridge, 1e-10 of the mean diagonal.
    matrix, w = gramian.double(), weights.double()
    matrix = matrix + 1e-10 * matrix.diagonal().mean() * torch.eye(rows)
    error = (matrix @ w - w.pow(-1 / alpha)).abs()
    scale = matrix.abs() @ w + w.pow(-1 / alpha)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-9
    assert (error <= tolerance * scale).all()


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_the_direction_maximises_the_alpha_fair_utility(alpha: float) -> None:
    """d = Jᵀw maximises Σ (gᵢᵀd)^(1-α)/(1-α) over directions of its norm (sampled in the plane)."""
    jacobian = torch.tensor([[1.0, 0.3], [-0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)
    direction = FairGrad(alpha)(jacobian)

    def utility(improvements: torch.Tensor) -> torch.Tensor:
        return improvements.pow(1 - alpha).sum(dim=-1) / (1 - alpha)

    angles = torch.linspace(0, 2 * math.pi, 100_001, dtype=torch.float64)
    candidates = direction.norm() * torch.stack([angles.cos(), angles.sin()], dim=1)
    improvements = candidates @ jacobian.T
    feasible = (improvements > 0).all(dim=1)
    assert (
        float(utility(jacobian @ direction)) >= float(utility(improvements[feasible]).max()) - 1e-12
    )


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("rows", "cols"), [(3, 5), (6, 20)])
def test_matches_the_peer(alpha: float, rows: int, cols: int) -> None:
    """The peer solves the same system with scipy's least squares (to about 1e-8)."""
    jacobian = jacobian_from_seed(rows + cols, rows, cols, rank=rows)
    ours = FairGrad(alpha)(jacobian)
    theirs = peer.FairGrad(alpha)(jacobian)
    assert (ours - theirs).norm() <= 1e-7 * theirs.norm()


def test_scaling_law_and_zero_jacobian() -> None:
    """Scaling J by s scales the weights by s^(-2α/(α+1))."""
    jacobian = jacobian_from_seed(3, 3, 5, rank=3)
    alpha, s = 2.0, 10.0
    weights = FairGrad(alpha).compute_weights(jacobian)
    scaled = FairGrad(alpha).compute_weights(s * jacobian)
    torch.testing.assert_close(scaled, weights * s ** (-2 * alpha / (alpha + 1)), rtol=1e-9, atol=0)
    assert torch.equal(FairGrad(1.0)(torch.zeros(3, 4)), torch.zeros(4))


def test_too_few_iterations_warn() -> None:
    jacobian = jacobian_from_seed(3, 4, 6, rank=4)
    with pytest.warns(RuntimeWarning, match="backward error"):
        FairGrad(alpha=3.0, max_iters=1)(jacobian)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="alpha"):
        FairGradWeighting(alpha=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        FairGradWeighting(alpha=float("inf"))
    with pytest.raises(ValueError, match="max_iters"):
        FairGradWeighting(alpha=1.0, max_iters=0)
    with pytest.raises(ValueError, match="symmetric"):
        FairGradWeighting(alpha=1.0)(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    assert repr(FairGrad(2.0)) == "FairGrad(alpha=2.0, max_iters=None, reg_eps=1e-10)"


def test_alpha_zero_is_the_mean() -> None:
    """The linear utility (the paper's α = 0, which TorchJD accepts): uniform weights."""
    jacobian = jacobian_from_seed(5, 4, 6, rank=4)
    torch.testing.assert_close(FairGrad(alpha=0.0)(jacobian), jacobian.mean(dim=0))
