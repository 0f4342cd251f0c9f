"""What every stateful and multi-batch method shares: devices, dtypes, repr, state kept apart."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDSGD, Stateful
from tests.aggregation._jacobians import jacobian_from_seed
from tests.aggregation._methods import METHODS, Method

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def jacobian(seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return jacobian_from_seed(seed, 3, 5, rank=3, dtype=dtype)


def input_maker(method: Method) -> Callable[[int, torch.dtype], Tensor]:
    """Call ``k``'s input: the Jacobian of seed ``k`` in the form the method takes."""
    return lambda k, dtype: method.input_of(jacobian(k, dtype), jacobian(k + 50, dtype))


def maker(method: Method) -> Callable[[], nn.Module]:
    return lambda: method.make(3)


STATEFUL = [method for method in METHODS if method.traits.stateful]
# (name, factory, input for call k), every stateful method of the traits table
CASES: list[tuple[str, Callable[[], nn.Module], Callable[[int, torch.dtype], Tensor]]] = [
    (method.name, maker(method), input_maker(method)) for method in STATEFUL
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


def optimizer_arguments(method: Method) -> Callable[[], dict[str, nn.Module]]:
    key = "aggregator" if method.is_aggregator else "weighting"
    return lambda: {key: method.make(6)}


# Methods as the optimizers take them: (name, keyword arguments of JDSGD, batches per step).
OPTIMIZER_CASES: list[tuple[str, Callable[[], dict[str, nn.Module]], int]] = [
    (m.name, optimizer_arguments(m), 3 if m.input_kind == "cross_gramian" else 1) for m in STATEFUL
]


@pytest.mark.parametrize(
    ("name", "method", "per_step"), OPTIMIZER_CASES, ids=[c[0] for c in OPTIMIZER_CASES]
)
def test_optimizer_checkpoint_resumes_bit_identically(
    name: str, method: Callable[[], dict[str, nn.Module]], per_step: int
) -> None:
    """The method's state travels in the optimizer's state_dict into fresh objects."""
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(6, 4, generator=generator), torch.randn(6, generator=generator))
        for _ in range(4 * per_step)
    ]
    criterion = nn.MSELoss(reduction="none")

    def setup(seed: int) -> tuple[nn.Module, JDSGD]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
        return model, JDSGD(model.parameters(), lr=0.05, **method())  # type: ignore[arg-type]

    def train(model: nn.Module, optimizer: JDSGD, first_step: int, steps: int) -> None:
        data = iter(batches[first_step * per_step :])

        def closure() -> Tensor:
            optimizer.zero_grad()
            x, y = next(data)
            losses: Tensor = criterion(model(x).squeeze(-1), y)
            return losses

        for step in range(first_step, first_step + steps):
            torch.manual_seed(100 + step)  # GradVac's shuffles
            optimizer.step(closure)

    model, optimizer = setup(0)
    train(model, optimizer, 0, 2)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    train(model, optimizer, 2, 2)

    fresh_model, fresh_optimizer = setup(1)
    fresh_model.load_state_dict(checkpoint["model"])
    fresh_optimizer.load_state_dict(checkpoint["optimizer"])
    train(fresh_model, fresh_optimizer, 2, 2)
    for got, want in zip(fresh_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(got, want)
