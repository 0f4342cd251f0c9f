"""backward() called inside an autocast region (as Lightning's manual optimization does)."""

from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import UPGradWeighting
from jdoptim.optim import JDSGD
from tests.optim._models import per_instance_losses


def _grad_after_backward(inside_autocast: bool, dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, y = torch.randn(8, 5), torch.randn(8)
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    with torch.autocast("cpu", dtype=dtype):
        losses = per_instance_losses(model, x, y) * 1024.0  # as a GradScaler would scale them
        if inside_autocast:
            optimizer.backward(losses)
    if not inside_autocast:
        optimizer.backward(losses)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.xfail(
    strict=True,
    reason="backward() computes the Gramian and weights under the enclosing autocast: in float16 "
    "the scaled Gramian overflows (the step is refused), in bfloat16 .grad loses precision; "
    "torch's own backward is unaffected by an enclosing autocast",
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_backward_inside_autocast_gives_the_grad_of_backward_outside(dtype: torch.dtype) -> None:
    outside = _grad_after_backward(False, dtype)
    inside = _grad_after_backward(True, dtype)
    torch.testing.assert_close(inside, outside, rtol=1e-5, atol=1e-5)
