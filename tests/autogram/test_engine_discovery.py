"""Discovery mode (``Engine(batch_dim=..., parameters=...)`` and ``capture``), used by the optimizers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jdoptim.autogram import Engine
from tests.autogram._reference import loop_gramian, relative_error, routes


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.proj = nn.Parameter(torch.randn(3, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) @ self.proj  # proj is used in Model.forward, a generic call


def test_discovery_covers_owning_modules_and_functional_uses() -> None:
    torch.manual_seed(0)
    model = Model().double()
    params = list(model.parameters())
    engine = Engine(batch_dim=0, parameters=params)
    x = torch.randn(4, 5, dtype=torch.float64)
    for _ in range(2):  # the second step reuses what the first discovered
        with engine.capture():
            output = model(x).pow(2).sum(dim=1) + model.scale * x.sum(dim=1)
        gramian = engine.compute_gramian(output)
        assert relative_error(gramian, loop_gramian(output, params)) <= 1e-10
        weights = torch.randn(4, dtype=torch.float64)
        model.zero_grad(set_to_none=True)
        engine.backward(weights)
        fused = [p.grad.clone() for p in params if p.grad is not None]
        model.zero_grad(set_to_none=True)
        output.backward(weights)
        expected = [p.grad for p in params if p.grad is not None]
        assert len(fused) == len(expected) == len(params)
        for actual, wanted in zip(fused, expected, strict=True):
            assert torch.allclose(actual, wanted, rtol=1e-10, atol=1e-12)
    assert routes(engine, model) == {
        "scale": "exact",
        "proj": "local",
        "body.0.weight": "closed_form",
        "body.0.bias": "closed_form",
        "body.2.weight": "closed_form",
        "body.2.bias": "closed_form",
    }


def test_discovery_covers_only_the_given_parameters() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    chosen = list(model[2].parameters())
    engine = Engine(batch_dim=0, parameters=chosen)
    x = torch.randn(3, 5, dtype=torch.float64)
    with engine.capture():
        output = model(x).sum(dim=1)
    gramian = engine.compute_gramian(output)
    assert relative_error(gramian, loop_gramian(output, chosen)) <= 1e-10


def test_outside_capture_the_hooks_are_gone() -> None:
    model = nn.Linear(3, 2)
    engine = Engine(batch_dim=0, parameters=model.parameters())
    with engine.capture():
        model(torch.randn(2, 3))
    assert not nn.modules.module._global_forward_hooks
