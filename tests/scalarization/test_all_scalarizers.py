"""The checks every exported scalarizer passes, generated from ``__all__`` and a traits table.

Scalar output, dtype, device; one loss; scale (1e-20 to 1e20, float32 and float64); never NaN on
finite hostile losses; hooks; repr; bad input; exact gradients; state round trip, reset and foreign
state; hyper-parameters validated on assignment.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn

from jdoptim import Stateful
from tests.scalarization._methods import METHOD_IDS, METHODS, TRAITS, Method, exported_scalarizers

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
DTYPES = [torch.float32, torch.float64]
SHAPE = (2, 3)
methods = pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)


def only(predicate: object) -> pytest.MarkDecorator:
    chosen = [m for m in METHODS if predicate(m)]  # type: ignore[operator]
    return pytest.mark.parametrize("method", chosen, ids=[m.name for m in chosen])


def losses(
    dtype: torch.dtype = torch.float64, seed: int = 0, shape: tuple[int, ...] = SHAPE
) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator, dtype=torch.float64) + 0.1).to(dtype)


def run(method: Method, values: Tensor, module: nn.Module | None = None, seed: int = 0) -> Tensor:
    instance = module if module is not None else method.make(tuple(values.shape))
    torch.manual_seed(seed)
    result: Tensor = instance(values)
    return result


def test_every_exported_scalarizer_has_traits() -> None:
    """A new scalarizer must get a line in tests/scalarization/_methods.py to be exported."""
    assert exported_scalarizers() == sorted(TRAITS)


@methods
def test_traits_agree_with_the_methods(method: Method) -> None:
    assert method.traits.stateful == isinstance(method.make(SHAPE), Stateful)


@methods
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_scalar_of_the_losses_dtype_and_device(
    method: Method, dtype: torch.dtype, device: str
) -> None:
    values = losses(dtype).to(device)
    result = run(method, values, method.make(SHAPE).to(device))
    assert result.shape == () and result.dtype == dtype and result.device == values.device
    assert torch.isfinite(result)


@methods
def test_one_loss(method: Method) -> None:
    result = run(method, losses(shape=(1,)))
    assert result.shape == () and torch.isfinite(result)


@methods
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_extreme_scales_give_finite_values_and_gradients(
    method: Method, dtype: torch.dtype, scale: float
) -> None:
    values = (losses() * scale).to(dtype).requires_grad_()
    result = run(method, values)
    result.backward()
    assert torch.isfinite(result)
    assert values.grad is not None and torch.isfinite(values.grad).all()


def hostile_losses() -> dict[str, Tensor]:
    return {
        "zeros": torch.zeros(SHAPE, dtype=torch.float64),
        "equal": torch.full(SHAPE, 0.5, dtype=torch.float64),
        "mixed-magnitudes": torch.logspace(-8, 8, 6, dtype=torch.float64).reshape(SHAPE),
        "negative": -losses(),
    }


@methods
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["zeros", "equal", "mixed-magnitudes", "negative"])
def test_never_nan_on_finite_losses(method: Method, dtype: torch.dtype, case: str) -> None:
    """Finite value and gradient, or, outside the method's domain, a clear ValueError."""
    values = hostile_losses()[case].to(dtype).requires_grad_()
    instance = method.make(SHAPE)
    traits = method.traits
    if (case == "negative" and traits.positive_losses) or (
        case == "zeros" and not traits.zero_losses
    ):
        with pytest.raises(ValueError, match="loss"):
            run(method, values, instance)
        return
    for call in range(2):
        result = run(method, values, instance, seed=call)
        (gradient,) = torch.autograd.grad(result, values)
        assert torch.isfinite(result) and torch.isfinite(gradient).all()


@methods
def test_forward_hooks_run(method: Method) -> None:
    instance = method.make(SHAPE)
    seen: list[Tensor] = []
    instance.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    instance.register_forward_hook(lambda module, args, output: output * 0 + 7)
    values = losses()
    assert float(instance(values).detach()) == 7.0
    assert len(seen) == 1 and seen[0] is values


@methods
def test_repr_and_str(method: Method) -> None:
    instance = method.make(SHAPE)
    assert repr(instance).startswith(f"{method.name}(") and repr(instance).endswith(")")
    assert str(instance) == method.name


@methods
@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.zeros(0), ValueError, "empty"),
        (torch.tensor([[1.0, float("nan"), 1.0]] * 2), ValueError, "NaN or infinite"),
        (torch.tensor([[1.0, float("inf"), 1.0]] * 2), ValueError, "NaN or infinite"),
        (torch.ones(SHAPE, dtype=torch.int64), TypeError, "floating-point"),
        ([[1.0, 2.0, 3.0]] * 2, TypeError, "torch.Tensor"),
    ],
    ids=["empty", "nan", "inf", "int", "list"],
)
def test_bad_losses_are_rejected(
    method: Method, bad: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        method.make(SHAPE)(bad)


@only(lambda m: m.traits.exact_gradient)
def test_gradient_is_exact(method: Method) -> None:
    template = method.make(SHAPE).double()

    def function(values: Tensor) -> Tensor:
        torch.manual_seed(0)
        result: Tensor = copy.deepcopy(template)(values)
        return result

    assert torch.autograd.gradcheck(function, (losses().requires_grad_(),))


# --- state ------------------------------------------------------------------------------------


def state_calls(instance: nn.Module, count: int, start: int = 0) -> list[Tensor]:
    outputs = []
    for k in range(start, start + count):
        torch.manual_seed(k)
        outputs.append(instance(losses(seed=k)).detach())
        after_step = getattr(instance, "after_step", None)
        if after_step is not None:
            if hasattr(instance, "update"):
                instance.update(losses(seed=k) * 0.9)  # FAMO learns from the losses after a step
            else:
                after_step(None)
    return outputs


@only(lambda m: m.traits.stateful)
def test_state_round_trip_and_reset(method: Method) -> None:
    expected = state_calls(method.make(SHAPE), 5)
    first = method.make(SHAPE)
    state_calls(first, 2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    fresh = method.make(SHAPE)
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    for got, want in zip(state_calls(fresh, 3, start=2), expected[2:], strict=True):
        assert torch.equal(got, want)
    first.reset()  # type: ignore[operator]
    for got, want in zip(state_calls(first, 5), expected, strict=True):
        assert torch.equal(got, want)


@only(lambda m: m.traits.stateful)
def test_another_scalarizers_state_is_refused(method: Method) -> None:
    stateful = [m for m in METHODS if m.traits.stateful]
    other = stateful[(stateful.index(method) + 1) % len(stateful)]
    with pytest.raises((ValueError, RuntimeError)):
        method.make(SHAPE).load_state_dict(other.make(SHAPE).state_dict())


@methods
def test_hyper_parameters_are_validated_on_assignment(method: Method) -> None:
    instance = method.make(SHAPE)
    for name in type(instance).hyper_parameters:  # type: ignore[attr-defined]
        value = getattr(instance, name)
        setattr(instance, name, value)
        for bad in (-1.0, float("nan"), "big"):
            with pytest.raises((ValueError, TypeError)):
                setattr(instance, name, bad)
        assert getattr(instance, name) == value
