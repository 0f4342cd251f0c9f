import pytest
import torch

from jdoptim.scalarization._adam import adam_step


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_adam_bit_for_bit(weight_decay: float, dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    reference = torch.randn(5, dtype=dtype, requires_grad=True)
    inner = torch.optim.Adam([reference], lr=0.025, weight_decay=weight_decay, foreach=False)
    param = reference.detach().clone()
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    for step in range(1, 8):
        grad = torch.randn(5, dtype=dtype)
        reference.grad = grad.clone()
        inner.step()
        param, exp_avg, exp_avg_sq = adam_step(
            param, grad, exp_avg, exp_avg_sq, step, lr=0.025, weight_decay=weight_decay
        )
        assert torch.equal(param, reference.detach())
