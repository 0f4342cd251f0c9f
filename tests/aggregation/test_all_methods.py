"""The checks every exported aggregator and weighting passes, generated from ``__all__`` and traits.

Shape, dtype and device; ``m = 1`` and ``n = 0``; scale (1e-20 to 1e20, float32 and float64);
never NaN on finite hostile inputs; hooks; repr; bad input; differentiability (exact, or no graph
at all); non-conflict; state round trip and reset; hyper-parameters validated and forwarded.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from jdoptim import Stateful
from jdoptim.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator, Weighting
from tests.aggregation._jacobians import jacobian_from_seed, jacobian_sequence, jacobians
from tests.aggregation._methods import METHOD_IDS, METHODS, TRAITS, Method, exported_methods
from tests.aggregation._stateful_checks import (
    assert_reset_restarts,
    assert_resumes_identically,
    assert_state_follows_dtype,
)

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
DTYPES = [torch.float32, torch.float64]
methods = pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)


def only(predicate: Callable[[Method], bool]) -> pytest.MarkDecorator:
    chosen = [method for method in METHODS if predicate(method)]
    return pytest.mark.parametrize("method", chosen, ids=[m.name for m in chosen])


def rows_for(method: Method) -> int:
    return max(method.traits.min_rows, 5)


def run(method: Method, jacobian: Tensor, seed: int = 0, module: nn.Module | None = None) -> Tensor:
    """The method's output (direction or weights) on a fresh instance, with seeded draws."""
    instance = module if module is not None else method.make(jacobian.shape[0])
    torch.manual_seed(seed)
    result: Tensor = instance(method.input_of(jacobian))
    return result


def direction(method: Method, jacobian: Tensor, output: Tensor) -> Tensor:
    return output if method.is_aggregator else output @ jacobian


def sample(method: Method, dtype: torch.dtype = torch.float64, cols: int = 7) -> Tensor:
    return jacobian_from_seed(3, rows_for(method), cols, rank=4, dtype=dtype)


# --- the table itself ---------------------------------------------------------------------------


def test_every_exported_method_has_traits() -> None:
    """A new method must get a line in tests/aggregation/_methods.py to be exported."""
    assert exported_methods() == sorted(TRAITS)


@methods
def test_traits_agree_with_the_methods(method: Method) -> None:
    instance = method.make(rows_for(method))
    traits = method.traits
    assert traits.stateful == any(isinstance(m, Stateful) for m in instance.modules())
    if isinstance(instance, Aggregator):
        assert traits.full_jacobian == (not isinstance(instance, GramianWeightedAggregator))
        assert traits.differentiable == instance.differentiable
        weighting = instance.weighting if isinstance(instance, WeightedAggregator) else None
    else:
        assert isinstance(instance, Weighting)
        assert traits.full_jacobian == (instance.input_kind == "matrix")
        assert traits.differentiable == instance.differentiable
        weighting = instance
    if weighting is not None and weighting.scale_invariant:
        assert traits.scale_invariant  # a class's claim is checked below


# --- shapes, dtypes, devices, edge sizes --------------------------------------------------------


@methods
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_keeps_shape_dtype_and_device(method: Method, dtype: torch.dtype, device: str) -> None:
    jacobian = sample(method, dtype).to(device)
    instance = method.make(jacobian.shape[0]).to(device)
    output = run(method, jacobian, module=instance)
    expected = jacobian.shape[1] if method.is_aggregator else jacobian.shape[0]
    assert output.shape == (expected,)
    assert output.dtype == dtype and output.device == jacobian.device
    assert torch.isfinite(output).all()


@methods
def test_one_row(method: Method) -> None:
    jacobian = jacobian_from_seed(0, 1, 4, rank=1)
    if method.traits.min_rows > 1:
        with pytest.raises(ValueError, match="rows"):
            run(method, jacobian)
        return
    output = run(method, jacobian)
    assert output.shape == ((4,) if method.is_aggregator else (1,))
    assert torch.isfinite(output).all()


@methods
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_parameters(method: Method, dtype: torch.dtype) -> None:
    """``n = 0``: aggregators return an empty vector, weightings finite weights."""
    jacobian = torch.zeros(rows_for(method), 0, dtype=dtype)
    output = run(method, jacobian)
    assert output.dtype == dtype
    assert output.shape == ((0,) if method.is_aggregator else (jacobian.shape[0],))
    assert torch.isfinite(output).all()


@only(lambda m: m.is_aggregator)
def test_zero_jacobian_gives_zero(method: Method) -> None:
    jacobian = torch.zeros(rows_for(method), 6, dtype=torch.float64)
    assert torch.equal(run(method, jacobian), torch.zeros(6, dtype=torch.float64))


# --- scale and hostile inputs -------------------------------------------------------------------


@methods
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_extreme_scales(method: Method, dtype: torch.dtype, scale: float) -> None:
    """Finite at any scale; a scale-invariant method's direction scales with its input."""
    jacobian = sample(method)
    reference = run(method, jacobian.to(dtype)).double()  # the same draws as below
    scaled_input = (method.input_of(jacobian) * scale).to(dtype)
    instance = method.make(jacobian.shape[0])
    torch.manual_seed(0)
    output = instance(scaled_input)
    assert output.dtype == dtype
    assert torch.isfinite(output).all()
    if not method.traits.scale_invariant:
        return
    expected = reference * scale if method.is_aggregator else reference
    got = output.double()
    tolerance = 1e-4 if dtype == torch.float32 else 1e-6
    error = (got - expected).norm() / expected.norm().clamp_min(1e-300)
    assert error < tolerance


def hostile_jacobians(rows: int) -> dict[str, Tensor]:
    base = jacobian_from_seed(5, rows, 6, rank=min(rows, 4))
    zero_row = base.clone()
    zero_row[1] = 0
    opposite = torch.cat([base[:1], -base[:1], base[2:]])
    mixed = base * torch.logspace(-8, 8, rows, dtype=torch.float64)[:, None]
    return {
        "zero": torch.zeros(rows, 6, dtype=torch.float64),
        "zero-row": zero_row,
        "duplicated": torch.cat([base[:2], base[:2], base[4:]])[:rows],
        "opposite": opposite,
        "rank-one": base[:1].expand(rows, 6) * torch.arange(1.0, rows + 1, dtype=torch.float64)[:, None],
        "mixed-magnitudes": mixed,
    }  # fmt: skip


@methods
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case", ["zero", "zero-row", "duplicated", "opposite", "rank-one", "mixed-magnitudes"]
)
def test_never_nan_on_finite_input(method: Method, dtype: torch.dtype, case: str) -> None:
    jacobian = hostile_jacobians(rows_for(method))[case].to(dtype)
    instance = method.make(jacobian.shape[0])
    for call in range(2):  # the second call also meets the state the first one left
        output = run(method, jacobian, seed=call, module=instance)
        assert torch.isfinite(output).all()


# --- hooks, repr, bad input ---------------------------------------------------------------------


@methods
def test_forward_hooks_run(method: Method) -> None:
    jacobian = sample(method)
    instance = method.make(jacobian.shape[0])
    seen: list[Tensor] = []
    instance.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    instance.register_forward_hook(lambda module, args, output: output * 0 + 7)
    value = method.input_of(jacobian)
    output = instance(value)
    assert len(seen) == 1 and seen[0] is value
    assert torch.equal(output, torch.full_like(output, 7.0))


@methods
def test_repr_and_str(method: Method) -> None:
    instance = method.make(5)
    assert repr(instance).startswith(f"{method.name}(") and repr(instance).endswith(")")
    assert str(instance) == method.name.removesuffix("Weighting")


_NAN = float("nan")
_INF = float("inf")
BAD_MATRICES = {
    "1d": (torch.ones(5), ValueError, "2-dimensional"),
    "3d": (torch.ones(5, 3, 2), ValueError, "2-dimensional"),
    "no-rows": (torch.ones(0, 3), ValueError, "at least one row"),
    "nan": (torch.tensor([[1.0, _NAN]] * 5), ValueError, "NaN or infinite"),
    "inf": (torch.tensor([[1.0, _INF]] * 5), ValueError, "NaN or infinite"),
    "int": (torch.ones(5, 3, dtype=torch.int64), TypeError, "floating-point"),
    "list": ([[1.0, 2.0]] * 5, TypeError, "torch.Tensor"),
}
BAD_SQUARES = {
    "1d": (torch.ones(5), ValueError, "2-dimensional"),
    "non-square": (torch.ones(5, 4), ValueError, "square"),
    "empty": (torch.ones(0, 0), ValueError, "at least one row"),
    "nan": (torch.full((5, 5), _NAN), ValueError, "NaN or infinite"),
    "inf": (torch.full((5, 5), _INF), ValueError, "NaN or infinite"),
    "int": (torch.eye(5, dtype=torch.int64), TypeError, "floating-point"),
    "list": ([[1.0] * 5] * 5, TypeError, "torch.Tensor"),
}
BAD_GRAMIANS = {
    **BAD_SQUARES,
    "non-symmetric": (torch.triu(torch.ones(5, 5)), ValueError, "symmetric"),
}


def _validated_as(method: Method) -> str:
    """What a method's input is checked as: weightings of ``m`` alone (Mean, Sum...) take any
    ``[m, k]`` matrix, as TorchJD's."""
    made = method.make(max(method.traits.min_rows, 2))
    if isinstance(made, Weighting) and not made.requires_values:
        return "matrix"
    return method.input_kind


def bad_input_cases() -> list[tuple[Method, str]]:
    cases = []
    for method in METHODS:
        kind = _validated_as(method)
        table = (
            BAD_GRAMIANS
            if kind == "gramian"
            else BAD_SQUARES
            if kind == "cross_gramian"
            else BAD_MATRICES
        )
        cases += [(method, case) for case in table]
    return cases


@pytest.mark.parametrize(
    ("method", "case"), bad_input_cases(), ids=[f"{m.name}-{c}" for m, c in bad_input_cases()]
)
def test_bad_inputs_are_rejected(method: Method, case: str) -> None:
    kind = _validated_as(method)
    table = (
        BAD_GRAMIANS
        if kind == "gramian"
        else BAD_SQUARES
        if kind == "cross_gramian"
        else BAD_MATRICES
    )
    bad, error, match = table[case]
    with pytest.raises(error, match=match):
        method.make(5)(bad)


# --- differentiability and non-conflict ---------------------------------------------------------


@methods
def test_differentiable_or_no_graph(method: Method) -> None:
    """Either autograd is exact (gradcheck), or the output does not require grad at all."""
    jacobian = jacobian_from_seed(7, max(method.traits.min_rows, 3), 5, rank=3)
    template = method.make(jacobian.shape[0])

    def function(matrix: Tensor) -> Tensor:
        torch.manual_seed(0)
        return copy.deepcopy(template)(method.input_of(matrix, matrix.flip(1)))

    variable = jacobian.clone().requires_grad_()
    output = function(variable)
    if method.traits.differentiable and output.requires_grad:
        assert torch.autograd.gradcheck(function, (variable,))
    elif method.traits.differentiable:
        # Outputs that do not depend on J (Mean's weights, Krum's selection) have derivative 0.
        nudge = 1e-7 * torch.randn(jacobian.shape, generator=torch.Generator().manual_seed(0))
        assert torch.equal(function(jacobian + nudge.double()), output)
    else:
        assert not output.requires_grad
        torch.testing.assert_close(output, function(jacobian))


@only(lambda m: m.traits.non_conflicting)
@pytest.mark.parametrize("seed", range(4))
def test_non_conflicting(method: Method, seed: int) -> None:
    jacobian = jacobian_from_seed(seed, rows_for(method), 4 + seed, rank=min(4 + seed, 5))
    output = direction(method, jacobian, run(method, jacobian))
    scale = float(jacobian.norm(dim=1).max() * output.norm())
    assert bool((jacobian @ output >= -1e-6 * scale).all())


@only(lambda m: m.traits.permutation_invariant and m.traits.deterministic)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_permutation_invariance(method: Method, data: st.DataObject) -> None:
    jacobian = data.draw(jacobians(max_rows=6, min_rows=method.traits.min_rows))
    permutation = torch.tensor(data.draw(st.permutations(range(jacobian.shape[0]))))
    expected = direction(method, jacobian, run(method, jacobian))
    permuted = jacobian[permutation]
    result = direction(method, permuted, run(method, permuted))
    scale = float(jacobian.abs().max())
    # CAGrad is exact to about sqrt(reg_eps) = 1e-5 (relative) on singular Gramians.
    assert torch.allclose(result, expected, atol=2e-5 * scale, rtol=1e-4)


@only(lambda m: m.traits.deterministic and not m.traits.stateful)
def test_repeated_calls_agree(method: Method) -> None:
    jacobian = sample(method)
    instance = method.make(jacobian.shape[0])
    value = method.input_of(jacobian)
    assert torch.equal(instance(value), instance(value))


# --- state ------------------------------------------------------------------------------------


def state_inputs(method: Method, count: int = 6) -> list[Tensor]:
    rows = max(method.traits.min_rows, 3)
    sequence = jacobian_sequence(count + 1, rows=rows, cols=6)
    return [method.input_of(sequence[k], sequence[k + 1]) for k in range(count)]


@only(lambda m: m.traits.stateful)
def test_state_round_trip_reset_and_dtype(method: Method) -> None:
    inputs = state_inputs(method)
    rows = inputs[0].shape[0]
    assert_resumes_identically(lambda: method.make(rows), inputs, split=2)
    assert_reset_restarts(lambda: method.make(rows), inputs)
    assert_state_follows_dtype(lambda: method.make(rows), inputs)


@only(lambda m: m.traits.stateful)
def test_another_methods_state_is_refused(method: Method) -> None:
    stateful = [m for m in METHODS if m.traits.stateful]
    other = stateful[(stateful.index(method) + 1) % len(stateful)]
    source = other.make(3)
    source(state_inputs(other, 1)[0])
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    with pytest.raises((ValueError, RuntimeError)):
        method.make(3).load_state_dict(torch.load(buffer, weights_only=False))


# --- hyper-parameters ---------------------------------------------------------------------------


def hyper_parameter_owner(instance: nn.Module) -> nn.Module:
    return instance.weighting if isinstance(instance, WeightedAggregator) else instance


@methods
def test_hyper_parameters_are_validated_and_forwarded(method: Method) -> None:
    instance = method.make(5)
    owner = hyper_parameter_owner(instance)
    for name in type(owner).hyper_parameters:  # type: ignore[attr-defined]
        value = getattr(owner, name)
        assert getattr(instance, name) is value or torch.equal(getattr(instance, name), value)
        setattr(instance, name, value)  # the current value is accepted, and reaches the owner
        assert name not in vars(instance) or instance is owner
        with pytest.raises((ValueError, TypeError)):
            setattr(instance, name, object())
        current = getattr(owner, name)
        assert current is value or (isinstance(value, Tensor) and torch.equal(current, value))
