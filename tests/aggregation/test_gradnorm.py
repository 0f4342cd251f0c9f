from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDSGD
from jdoptim._step_info import StepInfo
from jdoptim.aggregation import GradNorm, GradNormWeighting
from jdoptim.aggregation.gradnorm import gradnorm_loss_gradient
from tests.aggregation._jacobians import gramian_sequence, jacobian_from_seed
from tests.aggregation._stateful_checks import (
    assert_reset_restarts,
    assert_resumes_identically,
    assert_state_follows_dtype,
)


def with_losses(weighting: GradNormWeighting, *losses: list[float]) -> GradNormWeighting:
    for values in losses:
        weighting.observe_losses(torch.tensor(values, dtype=torch.float64))
    return weighting


def test_hand_computed_first_two_calls() -> None:
    # G = diag(1, 4): ‖g‖ = (1, 2); w = (1, 1): weighted norms (1, 2), Ḡ = 1.5, r = 1, so
    # ∇L_grad = (sign(1 - 1.5)·1, sign(2 - 1.5)·2) = (-1, 2) and w ← (1.1, 0.8) · 2 / 1.9.
    gramian = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    weighting = GradNormWeighting(alpha=1.5, lr=0.1)
    torch.testing.assert_close(weighting(gramian), torch.ones(2, dtype=torch.float64))
    expected = torch.tensor([1.1, 0.8], dtype=torch.float64) * 2 / 1.9
    torch.testing.assert_close(weighting(gramian), expected)


def test_loss_ratios_set_the_targets() -> None:
    # L(0) = (1, 1), L(t) = (1, 0.25): L̃ = (1, 0.25), r = (1.6, 0.4). With α = 1, w = (1, 1) and
    # ‖g‖ = (1, 1): weighted norms (1, 1), targets (1.6, 0.4): w ← (1 + lr, 1 - lr).
    weighting = with_losses(GradNormWeighting(alpha=1.0, lr=0.1), [1.0, 1.0], [1.0, 0.25])
    assert weighting.ratios is not None
    torch.testing.assert_close(weighting.ratios, torch.tensor([1.6, 0.4], dtype=torch.float64))
    gramian = torch.eye(2, dtype=torch.float64)
    weighting(gramian)
    torch.testing.assert_close(weighting(gramian), torch.tensor([1.1, 0.9], dtype=torch.float64))


def test_gradient_matches_autograd() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        weights = torch.rand(4, generator=generator, dtype=torch.float64) + 0.5
        norms = torch.rand(4, generator=generator, dtype=torch.float64) + 0.1
        ratios = torch.rand(4, generator=generator, dtype=torch.float64) + 0.5
        alpha = 1.3
        leaf = weights.clone().requires_grad_()
        weighted = leaf * norms
        targets = weighted.mean().detach() * ratios**alpha  # the paper's constant targets
        (weighted - targets).abs().sum().backward()
        assert leaf.grad is not None
        torch.testing.assert_close(gradnorm_loss_gradient(weights, norms, ratios, alpha), leaf.grad)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_weighted_norms_approach_the_paper_targets(alpha: float) -> None:
    """On a fixed Gramian and fixed loss ratios, wᵢ‖gᵢ‖ → Ḡ·rᵢ^α (up to O(lr) oscillation)."""
    norms = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
    correlations = torch.tensor([[1.0, 0.3, -0.2], [0.3, 1.0, 0.5], [-0.2, 0.5, 1.0]])
    gramian = norms[:, None] * correlations.double() * norms
    weighting = with_losses(
        GradNormWeighting(alpha=alpha, lr=2e-3), [1.0, 1.0, 1.0], [0.5, 1.0, 0.8]
    )
    for _ in range(2000):
        weights = weighting(gramian)
    assert weighting.ratios is not None
    weighted = weights * norms
    targets = weighted.mean() * weighting.ratios**alpha
    torch.testing.assert_close(weighted, targets, rtol=0.02, atol=0)
    assert float(weights.sum()) == pytest.approx(3.0)


def test_weights_sum_to_the_number_of_tasks_and_stay_non_negative() -> None:
    weighting = GradNormWeighting(lr=10.0)  # huge steps: clipping at 0 must keep w ≥ 0
    for gramian in gramian_sequence(6):
        weights = weighting(gramian)
        assert bool((weights >= 0).all())
        assert float(weights.sum()) == pytest.approx(3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dtype_and_state(dtype: torch.dtype) -> None:
    inputs = gramian_sequence(5, dtype)

    def make() -> GradNormWeighting:
        return with_losses(GradNormWeighting(lr=0.1), [2.0, 1.0, 3.0], [1.0, 0.9, 2.5])

    assert make()(inputs[0]).dtype == dtype
    assert_resumes_identically(make, inputs, split=2)
    jacobians = [jacobian_from_seed(k, 3, 5, rank=3, dtype=dtype) for k in range(4)]
    assert_resumes_identically(lambda: GradNorm(lr=0.1), jacobians, split=2)
    assert_reset_restarts(GradNormWeighting, inputs)
    assert_state_follows_dtype(make, gramian_sequence(5))


def test_checkpoint_keeps_the_observed_losses() -> None:
    weighting = with_losses(GradNormWeighting(), [2.0, 1.0, 3.0], [1.0, 0.9, 2.5])
    fresh = GradNormWeighting()
    fresh.load_state_dict(weighting.state_dict())
    assert weighting.ratios is not None and fresh.ratios is not None
    assert torch.equal(fresh.ratios, weighting.ratios)


def test_aggregator_combines_the_jacobian_rows() -> None:
    jacobian = jacobian_from_seed(4, 3, 5, rank=3)
    aggregator = GradNorm(lr=0.05)
    aggregator.observe_losses(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    aggregator(jacobian)
    weights = aggregator.weighting._state["weights"]
    torch.testing.assert_close(aggregator(jacobian), weights @ jacobian)
    aggregator.reset()
    assert not aggregator.weighting._state


def test_after_step_is_driven_by_the_optimizer() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2, dtype=torch.float64)
    inputs = torch.randn(8, 3, dtype=torch.float64)
    targets = torch.randn(8, 2, dtype=torch.float64)
    weighting = GradNormWeighting(lr=0.01)
    optimizer = JDSGD(model.parameters(), lr=0.05, weighting=weighting)
    seen: list[Tensor] = []

    def closure() -> Tensor:
        optimizer.zero_grad()
        losses = ((model(inputs) - targets) ** 2).mean(dim=0)
        seen.append(losses.detach())
        return losses

    for _ in range(3):
        optimizer.step(closure)
    assert torch.equal(weighting._state["initial_losses"], seen[0])
    assert torch.equal(weighting._state["latest_losses"], seen[-1])
    assert "weights" in weighting._state


def test_step_info_losses_are_observed() -> None:
    weighting = GradNormWeighting()
    info = StepInfo(torch.tensor([1.0, 4.0]), lr=0.1, step=1, evaluate=lambda: torch.zeros(2))
    weighting.after_step(info)
    weighting.after_step(info)
    assert weighting.ratios is not None
    torch.testing.assert_close(weighting.ratios, torch.ones(2))


def test_bad_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match="alpha must be"):
        GradNormWeighting(alpha=-1.0)
    with pytest.raises(ValueError, match="lr must be"):
        GradNormWeighting(lr=0.0)
    weighting = GradNormWeighting()
    with pytest.raises(ValueError, match="must all be positive"):
        weighting.observe_losses(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="1-D"):
        weighting.observe_losses(torch.ones(2, 2))
    weighting.observe_losses(torch.ones(2))
    with pytest.raises(ValueError, match="call reset"):
        weighting.observe_losses(torch.ones(3))
    with pytest.raises(ValueError, match="call reset"):
        weighting(torch.eye(3))
    with pytest.raises(ValueError):
        weighting(torch.ones(2, 3))


def test_optimizer_checkpoint_resumes_bit_identically() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(8, 3, dtype=torch.float64)
    targets = torch.randn(8, 2, dtype=torch.float64)
    initial = nn.Linear(3, 2, dtype=torch.float64).state_dict()

    def make() -> tuple[nn.Linear, JDSGD]:
        model = nn.Linear(3, 2, dtype=torch.float64)
        model.load_state_dict(initial)
        return model, JDSGD(model.parameters(), lr=0.05, weighting=GradNormWeighting(lr=0.05))

    def train(model: nn.Linear, optimizer: JDSGD, steps: int) -> None:
        def closure() -> Tensor:
            optimizer.zero_grad()
            return ((model(inputs) - targets) ** 2).mean(dim=0)

        for _ in range(steps):
            optimizer.step(closure)

    reference, reference_optimizer = make()
    train(reference, reference_optimizer, 6)
    first, first_optimizer = make()
    train(first, first_optimizer, 3)
    resumed, resumed_optimizer = make()
    resumed.load_state_dict(first.state_dict())
    resumed_optimizer.load_state_dict(first_optimizer.state_dict())
    train(resumed, resumed_optimizer, 3)
    for got, want in zip(resumed.parameters(), reference.parameters(), strict=True):
        assert torch.equal(got, want)
