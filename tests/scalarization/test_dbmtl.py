import math

import pytest
import torch

from jdoptim.scalarization import DBMTL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_losses_and_their_gradient(dtype: torch.dtype) -> None:
    values = torch.tensor([0.5, 2.0, 8.0], dtype=dtype, requires_grad=True)
    result = DBMTL(eps=0.0)(values)
    assert result.item() == pytest.approx(math.log(8.0))
    result.backward()
    assert torch.allclose(values.grad, 1 / values.detach())


def test_eps_shift_and_errors() -> None:
    values = torch.tensor([0.0, 1.0])
    assert DBMTL(eps=1.0)(values).item() == pytest.approx(math.log(2.0))
    with pytest.raises(ValueError, match="greater than -eps"):
        DBMTL(eps=0.0)(values)
    with pytest.raises(ValueError, match="non-negative"):
        DBMTL(eps=-1.0)
    assert repr(DBMTL()) == "DBMTL(eps=1e-08)"
