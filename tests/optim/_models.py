"""Small models and data shared by the optimizer tests."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from jdoptim import Stateful
from jdoptim.aggregation import Weighting


def regression_problem(
    seed: int = 0, batch: int = 8, steps: int = 3
) -> tuple[nn.Module, Tensor, Tensor]:
    """An MLP (float64) and ``steps`` batches of inputs and targets."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    inputs = torch.randn(steps, batch, 5, dtype=torch.float64)
    targets = torch.randn(steps, batch, dtype=torch.float64)
    return model, inputs, targets


def per_instance_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x).squeeze(-1) - y) ** 2


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def assert_same_params(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        if atol == 0.0:
            assert torch.equal(pa, pb), name
        else:
            torch.testing.assert_close(pa, pb, atol=atol, rtol=0.0, msg=name)


class EMAWeighting(Stateful, Weighting):
    """A test-only stateful Gramian weighting: EMA of normalised diagonal-based weights."""

    def __init__(self, beta: float = 0.5) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, gramian: Tensor, /) -> Tensor:
        target = 1.0 / (gramian.diagonal().sqrt() + 1.0)
        target = target / target.sum()
        previous = self._state.get("weights")
        weights = target if previous is None else self.beta * previous + (1 - self.beta) * target
        self._state["weights"] = weights.detach().clone()
        self._state["calls"] = int(self._state.get("calls", 0)) + 1
        return weights
