"""What every stateful and multi-batch method shares: devices, dtypes, repr, state kept apart."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from jdoptim import Stateful
from jdoptim.aggregation import (
    PCD,
    CRMOGMWeighting,
    ExcessMTL,
    GradVac,
    MGDAWeighting,
    MoCo,
    MoDoWeighting,
    SDMGradWeighting,
)
from tests.aggregation._jacobians import jacobian_from_seed

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def jacobian(seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return jacobian_from_seed(seed, 3, 5, rank=3, dtype=dtype)


def cross(seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return jacobian(seed, dtype) @ jacobian(seed + 50, dtype).T


# (name, factory, input for call k)
CASES: list[tuple[str, Callable[[], nn.Module], Callable[[int, torch.dtype], Tensor]]] = [
    ("SDMGrad", lambda: SDMGradWeighting(lr=0.5), cross),
    ("MoDo", MoDoWeighting, cross),
    ("GradVac", GradVac, jacobian),
    ("PCD", lambda: PCD(tau=0.3), jacobian),
    ("ExcessMTL", ExcessMTL, jacobian),
    (
        "CRMOGM",
        lambda: CRMOGMWeighting(MGDAWeighting(), alpha=0.5),
        lambda k, d: jacobian(k, d) @ jacobian(k, d).T,
    ),
    ("MoCo", MoCo, jacobian),
]
cases = pytest.mark.parametrize(("name", "make", "data"), CASES, ids=[c[0] for c in CASES])


def state_tensors(module: nn.Module) -> list[Tensor]:
    return [
        value
        for part in module.modules()
        if isinstance(part, Stateful)
        for value in part._state.values()
        if isinstance(value, Tensor)
    ]


@cases
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_the_inputs_dtype_and_device(
    name: str,
    make: Callable[[], nn.Module],
    data: Callable[..., Tensor],
    dtype: torch.dtype,
    device: str,
) -> None:
    method = make().to(device)
    for k in range(3):
        torch.manual_seed(k)
        result = method(data(k, dtype).to(device))
        assert result.dtype == dtype and result.device.type == device
        assert torch.isfinite(result).all()
    tensors = state_tensors(method)
    assert tensors, f"{name} keeps no tensor state"
    assert all(t.device.type == device for t in tensors)


@cases
@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_loads_on_another_device(
    name: str, make: Callable[[], nn.Module], data: Callable[..., Tensor], device: str
) -> None:
    source = make()
    for k in range(2):
        torch.manual_seed(k)
        source(data(k, torch.float64))
    restored = make().to(device)
    restored.load_state_dict(source.state_dict())
    torch.manual_seed(2)
    expected = source(data(2, torch.float64))
    torch.manual_seed(2)
    got = restored(data(2, torch.float64).to(device))
    torch.testing.assert_close(got.cpu(), expected)


@cases
def test_instances_do_not_share_state_and_repr_names_the_method(
    name: str, make: Callable[[], nn.Module], data: Callable[..., Tensor]
) -> None:
    first, second = make(), make()
    torch.manual_seed(0)
    first(data(0, torch.float64))
    assert state_tensors(first) and not state_tensors(second)
    assert repr(first).startswith(type(first).__name__ + "(")
