from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDSGD
from jdoptim.aggregation import DualBalancing
from tests.aggregation._jacobians import jacobian_sequence
from tests.aggregation._stateful_checks import (
    assert_reset_restarts,
    assert_resumes_identically,
    assert_state_follows_dtype,
)


def test_hand_computed_first_call() -> None:
    # Ĝ = (1 - 0.5) J = [[1.5, 0], [0, 0.5]]: norms (1.5, 0.5), scales (1, 3): d = (1.5, 1.5).
    jacobian = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    direction = DualBalancing(beta=0.5)(jacobian)
    torch.testing.assert_close(direction, torch.tensor([1.5, 1.5], dtype=torch.float64))


def test_matches_the_algorithm_written_as_a_loop() -> None:
    jacobians = jacobian_sequence(5)
    method = DualBalancing(beta=0.8, beta_sigma=0.4)
    average = torch.zeros(3, 6, dtype=torch.float64)
    for k, jacobian in enumerate(jacobians, start=1):
        beta = 0.8 / k**0.4
        average = beta * average + (1 - beta) * jacobian
        norms = [float(row.norm()) for row in average]
        expected = sum(max(norms) / norm * row for norm, row in zip(norms, average, strict=True))
        torch.testing.assert_close(method(jacobian), expected)


def test_every_rescaled_average_has_the_largest_norm() -> None:
    """The paper's property: each task's term of the sum has norm maxⱼ ‖ĝⱼ‖."""
    method = DualBalancing(beta=0.7)
    for jacobian in jacobian_sequence(4):
        direction = method(jacobian)
    average = method._state["average"]
    norms = average.norm(dim=1)
    terms = (norms.max() / norms)[:, None] * average
    torch.testing.assert_close(terms.norm(dim=1), norms.max().expand(3))
    torch.testing.assert_close(terms.sum(dim=0), direction)


def test_rows_of_norm_zero_add_nothing() -> None:
    jacobian = torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(
        DualBalancing(beta=0.0)(jacobian), torch.tensor([0.0, 2.0], dtype=torch.float64)
    )
    assert torch.equal(DualBalancing()(torch.zeros(2, 3)), torch.zeros(3))


def test_log_losses_through_the_optimizer() -> None:
    """The whole DB-MTL: the closure returns log-losses, DualBalancing balances their gradients."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, dtype=torch.float64)
    inputs = torch.randn(8, 3, dtype=torch.float64)
    targets = torch.randn(8, 2, dtype=torch.float64) * torch.tensor([1.0, 100.0])
    aggregator = DualBalancing()
    optimizer = JDSGD(model.parameters(), lr=0.01, aggregator=aggregator)

    def losses() -> Tensor:
        return ((model(inputs) - targets) ** 2).mean(dim=0)

    def closure() -> Tensor:
        optimizer.zero_grad()
        return (losses() + 1e-8).log()

    first = losses().detach()
    for _ in range(20):
        optimizer.step(closure)
    assert aggregator._state["calls"] == 20
    assert bool((losses() < first).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dtype_and_state(dtype: torch.dtype) -> None:
    jacobians = jacobian_sequence(5, dtype)
    assert DualBalancing()(jacobians[0]).dtype == dtype
    assert_resumes_identically(DualBalancing, jacobians, split=2)
    assert_reset_restarts(DualBalancing, jacobians)
    assert_state_follows_dtype(DualBalancing, jacobian_sequence(5))


def test_bad_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match="beta must be in"):
        DualBalancing(beta=1.0)
    with pytest.raises(ValueError, match="beta_sigma must be"):
        DualBalancing(beta_sigma=-1.0)
    method = DualBalancing()
    method(torch.ones(2, 3))
    with pytest.raises(ValueError, match="call reset"):
        method(torch.ones(3, 3))
    with pytest.raises(ValueError, match="call reset"):
        method(torch.ones(2, 4))
    with pytest.raises(ValueError):
        method(torch.ones(3))


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_float32_jacobians_of_extreme_scale_give_finite_directions(scale: float) -> None:
    matrix = jacobian_sequence(1)[0]
    expected = DualBalancing()(matrix) * scale
    result = DualBalancing()((matrix * scale).float())
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=0.0)
