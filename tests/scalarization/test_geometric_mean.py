import pytest
import torch
import torchjd.scalarization as peer

from jdoptim.scalarization import GeometricMean


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradient(dtype: torch.dtype) -> None:
    values = torch.tensor([1.0, 4.0, 16.0], dtype=dtype, requires_grad=True)
    result = GeometricMean()(values)
    assert result.item() == pytest.approx(4.0)
    result.backward()
    # d/dLᵢ (Π L)^(1/m) = GM / (m Lᵢ)
    expected = 4.0 / (3 * values.detach())
    assert torch.allclose(values.grad, expected)
    assert torch.allclose(result, peer.GeometricMean()(values))


def test_rejects_non_positive_losses() -> None:
    with pytest.raises(ValueError, match="strictly positive"):
        GeometricMean()(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="strictly positive"):
        GeometricMean()(torch.tensor([1.0, -2.0]))
