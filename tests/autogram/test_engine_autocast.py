"""The engine works under CPU bfloat16 autocast with normalization layers."""

from __future__ import annotations

import torch
from torch import nn

from jdoptim.autogram import Engine
from tests.autogram._reference import loop_gramian, relative_error, routes


def test_bfloat16_autocast_with_layer_norm_and_group_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6, 8),
        nn.LayerNorm(8),
        nn.Linear(8, 2),
    )
    x = torch.randn(5, 2, 6)
    engine = Engine(model, batch_dim=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(x).float().pow(2).sum(dim=1)
    gramian = engine.compute_gramian(output)
    assert gramian.dtype == torch.float32
    expected = loop_gramian(output, list(model.parameters()))
    assert relative_error(gramian, expected) <= 3e-2  # bfloat16 rounding in the forward pass
    assert set(routes(engine, model).values()) == {"closed_form"}
    weights = torch.rand(5)
    engine.backward(weights)
    fused = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    output.backward(weights)
    for actual, p in zip(fused, model.parameters(), strict=True):
        assert p.grad is not None
        assert relative_error(actual, p.grad) <= 3e-2
