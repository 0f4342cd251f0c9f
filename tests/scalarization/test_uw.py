import math

import pytest
import torch
import torchjd.scalarization as peer

from jdoptim.scalarization import UW


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradients_by_hand(dtype: torch.dtype) -> None:
    uw = UW(2).to(dtype)
    with torch.no_grad():
        uw.log_variances.copy_(torch.tensor([0.0, math.log(2.0)]))
    values = torch.tensor([4.0, 2.0], dtype=dtype, requires_grad=True)
    result = uw(values)
    # ½ e^{-s} L + ½ s = (2 + 0) + (0.5 + ½ log 2)
    assert result.item() == pytest.approx(2.5 + 0.5 * math.log(2.0))
    result.backward()
    assert torch.allclose(values.grad, torch.tensor([0.5, 0.25], dtype=dtype))
    # ∂/∂s = ½ (1 - e^{-s} L)
    expected = torch.tensor([0.5 * (1 - 4.0), 0.5 * (1 - 1.0)], dtype=dtype)
    assert torch.allclose(uw.log_variances.grad, expected)


def test_learns_log_variances_equal_to_log_losses() -> None:
    uw = UW(3)
    optimizer = torch.optim.SGD(uw.parameters(), lr=0.5)
    losses = torch.tensor([0.5, 1.0, 4.0])
    for _ in range(300):
        optimizer.zero_grad()
        uw(losses).backward()
        optimizer.step()
    assert torch.allclose(uw.log_variances.detach(), losses.log(), atol=1e-4)


def test_matches_the_peer_and_round_trips_through_state_dict() -> None:
    torch.manual_seed(4)
    ours, theirs = UW([2, 3]), peer.UW([2, 3])
    with torch.no_grad():
        ours.log_variances.normal_()
        next(theirs.parameters()).copy_(ours.log_variances)
    values = torch.rand(2, 3) + 0.1
    assert torch.allclose(ours(values), theirs(values))
    fresh = UW([2, 3])
    fresh.load_state_dict(ours.state_dict())
    assert torch.equal(fresh(values), ours(values))
    ours.reset()
    assert torch.equal(ours.log_variances.detach(), torch.zeros(2, 3))


def test_checks_the_losses_shape_and_the_constructor() -> None:
    with pytest.raises(ValueError, match=r"log_variances has shape \[3\]"):
        UW(3)(torch.ones(2))
    with pytest.raises(ValueError, match="shape"):
        UW(0)
    assert repr(UW([2, 3])) == "UW(shape=[2, 3])"
