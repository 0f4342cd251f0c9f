"""An engine's hooks live exactly as long as the engine is open."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim.autogram import Engine


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2))


def _hook_counts(model: nn.Module) -> list[int]:
    return [len(module._forward_hooks) for module in model.modules()]


def test_building_and_closing_engines_leaves_no_hooks() -> None:
    model = _model()
    before = _hook_counts(model)
    x = torch.randn(5, 3)
    for round_ in range(10):
        model[0].weight.requires_grad_(round_ % 2 == 0)  # a frozen layer, as after a freeze
        engine = Engine(model, batch_dim=0)
        assert max(_hook_counts(model)) == 1
        engine.compute_gramian(model(x).sum(dim=1))
        engine.close()
        assert _hook_counts(model) == before


def test_context_manager_closes() -> None:
    model = _model()
    with Engine(model, batch_dim=0) as engine:
        gramian = engine.compute_gramian(model(torch.randn(5, 3)).sum(dim=1))
    assert gramian.shape == (5, 5)
    assert engine.closed
    assert sum(_hook_counts(model)) == 0
    engine.close()  # harmless twice


def test_closed_engine_says_so() -> None:
    model = _model()
    engine = Engine(model, batch_dim=0)
    engine.close()
    output = model(torch.randn(5, 3)).sum(dim=1)
    with pytest.raises(RuntimeError, match="closed"):
        engine.compute_gramian(output)
    with pytest.raises(RuntimeError, match="closed"), engine.capture():
        pass


def test_discovery_hook_is_removed_after_capture() -> None:
    model = _model()
    engine = Engine(batch_dim=0, parameters=model.parameters())
    global_hooks = nn.modules.module._global_forward_hooks
    count = len(global_hooks)
    with engine.capture():
        output = model(torch.randn(5, 3)).sum(dim=1)
        assert len(global_hooks) == count + 1
    assert len(global_hooks) == count
    assert engine.compute_gramian(output).shape == (5, 5)
