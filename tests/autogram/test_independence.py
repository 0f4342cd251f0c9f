"""Losses that are not independent across the batch dim never get a fast (wrong) Gramian.

Every pass checks, at every layer output the fast routes use, that instance ``i``'s losses reach
only slice ``i``; where that fails the parameters take the exact route. Ground truth: one
``autograd.grad`` per loss on the same graph.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from jdoptim.autogram import Engine
from jdoptim.autogram._independence import bit_masks, masked_dims, scaled_dims, scaling_weights
from tests.autogram._reference import loop_gramian, relative_error

Mix = Callable[[Tensor], Tensor]

MIXES: dict[str, Mix] = {
    "roll": lambda losses: losses + losses.roll(1, 0),
    "every_loss_sees_instance_0": lambda losses: losses + losses[:1],
    "sort": lambda losses: losses.sort().values,
}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _check(engine: Engine, model: nn.Module, output: Tensor, route: str) -> None:
    gramian = engine.compute_gramian(output)
    assert relative_error(gramian, loop_gramian(output, list(model.parameters()))) <= 1e-10
    assert set(engine._last_routes.values()) == {route}


@pytest.mark.parametrize("mix", list(MIXES))
def test_mixed_losses_after_valid_steps_take_the_exact_route(mix: str) -> None:
    model = _mlp()
    engine = Engine(model, batch_dim=0)
    x = torch.randn(6, 5, dtype=torch.float64)
    for _ in range(2):
        _check(engine, model, model(x).pow(2).sum(dim=1), "closed_form")
    _check(engine, model, MIXES[mix](model(x).pow(2).sum(dim=1)), "exact")
    _check(engine, model, model(x).pow(2).sum(dim=1), "closed_form")  # and back


@pytest.mark.parametrize("mixed_call", [0, 1])
def test_a_module_called_twice_with_one_call_mixed(mixed_call: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    engine = Engine(layer, batch_dim=0)
    x = torch.randn(6, 5, dtype=torch.float64)
    outputs = [layer(x), layer(2 * x)]
    outputs[mixed_call] = outputs[mixed_call].roll(1, 0)
    _check(engine, layer, (outputs[0] + outputs[1]).pow(2).sum(dim=1), "exact")


def test_mixing_between_layers_is_caught() -> None:
    """The losses are per instance, but the hidden layer's output is shuffled across instances."""
    model = _mlp()
    engine = Engine(model, batch_dim=0)
    x = torch.randn(6, 5, dtype=torch.float64)
    _check(engine, model, model(x).pow(2).sum(dim=1), "closed_form")
    hidden = torch.tanh(model[0](x))
    output = model[2](hidden.flip(0)).pow(2).sum(dim=1)
    gramian = engine.compute_gramian(output)
    assert relative_error(gramian, loop_gramian(output, list(model.parameters()))) <= 1e-10
    assert engine._last_routes[id(model[0].weight)] == "exact"


class _MeanCoupling(nn.Module):
    """``y + c · mean over the batch``: the instances mix exactly when ``c != 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.coupling = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        return (y + self.coupling * y.mean(dim=0)).pow(2).sum(dim=1)


def test_the_same_graph_with_other_values_is_checked_again() -> None:
    """Whether the losses mix can change with values alone: a verdict cached per graph structure
    would be wrong on the second pass (same nodes, same shapes, only the coupling moved off 0)."""
    torch.manual_seed(0)
    model = _MeanCoupling().double()
    engine = Engine(model, batch_dim=0)
    x = torch.randn(6, 5, dtype=torch.float64)
    routes = []
    for coupling in (0.0, 0.5):
        with torch.no_grad():
            model.coupling.fill_(coupling)
        output = model(x)
        gramian = engine.compute_gramian(output)
        assert relative_error(gramian, loop_gramian(output, list(model.parameters()))) <= 1e-10
        routes.append(engine._last_routes[id(model.linear.weight)])
    assert routes == ["closed_form", "exact"]


@pytest.mark.parametrize("batch", [2, 7, 128, 129, 5000])
@pytest.mark.parametrize("half", [False, True])
def test_scaling_weights_separate_every_pair_of_instances(batch: int, half: bool) -> None:
    weights = scaling_weights(batch, half, torch.Generator().manual_seed(0))
    assert len({tuple(column) for column in weights.T.tolist()}) == batch
    magnitudes = weights.abs().log2()
    assert torch.equal(magnitudes, magnitudes.round())  # powers of two: exact scaling
    assert weights.abs().max() <= 2.0 ** (7 if half else 63)


def test_scaled_dims_needs_bit_exact_scaling() -> None:
    weights = torch.tensor([[1.0, -2.0, 4.0]])
    plain = torch.randn(1, 3, 2)  # [T, B, k]
    probed = plain * weights[0].view(1, 3, 1)
    assert scaled_dims([plain], [probed], weights, [[0]]) == [0]
    probed[0, 1, 0] += probed[0, 1, 0].abs() * 1e-6  # off by a rounding error: not proven
    assert scaled_dims([plain], [probed], weights, [[0]]) == [None]


def test_masked_dims_separates_every_pair() -> None:
    masks = bit_masks(5)
    assert masks.shape == (6, 5)
    for i in range(5):
        for k in range(5):
            if i != k:
                assert bool((masks[:, i] & ~masks[:, k]).any())  # some row holds i without k
    independent = masks.double()[:, :, None] * torch.randn(1, 5, 3)  # row r: slices in mask r
    assert masked_dims([independent], masks, [[0]]) == [0]
    leaking = independent.clone()
    leaking[0, ~masks[0]] = 1e-30
    assert masked_dims([leaking], masks, [[0]]) == [None]


class BatchCentered(nn.Module):
    """A custom layer with a batch-level statistic: it mixes instances inside its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean(dim=0)) * self.gain


def test_a_custom_module_with_batch_statistics_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), BatchCentered(), nn.Tanh(), nn.Linear(4, 2)).double()
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(6, 5, dtype=torch.float64)).pow(2).sum(dim=1)
    gramian = engine.compute_gramian(output)
    assert relative_error(gramian, loop_gramian(output, list(model.parameters()))) <= 1e-10
    assert engine._last_routes[id(model[0].weight)] == "exact"
    assert engine._last_routes[id(model[3].weight)] == "closed_form"
