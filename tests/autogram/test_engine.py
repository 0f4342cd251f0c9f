"""The engine's Gramians and fused gradients equal the ground truth on many architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim.autogram import Engine
from tests.autogram._reference import (
    engine_gramian_and_grads,
    reference_gramian,
    relative_error,
)

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _assert_exact(model: nn.Module, forward, batch_dim: int | None, dtype=torch.float64) -> None:  # type: ignore[no-untyped-def]
    model = model.to(dtype)
    engine = Engine(model, batch_dim=batch_dim)
    gramian, fused, expected = engine_gramian_and_grads(engine, model, forward)
    reference = reference_gramian(model, forward)
    assert gramian.shape == reference.shape
    assert relative_error(gramian, reference) <= TOLERANCE[dtype]
    assert fused.keys() == expected.keys()
    for name in expected:
        assert relative_error(fused[name], expected[name]) <= 1e3 * TOLERANCE[dtype], name


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlp(batch_dim: int | None, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(6, 5, dtype=dtype)
    _assert_exact(model, lambda m: m(x).pow(2).sum(dim=1), batch_dim, dtype)
