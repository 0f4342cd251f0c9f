"""0-dim parameters (CLIP's ``logit_scale``, ReZero's gate) on every path of the optimizer.

The reference is the same model with that parameter of shape ``(1,)``, which every path has long
taken (and which the paths' own tests check against hand-written Jacobians): the two must give the
same ``.grad``, to round-off.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from jdoptim.optim import JDSGD
from tests.optim.test_backward_then_step import PATHS, Options, _fresh


class _Gain(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.full(shape, 1.5, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


def _model(shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), _Gain(shape), nn.Tanh(), nn.Linear(6, 2)).double()


def _losses(model: nn.Module, x: Tensor, y: Tensor, per_task: bool) -> Tensor:
    out = model(x)
    if per_task:
        return torch.stack([((out[:, 0] - y) ** 2).mean(), ((out[:, 1] + y) ** 2).mean()])
    return (out[:, 0] - y) ** 2 + out[:, 1] ** 2


def _grads(shape: tuple[int, ...], options: Options, mode: str) -> list[Tensor]:
    model = _model(shape)
    optimizer = JDSGD(model.parameters(), lr=0.1, **_fresh(options))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(8, generator=generator, dtype=torch.float64)
    per_task = options.get("batch_dim", 0) is None
    if mode == "closure":
        optimizer.step(lambda: _losses(model, x, y, per_task))
    else:
        optimizer.backward(_losses(model, x, y, per_task))
        optimizer.step()
    return [copy.deepcopy(p.detach()).reshape(-1) for p in model.parameters()]


@pytest.mark.parametrize("mode", ["closure", "backward"])
@pytest.mark.parametrize("name", list(PATHS))
def test_a_0_dim_parameter_steps_as_one_of_shape_1(name: str, mode: str) -> None:
    scalar = _grads((), PATHS[name], mode)
    vector = _grads((1,), PATHS[name], mode)
    for got, expected in zip(scalar, vector, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_a_0_dim_parameter_in_multi_task_mode() -> None:
    def run(shape: tuple[int, ...]) -> list[Tensor]:
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(5, 6), _Gain(shape), nn.Tanh()).double()
        heads = nn.ModuleList([nn.Linear(6, 1).double() for _ in range(2)])
        params = [*trunk.parameters(), *heads.parameters()]
        optimizer = JDSGD(params, lr=0.1, shared_params=trunk.parameters())
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

        def closure() -> tuple[list[Tensor], Tensor]:
            features = trunk(x)
            return [head(features).pow(2).mean() for head in heads], features

        optimizer.step(closure)
        return [p.detach().reshape(-1).clone() for p in params]

    for got, expected in zip(run(()), run((1,)), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_a_0_dim_parameter_with_a_cross_gramian_method() -> None:
    from jdoptim.aggregation import SDMGradWeighting

    def run(shape: tuple[int, ...]) -> list[Tensor]:
        model = _model(shape)
        optimizer = JDSGD(model.parameters(), lr=0.1, weighting=SDMGradWeighting())
        generator = torch.Generator().manual_seed(1)
        batches = iter(torch.randn(3, 8, 5, generator=generator, dtype=torch.float64))
        y = torch.randn(8, generator=generator, dtype=torch.float64)
        optimizer.step(lambda: _losses(model, next(batches), y, per_task=True))
        return [p.detach().reshape(-1).clone() for p in model.parameters()]

    for got, expected in zip(run(()), run((1,)), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
