from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import MGDAWeighting, MoCo
from jdoptim.linalg import project_onto_simplex
from tests.aggregation._jacobians import jacobian_from_seed, jacobian_sequence
from tests.aggregation._stateful_checks import (
    assert_reset_restarts,
    assert_resumes_identically,
    assert_state_follows_dtype,
)


def test_hand_computed_first_call() -> None:
    # Y = 0 - 0.5 (0 - J) = J / 2; Y Yᵀ λ = (1/4)(1/2, 2)... for J = diag(1, 2):
    # λ = Π_Δ((1/2, 1/2) - 0.1 (1/8, 1/2)) = Π_Δ((0.4875, 0.45)) = (0.51875, 0.48125).
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    direction = MoCo(beta=0.5, gamma=0.1)(jacobian)
    weights = torch.tensor([0.51875, 0.48125], dtype=torch.float64)
    torch.testing.assert_close(direction, weights @ (jacobian / 2))


def test_matches_the_algorithm_written_as_a_loop() -> None:
    jacobians = jacobian_sequence(5)
    moco = MoCo(beta=0.8, beta_sigma=0.3, gamma=0.05, gamma_sigma=0.7, rho=0.1)
    tracked = torch.zeros(3, 6, dtype=torch.float64)
    weights = torch.full((3,), 1 / 3, dtype=torch.float64)
    for k, jacobian in enumerate(jacobians, start=1):
        tracked = tracked - 0.8 / k**0.3 * (tracked - jacobian)
        step = 0.05 / k**0.7 * (tracked @ tracked.T @ weights + 0.1 * weights)
        weights = project_onto_simplex(weights - step)
        torch.testing.assert_close(moco(jacobian), weights @ tracked)


def test_fixed_jacobian_gives_the_mgda_direction() -> None:
    """With exact gradients, Y = J after one full tracking step and λ converges to MGDA's."""
    jacobian = jacobian_from_seed(2, 3, 6, rank=3)
    gramian = jacobian @ jacobian.T
    gamma = 0.5 / float(torch.linalg.eigvalsh(gramian)[-1])
    moco = MoCo(beta=1.0, beta_sigma=0.0, gamma=gamma, gamma_sigma=0.0)
    for _ in range(3000):
        direction = moco(jacobian)
    expected = MGDAWeighting()(gramian) @ jacobian
    torch.testing.assert_close(direction, expected, atol=1e-6, rtol=0)


def test_tracking_averages_out_noise() -> None:
    """Y is a running average of noisy Jacobians: closer to the mean Jacobian than one sample."""
    torch.manual_seed(0)
    mean = jacobian_from_seed(3, 2, 4, rank=2)
    moco = MoCo(beta=1.0, beta_sigma=1.0)  # βₖ = 1/k: Y is the exact running mean
    samples = [mean + torch.randn(2, 4, dtype=torch.float64) for _ in range(200)]
    for sample in samples:
        moco(sample)
    torch.testing.assert_close(moco._state["tracked"], torch.stack(samples).mean(dim=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dtype_and_state(dtype: torch.dtype) -> None:
    jacobians = jacobian_sequence(5, dtype)
    assert MoCo()(jacobians[0]).dtype == dtype
    assert_resumes_identically(MoCo, jacobians, split=2)
    assert_reset_restarts(MoCo, jacobians)
    assert_state_follows_dtype(MoCo, jacobian_sequence(5))


def test_bad_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match="beta must be in"):
        MoCo(beta=0.0)
    with pytest.raises(ValueError, match="gamma must be positive"):
        MoCo(gamma=0.0)
    with pytest.raises(ValueError, match="rho must be non-negative"):
        MoCo(rho=-1.0)
    moco = MoCo()
    with pytest.raises(ValueError, match="2-dimensional"):
        moco(torch.ones(3))
    moco(torch.ones(2, 3))
    with pytest.raises(ValueError, match="call reset"):
        moco(torch.ones(3, 3))
    with pytest.raises(ValueError, match="shape"):
        moco(torch.ones(2, 4))


def test_float32_jacobian_of_large_gradients_keeps_weights_on_the_simplex() -> None:
    """Gradients around 1e5 in float32: the step is a convex combination of the tracked rows."""
    jacobian = (jacobian_from_seed(0, 3, 4, rank=3) * 1e5).float()
    moco = MoCo()
    direction = moco(jacobian)
    weights = moco._state["weights"]
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    assert float(direction.norm()) <= float(jacobian.norm(dim=1).max())


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_float32_jacobians_of_extreme_scale_give_finite_directions(scale: float) -> None:
    matrix = jacobian_from_seed(1, 3, 5, rank=3)
    moco = MoCo()
    result = moco((matrix * scale).float())
    assert torch.isfinite(result).all()
    weights = moco._state["weights"]
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    # The first tracked rows are J / 2: the direction is a convex combination of them.
    torch.testing.assert_close(result, weights @ (matrix * scale).float() / 2)
