import pytest
import torch
import torchjd.scalarization as peer

from jdoptim.scalarization import Constant


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_gradient_and_peer(dtype: torch.dtype) -> None:
    weights = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    values = torch.tensor([[4.0, 1.0], [0.5, 7.0]], dtype=dtype, requires_grad=True)
    result = Constant(weights)(values)
    assert result.dtype == dtype
    assert result.item() == 2.0 - 1.0 + 1.0
    result.backward()
    assert torch.equal(values.grad, weights.to(dtype))
    assert torch.allclose(result, peer.Constant(weights.to(dtype))(values))


def test_weights_are_copied_and_required() -> None:
    weights = torch.tensor([1.0, 2.0])
    constant = Constant(weights)
    weights[0] = 100.0
    assert constant(torch.ones(2)).item() == 3.0
    with pytest.raises(TypeError, match="needs weights"):
        Constant(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        Constant(torch.tensor([1, 2]))
