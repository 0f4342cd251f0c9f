from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as peer

from jdoptim.aggregation import MGDAWeighting, MoDoWeighting
from tests.aggregation._jacobians import jacobian_from_seed
from tests.aggregation._stateful_checks import (
    assert_reset_restarts,
    assert_resumes_identically,
    assert_state_follows_dtype,
)
from tests.aggregation.test_sdmgrad import cross_gramians


def test_hand_computed_step() -> None:
    # λ = (1/2, 1/2), A λ + ρ λ = (0.55, 1.55); λ - 0.1 (...) = (0.445, 0.345); projected: +0.105.
    matrix = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    weights = MoDoWeighting(gamma=0.1, rho=0.1)(matrix)
    torch.testing.assert_close(weights, torch.tensor([0.55, 0.45], dtype=torch.float64))


def test_uses_the_cross_gramian_as_given() -> None:
    """The step uses A λ = J₁ (J₂ᵀ λ): (1.5, 0.5) here, where Aᵀ λ would be (0.5, 1.5)."""
    matrix = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    weights = MoDoWeighting(gamma=0.1, rho=0.0)(matrix)
    torch.testing.assert_close(weights, torch.tensor([0.45, 0.55], dtype=torch.float64))


def test_repeated_calls_converge_to_mgda_weights() -> None:
    """MoDo is projected gradient descent on ½‖Jᵀλ‖²: on a fixed Gramian it reaches MGDA's λ."""
    jacobian = jacobian_from_seed(5, 3, 6, rank=3)
    gramian = jacobian @ jacobian.T
    weighting = MoDoWeighting(gamma=0.5 / float(torch.linalg.eigvalsh(gramian)[-1]), rho=0.0)
    for _ in range(3000):
        weights = weighting(gramian)
    torch.testing.assert_close(weights, MGDAWeighting()(gramian), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kwargs", [{}, {"gamma": 2.0, "rho": 1.0}], ids=["default", "custom"])
def test_matches_torchjd(dtype: torch.dtype, kwargs: dict[str, float]) -> None:
    ours, theirs = MoDoWeighting(**kwargs), peer.MoDoWeighting(**kwargs)
    for matrix in cross_gramians(5, rows=4, dtype=dtype):
        torch.testing.assert_close(ours(matrix), theirs(matrix))


def test_state_round_trip_reset_and_dtype() -> None:
    matrices = cross_gramians(6)
    assert_resumes_identically(MoDoWeighting, matrices, split=2)
    assert_reset_restarts(MoDoWeighting, matrices)
    assert_state_follows_dtype(MoDoWeighting, matrices)


def test_bad_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match="gamma must be positive"):
        MoDoWeighting(gamma=0.0)
    with pytest.raises(ValueError, match="rho must be non-negative"):
        MoDoWeighting(rho=-1.0)
    weighting = MoDoWeighting()
    with pytest.raises(ValueError, match="square"):
        weighting(torch.ones(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        weighting(torch.full((2, 2), float("inf")))
    weighting(torch.eye(2))
    with pytest.raises(ValueError, match="call reset"):
        weighting(torch.eye(3))


def test_float32_cross_gramian_of_large_gradients_keeps_weights_on_the_simplex() -> None:
    """Gradients around 1e5 (entries ~1e10, beyond 1/eps of float32): weights still sum to 1."""
    matrix = (torch.tensor([[4.0, -1.0, 0.5], [-1.0, 2.0, 0.0], [0.5, 0.0, 3.0]]) * 1e10).float()
    weights = MoDoWeighting()(matrix)
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
