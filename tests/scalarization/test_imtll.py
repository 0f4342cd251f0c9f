import math

import pytest
import torch
import torchjd.scalarization as peer

from jdoptim.scalarization import IMTLL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradients_by_hand(dtype: torch.dtype) -> None:
    imtll = IMTLL(2).to(dtype)
    with torch.no_grad():
        imtll.scales.copy_(torch.tensor([0.0, math.log(2.0)]))
    values = torch.tensor([4.0, 3.0], dtype=dtype, requires_grad=True)
    result = imtll(values)
    # e^{s} L - s = 4 + (6 - log 2)
    assert result.item() == pytest.approx(10.0 - math.log(2.0))
    result.backward()
    assert torch.allclose(values.grad, torch.tensor([1.0, 2.0], dtype=dtype))
    # ∂/∂s = e^{s} L - 1
    assert torch.allclose(imtll.scales.grad, torch.tensor([3.0, 5.0], dtype=dtype))


def test_learns_scales_that_equalise_the_scaled_losses() -> None:
    imtll = IMTLL(3)
    optimizer = torch.optim.SGD(imtll.parameters(), lr=0.2)
    losses = torch.tensor([0.5, 1.0, 4.0])
    for _ in range(400):
        optimizer.zero_grad()
        imtll(losses).backward()
        optimizer.step()
    scaled = imtll.scales.detach().exp() * losses
    assert torch.allclose(scaled, torch.ones(3), atol=1e-4)


def test_matches_the_peer_and_round_trips_through_state_dict() -> None:
    torch.manual_seed(5)
    ours, theirs = IMTLL(4), peer.IMTLL(4)
    with torch.no_grad():
        ours.scales.normal_()
        next(theirs.parameters()).copy_(ours.scales)
    values = torch.rand(4) + 0.1
    assert torch.allclose(ours(values), theirs(values))
    fresh = IMTLL(4)
    fresh.load_state_dict(ours.state_dict())
    assert torch.equal(fresh(values), ours(values))
    ours.reset()
    assert torch.equal(ours.scales.detach(), torch.zeros(4))


def test_checks_the_losses_shape() -> None:
    with pytest.raises(ValueError, match=r"scales has shape \[2\]"):
        IMTLL(2)(torch.ones(2, 1))
