"""Each reference training loop (hand-written, TorchJD style), rewritten with a jdoptim optimizer, gives the same parameters."""

from __future__ import annotations

import io

import torch
from torch import Tensor, nn
from torch.optim import SGD

from jdoptim import JDSGD
from jdoptim import backward as aggregated_backward
from jdoptim.aggregation import SDMGradWeighting, TrimmedMean, UPGrad, UPGradWeighting
from jdoptim.autojac import backward, jac, jac_to_grad
from tests.optim._models import assert_same_params, clone_model


def _reference_model() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1)).double()


def test_iwrm_loop_with_ssjd() -> None:
    torch.manual_seed(0)
    X = torch.randn(4, 16, 10, dtype=torch.float64)
    Y = torch.randn(4, 16, 1, dtype=torch.float64)
    model = _reference_model()
    reference = clone_model(model)
    loss_fn = nn.MSELoss(reduction="none")

    seed_optimizer = SGD(reference.parameters(), lr=0.1)
    for x, y in zip(X, Y, strict=True):
        losses = loss_fn(reference(x), y)
        seed_optimizer.zero_grad()
        aggregated_backward(losses, UPGrad())
        seed_optimizer.step()

    optimizer = JDSGD(model.parameters(), lr=0.1, aggregator=UPGrad(), batch_dim=0)
    for x, y in zip(X, Y, strict=True):
        optimizer.zero_grad()
        optimizer.step(lambda x=x, y=y: loss_fn(model(x), y))
    assert_same_params(model, reference, atol=1e-10)


def test_sdmgrad_loop_with_three_batches_per_step() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(9, 16, 5, dtype=torch.float64)
    targets = torch.randn(9, 16, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    reference = clone_model(model)
    criterion = nn.MSELoss(reduction="none")

    seed_optimizer = SGD(reference.parameters())
    weighting = SDMGradWeighting(lambda_=0.3)
    params = list(reference.parameters())
    for i in range(len(inputs) // 3):
        input_1, input_2, input_3 = inputs[3 * i], inputs[3 * i + 1], inputs[3 * i + 2]
        target_1, target_2, target_3 = targets[3 * i], targets[3 * i + 1], targets[3 * i + 2]
        losses_1 = criterion(reference(input_1).squeeze(dim=1), target_1)
        J_1 = torch.cat([j.flatten(1) for j in jac(losses_1, params)], dim=1)
        losses_2 = criterion(reference(input_2).squeeze(dim=1), target_2)
        J_2 = torch.cat([j.flatten(1) for j in jac(losses_2, params)], dim=1)
        weights = weighting(J_1 @ J_2.T)
        losses_3 = criterion(reference(input_3).squeeze(dim=1), target_3)
        losses_3.backward(weights)
        seed_optimizer.step()
        seed_optimizer.zero_grad()

    optimizer = JDSGD(model.parameters(), weighting=SDMGradWeighting(lambda_=0.3))
    batches = iter(zip(inputs, targets, strict=True))

    def closure() -> Tensor:
        optimizer.zero_grad()
        x, y = next(batches)
        return criterion(model(x).squeeze(dim=1), y)

    for _ in range(len(inputs) // 3):
        optimizer.step(closure)
    assert_same_params(model, reference, atol=1e-12)


def test_sdmgrad_state_resumes_through_the_optimizer() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(12, 8, 5, dtype=torch.float64)
    targets = torch.randn(12, 8, dtype=torch.float64)
    criterion = nn.MSELoss(reduction="none")
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    start = clone_model(model)

    def train(net: nn.Module, optimizer: JDSGD, steps: range) -> None:
        batches = iter(zip(inputs[3 * steps.start :], targets[3 * steps.start :], strict=True))

        def closure() -> Tensor:
            optimizer.zero_grad()
            x, y = next(batches)
            return criterion(net(x).squeeze(-1), y)

        for _ in steps:
            optimizer.step(closure)

    def make(net: nn.Module) -> JDSGD:
        return JDSGD(net.parameters(), lr=0.05, momentum=0.9, weighting=SDMGradWeighting())

    train(model, make(model), range(4))
    first = make(start)
    train(start, first, range(2))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make(start)
    resumed.load_state_dict(torch.load(buffer))
    train(start, resumed, range(2, 4))
    assert_same_params(model, start)


def test_full_jacobian_aggregator_equals_autojac_loop() -> None:
    torch.manual_seed(3)
    x = torch.randn(9, 10, dtype=torch.float64)
    y = torch.randn(9, 1, dtype=torch.float64)
    model = _reference_model()
    reference = clone_model(model)
    loss_fn = nn.MSELoss(reduction="none")
    JDSGD(model.parameters(), lr=0.1, aggregator=TrimmedMean(2)).step(
        lambda: loss_fn(model(x), y).squeeze(-1)
    )
    backward(loss_fn(reference(x), y).squeeze(-1))
    jac_to_grad(reference.parameters(), TrimmedMean(2))
    SGD(reference.parameters(), lr=0.1).step()
    assert_same_params(model, reference, atol=1e-12)


def test_parameters_used_outside_module_forwards_are_covered() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
    reference_model, reference_scale = clone_model(model), nn.Parameter(scale.detach().clone())
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, dtype=torch.float64)

    def losses_of(net: nn.Module, s: Tensor) -> Tensor:
        return (s * net(x).squeeze(-1) - y) ** 2 + 0.1 * s**2

    JDSGD([*model.parameters(), scale], lr=0.1, weighting=UPGradWeighting(), batch_dim=0).step(
        lambda: losses_of(model, scale)
    )
    params = [*reference_model.parameters(), reference_scale]
    backward(losses_of(reference_model, reference_scale), inputs=params)
    jac_to_grad(params, UPGrad())
    SGD(params, lr=0.1).step()
    assert_same_params(model, reference_model, atol=1e-10)
    torch.testing.assert_close(scale, reference_scale, atol=1e-10, rtol=0)
