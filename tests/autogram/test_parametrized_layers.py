"""Layers whose weight is computed from other parameters (weight_norm, spectral_norm,
``torch.nn.utils.parametrize``): the closed form of the stock layer would miss those parameters,
so they take a generic exact route, and the Gramian and ``.grad`` stay exact."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from jdoptim.autogram import Engine
from tests.autogram._reference import engine_gramian_and_grads, loop_gramian, relative_error


def _weight_norm_linear() -> nn.Module:
    return nn.Sequential(parametrizations.weight_norm(nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 3))


def _spectral_norm_linear() -> nn.Module:
    model = nn.Sequential(
        parametrizations.spectral_norm(nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 3)
    )
    return model.eval()  # in train mode each forward runs a power iteration that moves buffers


def _legacy_weight_norm_linear() -> nn.Module:
    with pytest.warns(FutureWarning):
        layer = nn.utils.weight_norm(nn.Linear(5, 4))
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 3))


def _weight_norm_conv() -> nn.Module:
    conv = parametrizations.weight_norm(nn.Conv1d(1, 2, 3))
    return nn.Sequential(nn.Unflatten(1, (1, 5)), conv, nn.Flatten(), nn.Linear(6, 3))


def _softplus_layer_norm() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3))
    parametrize.register_parametrization(model[1], "weight", nn.Softplus())
    return model


@pytest.mark.parametrize(
    "build",
    [
        _weight_norm_linear,
        _spectral_norm_linear,
        _legacy_weight_norm_linear,
        _weight_norm_conv,
        _softplus_layer_norm,
    ],
)
def test_parametrized_weights_are_exact(build: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(6, 5, dtype=torch.float64)

    def forward(m: Callable[[Tensor], Tensor]) -> Tensor:
        return m(x).pow(2).sum(dim=1)

    params = [p for p in model.parameters() if p.requires_grad]
    with Engine(model, batch_dim=0) as engine:
        gramian, fused, expected = engine_gramian_and_grads(engine, model, forward)
        reported = {report.name for report in engine.route_report()}
    assert reported == {name for name, _ in model.named_parameters()}
    assert relative_error(gramian, loop_gramian(forward(model), params)) <= 1e-12
    assert fused.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(fused[name], grad, rtol=1e-12, atol=1e-14)


class _Doubled(nn.Module):
    """A parametrization without ``right_inverse``: the layer's Parameter object stays the same."""

    def forward(self, weight: Tensor) -> Tensor:
        return 2 * weight


def test_a_layer_parametrized_after_the_first_pass_is_exact() -> None:
    # The engine knew model[0] as a plain Linear (closed form); parametrizing it afterwards must
    # not keep that closed form (it left the weight out: relative error 0.46 before).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    x = torch.randn(6, 5, dtype=torch.float64)

    def forward(m: Callable[[Tensor], Tensor]) -> Tensor:
        return m(x).pow(2).sum(dim=1)

    with Engine(model, batch_dim=0) as engine:
        engine.compute_gramian(forward(model))
        parametrize.register_parametrization(model[0], "weight", _Doubled())
        gramian = engine.compute_gramian(forward(model))
        reported = {report.name for report in engine.route_report()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert reported == {name for name, _ in model.named_parameters()}
    assert relative_error(gramian, loop_gramian(forward(model), params)) <= 1e-12


def test_parameters_added_after_the_engine_was_built_are_named_in_a_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.randn(6, 5)
    with Engine(model, batch_dim=0) as engine:
        engine.compute_gramian(model(x).sum(dim=1))
        parametrizations.weight_norm(model[0])  # new parameters original0, original1
        with pytest.warns(UserWarning, match="parameters the engine was not built with"):
            engine.compute_gramian(model(x).sum(dim=1))
