"""Cross-checks against the peer TorchJD 0.18: same Jacobians, same ``.jac``, same ``.grad``."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation
import torchjd.autojac
from torch import nn

import jdoptim
from jdoptim.aggregation import Mean
from jdoptim.autojac import jac, mtl_backward
from tests.autojac._models import MODELS, losses_of, make


@pytest.mark.parametrize("name", MODELS)
def test_jac_and_backward_match_torchjd(name: str) -> None:
    model, x, y = make(name)
    params = list(model.parameters())
    ours = jac(losses_of(model, x, y), params)
    theirs = torchjd.autojac.jac(losses_of(model, x, y), params)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    jdoptim.backward(losses_of(model, x, y), Mean())
    ours_grads = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    model.zero_grad()
    torchjd.autojac.backward(losses_of(model, x, y))
    torchjd.autojac.jac_to_grad(params, torchjd.aggregation.Mean())
    for grad, param in zip(ours_grads, params, strict=True):
        torch.testing.assert_close(grad, param.grad)


def test_mtl_backward_matches_torchjd() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    heads = [nn.Linear(4, 1).double(), nn.Linear(4, 2).double()]
    x = torch.randn(5, 3, dtype=torch.float64)

    def run() -> tuple[list[torch.Tensor], torch.Tensor]:
        features = trunk(x)
        return [head(features).pow(2).mean() for head in heads], features

    losses, features = run()
    mtl_backward(losses, features)
    ours = [(p.jac.clone(), p.grad) for p in trunk.parameters()]  # type: ignore[attr-defined]
    ours_heads = [p.grad.clone() for h in heads for p in h.parameters()]  # type: ignore[union-attr]
    jdoptim.autojac.clear_jac(trunk.parameters())
    for head in heads:
        head.zero_grad()
    losses, features = run()
    torchjd.autojac.mtl_backward(losses, features)
    for (jacobian, grad), param in zip(ours, trunk.parameters(), strict=True):
        torch.testing.assert_close(jacobian, param.jac)  # type: ignore[attr-defined]
        assert grad is None and param.grad is None
    theirs_heads = [p.grad for h in heads for p in h.parameters()]
    for a, b in zip(ours_heads, theirs_heads, strict=True):
        torch.testing.assert_close(a, b)
