"""backward() called inside an autocast region (as Lightning's manual optimization does) must
compute the Gramian, Jacobian and weights in full precision: the same .grad as outside it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from jdoptim.aggregation import ConFIG, TrimmedMean, UPGradWeighting
from jdoptim.optim import JDSGD
from tests.optim._models import per_instance_losses

PATHS = [
    pytest.param({"weighting": UPGradWeighting(), "batch_dim": 0}, id="engine-instance-wise"),
    pytest.param({"weighting": UPGradWeighting(), "batch_dim": None}, id="per-task"),
    pytest.param({"aggregator": ConFIG()}, id="jacobian-ConFIG"),
    pytest.param({"aggregator": TrimmedMean(trim_number=1)}, id="jacobian-TrimmedMean"),
]


def _grad_after_backward(inside_autocast: bool, dtype: torch.dtype, options: Any) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, y = torch.randn(8, 5), torch.randn(8)
    optimizer = JDSGD(model.parameters(), lr=0.1, **options)
    with torch.autocast("cpu", dtype=dtype):
        losses = per_instance_losses(model, x, y) * 1024.0  # as a GradScaler would scale them
        if inside_autocast:
            optimizer.backward(losses)
    if not inside_autocast:
        optimizer.backward(losses)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("options", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_backward_inside_autocast_gives_the_grad_of_backward_outside(
    dtype: torch.dtype, options: Any
) -> None:
    outside = _grad_after_backward(False, dtype, options)
    inside = _grad_after_backward(True, dtype, options)
    torch.testing.assert_close(inside, outside, rtol=1e-5, atol=1e-5)
