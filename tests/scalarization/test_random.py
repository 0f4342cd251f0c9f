import pytest
import torch
import torchjd.scalarization as peer

from jdoptim.scalarization import Random


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_are_a_softmax_of_normal_draws(dtype: torch.dtype) -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=dtype, requires_grad=True)
    torch.manual_seed(3)
    result = Random()(values)
    result.backward()
    torch.manual_seed(3)
    expected = torch.softmax(torch.randn(6, dtype=dtype), dim=0).reshape(2, 3)
    assert torch.allclose(values.grad, expected)
    assert bool((values.grad > 0).all())
    assert values.grad.sum().item() == pytest.approx(1.0)
    assert torch.allclose(result, (expected * values).sum())


def test_draws_anew_at_each_call_and_matches_the_peer_under_a_seed() -> None:
    values = torch.tensor([1.0, 2.0, 3.0])
    first, second = Random()(values), Random()(values)
    assert first.item() != second.item()
    torch.manual_seed(0)
    ours = Random()(values)
    torch.manual_seed(0)
    assert torch.allclose(ours, peer.Random()(values))
