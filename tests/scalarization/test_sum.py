import pytest
import torch
import torchjd.scalarization as peer

from jdoptim.scalarization import Sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_gradient_and_peer(dtype: torch.dtype) -> None:
    values = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=dtype, requires_grad=True)
    result = Sum()(values)
    assert result.dtype == dtype
    assert result.item() == 12.0
    result.backward()
    assert torch.equal(values.grad, torch.ones_like(values))
    assert torch.equal(result, peer.Sum()(values))
