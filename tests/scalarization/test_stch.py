import math

import pytest
import torch
import torchjd.scalarization as peer

from jdoptim.scalarization import STCH


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradient_by_hand(dtype: torch.dtype) -> None:
    values = torch.tensor([0.0, math.log(3.0)], dtype=dtype, requires_grad=True)
    result = STCH(1.0, weights=torch.tensor([1.0, 1.0]))(values)
    assert result.item() == pytest.approx(math.log(4.0))
    result.backward()
    # The gradient is λ ⊙ softmax(λ ⊙ (f - z*) / μ).
    assert torch.allclose(values.grad, torch.tensor([0.25, 0.75], dtype=dtype))


def test_default_preference_is_uniform_and_reference_shifts() -> None:
    values = torch.tensor([2.0, 2.0])
    assert STCH(1.0)(values).item() == pytest.approx(1.0 + math.log(2.0))
    shifted = STCH(1.0, reference=torch.tensor([2.0, 2.0]))(values)
    assert shifted.item() == pytest.approx(math.log(2.0))


@pytest.mark.parametrize("mu", [0.01, 0.1, 1.0])
def test_bounds_the_weighted_maximum_within_mu_log_m(mu: float) -> None:
    torch.manual_seed(0)
    values = torch.rand(5, dtype=torch.float64) * 3
    weights = torch.rand(5, dtype=torch.float64)
    reference = torch.rand(5, dtype=torch.float64) * 0.1
    result = STCH(mu, weights, reference)(values).item()
    maximum = (weights * (values - reference)).max().item()
    assert maximum <= result <= maximum + mu * math.log(5) + 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_peer_values_and_gradients(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    weights = torch.rand(2, 3, dtype=dtype)
    reference = torch.rand(2, 3, dtype=dtype) * 0.1
    for args in [(0.3,), (0.3, weights), (0.05, weights, reference)]:
        values = (torch.rand(2, 3, dtype=dtype) + 0.2).requires_grad_()
        ours = STCH(*args)(values)
        (grad_ours,) = torch.autograd.grad(ours, values)
        theirs = peer.STCH(*args)(values)
        (grad_theirs,) = torch.autograd.grad(theirs, values)
        assert torch.allclose(ours, theirs)
        assert torch.allclose(grad_ours, grad_theirs)


def test_rejects_bad_mu() -> None:
    with pytest.raises(ValueError, match="strictly positive"):
        STCH(0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tiny_mu_on_huge_losses_does_not_overflow(dtype: torch.dtype) -> None:
    """μ log Σ exp(x/μ) is within μ log m of max x, even when x/μ is beyond the dtype's range."""
    losses = torch.tensor([1e30, 5e29, -1e30], dtype=dtype, requires_grad=True)
    result = STCH(1e-10)(losses)
    torch.testing.assert_close(result.detach(), torch.tensor(1e30 / 3, dtype=dtype))
    result.backward()
    assert losses.grad is not None
    torch.testing.assert_close(losses.grad, torch.tensor([1 / 3, 0.0, 0.0], dtype=dtype))
