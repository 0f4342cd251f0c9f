import math

import pytest
import torch
import torchjd.scalarization as peer

from jdoptim.scalarization import PBI


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradient_by_hand(dtype: torch.dtype) -> None:
    # ŵ = (1, 1)/√2: d₁ = 4/√2, the perpendicular part is (1, -1), d₂ = √2.
    values = torch.tensor([3.0, 1.0], dtype=dtype, requires_grad=True)
    result = PBI(2.0, torch.tensor([1.0, 1.0]))(values)
    assert result.item() == pytest.approx(4 * math.sqrt(2), rel=1e-6)
    result.backward()
    # ∇d₁ = ŵ and ∇d₂ = (1, -1)/√2: ŵ + θ ∇d₂ = (3, -1)/√2.
    expected = torch.tensor([3.0, -1.0], dtype=dtype) / math.sqrt(2)
    assert torch.allclose(values.grad, expected, atol=1e-6)


def test_reference_and_losses_on_the_preference_ray() -> None:
    pbi = PBI(5.0, torch.tensor([1.0, 1.0]), reference=torch.tensor([1.0, 1.0]))
    values = torch.tensor([3.0, 3.0], dtype=torch.float64, requires_grad=True)
    result = pbi(values)
    # On the ray d₂ = 0 up to the 1e-6 shift that keeps the gradient finite.
    assert result.item() == pytest.approx(2 * math.sqrt(2) + 5e-6, abs=1e-9)
    result.backward()
    assert bool(torch.isfinite(values.grad).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_peer_values_and_gradients(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    weights = torch.rand(4, dtype=dtype)
    reference = torch.rand(4, dtype=dtype) * 0.1
    for args in [(5.0, weights), (0.0, weights, reference), (1.5, weights, reference)]:
        values = (torch.rand(4, dtype=dtype) + 0.2).requires_grad_()
        ours = PBI(*args)(values)
        (grad_ours,) = torch.autograd.grad(ours, values)
        theirs = peer.PBI(*args)(values)
        (grad_theirs,) = torch.autograd.grad(theirs, values)
        assert torch.allclose(ours, theirs)
        assert torch.allclose(grad_ours, grad_theirs)


def test_rejects_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        PBI(-1.0, torch.ones(2))
    with pytest.raises(TypeError, match="needs weights"):
        PBI(1.0, None)  # type: ignore[arg-type]
