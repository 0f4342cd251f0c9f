"""Gramians of tiny, huge and loss-scaled float32 losses, and under fp16 autocast.

Ground truth: the same model in float64 (one ``autograd.grad`` per loss).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim.aggregation import UPGradWeighting
from jdoptim.autogram import Engine
from tests.autogram._reference import loop_gramian, relative_error


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def _losses(model: nn.Module, x: Tensor, scale: float) -> Tensor:
    return model(x).pow(2).sum(dim=1) * scale


@pytest.mark.parametrize("scale", [1e-25, 1e-22, 1e-15, 1.0, 1e15, 1e20, 1e30])
def test_scaled_gramian_is_exact_at_any_loss_scale(scale: float) -> None:
    model = _model()
    x = torch.randn(6, 5)
    engine = Engine(model, batch_dim=0)
    gramian, s = engine.compute_scaled_gramian(_losses(model, x, scale))
    assert gramian.dtype == torch.float32 and s.dtype == torch.float64
    exponent = float(s.log2())
    assert exponent == round(exponent)  # a power of two
    if 1e-9 < scale < 1e9:
        assert float(s) == 1.0
    reference = model.double()
    losses = _losses(reference, x.double(), scale)
    expected = loop_gramian(losses, list(reference.parameters())) / s**2
    assert torch.isfinite(gramian).all()
    assert relative_error(gramian.double(), expected) <= 1e-5
    # UPGrad on the rescaled Gramian: a non-conflicting direction (J d >= 0) at every scale.
    weights = UPGradWeighting()(gramian.double())
    assert (expected @ weights >= -1e-6 * expected.diagonal().max()).all()


def test_scaled_gramian_is_bit_identical_in_normal_ranges() -> None:
    model = _model()
    x = torch.randn(6, 5)
    engine = Engine(model, batch_dim=0)
    plain = engine.compute_gramian(_losses(model, x, 3.0))
    scaled, s = engine.compute_scaled_gramian(_losses(model, x, 3.0))
    assert float(s) == 1.0
    assert torch.equal(plain, scaled)


def test_fused_grad_of_tiny_losses() -> None:
    model = _model()
    x = torch.randn(6, 5)
    engine = Engine(model, batch_dim=0)
    losses = _losses(model, x, 1e-25)
    engine.compute_scaled_gramian(losses)
    weights = torch.rand(6)
    engine.backward(weights)
    fused = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    losses.backward(weights)
    for actual, p in zip(fused, model.parameters(), strict=True):
        assert p.grad is not None
        assert relative_error(actual, p.grad) <= 1e-5


def test_fp16_autocast_gramian_of_scaled_losses_stays_finite() -> None:
    """GradScaler's 65536 on losses from an fp16 autocast region (Gramian taken inside it)."""
    model = _model()
    x = torch.randn(6, 5)
    engine = Engine(model, batch_dim=0)
    with torch.autocast("cpu", dtype=torch.float16):
        losses = model(x).float().pow(2).sum(dim=1)
        unscaled = engine.compute_gramian(losses)
        losses = model(x).float().pow(2).sum(dim=1)
        scaled = engine.compute_gramian(losses * 65536.0)
    assert torch.isfinite(unscaled).all() and torch.isfinite(scaled).all()
    assert relative_error(scaled, 65536.0**2 * unscaled) <= 1e-3
    weights = torch.rand(6)
    engine.backward(weights)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())  # type: ignore[arg-type]


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_gramian_inside_autocast_equals_the_one_outside(
    batch_dim: int | None, dtype: torch.dtype
) -> None:
    model = _model()
    x = torch.randn(6, 5)
    engine = Engine(model, batch_dim=batch_dim)
    gramians = []
    for inside in (False, True):
        with torch.autocast("cpu", dtype=dtype):
            losses = model(x).float().pow(2).sum(dim=1) * 1024.0
            if inside:
                gramians.append(engine.compute_gramian(losses))
        if not inside:
            gramians.append(engine.compute_gramian(losses))
    assert torch.isfinite(gramians[1]).all()
    assert relative_error(gramians[1], gramians[0]) <= 1e-6
