"""Behaviour every core aggregator shares: shapes, dtypes, devices, edge cases, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from tests.aggregation._jacobians import jacobian_from_seed, jacobians
from tests.aggregation._methods import METHOD_IDS, METHODS, Method

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
DTYPES = [torch.float32, torch.float64]
methods = pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)


def aggregate(method: Method, matrix: Tensor, seed: int = 0) -> Tensor:
    torch.manual_seed(seed)  # makes Random and PCGrad repeatable
    return method.make(matrix.shape[0])(matrix)


def sample(method: Method, dtype: torch.dtype = torch.float64, cols: int = 7) -> Tensor:
    return jacobian_from_seed(3, max(method.min_rows, 5), cols, rank=4, dtype=dtype)


@methods
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_keeps_dtype_and_device(method: Method, dtype: torch.dtype, device: str) -> None:
    matrix = sample(method, dtype).to(device)
    result = aggregate(method, matrix)
    assert result.shape == (matrix.shape[1],)
    assert result.dtype == dtype
    assert result.device == matrix.device
    assert torch.isfinite(result).all()


@methods
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_parameters_gives_an_empty_vector(method: Method, dtype: torch.dtype) -> None:
    matrix = torch.zeros(max(method.min_rows, 4), 0, dtype=dtype)
    result = aggregate(method, matrix)
    assert result.shape == (0,) and result.dtype == dtype


@methods
def test_zero_jacobian_gives_zero(method: Method) -> None:
    matrix = torch.zeros(max(method.min_rows, 4), 6, dtype=torch.float64)
    assert torch.equal(aggregate(method, matrix), torch.zeros(6, dtype=torch.float64))


@methods
def test_duplicated_rows_are_handled(method: Method) -> None:
    base = sample(method)
    matrix = torch.cat([base, base[:2]])  # exactly rank-deficient Gramian
    result = aggregate(method, matrix)
    assert result.shape == (matrix.shape[1],)
    assert torch.isfinite(result).all()


@methods
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_huge_and_tiny_scales(method: Method, dtype: torch.dtype, scale: float) -> None:
    """Every method's weights ignore the scale of J, so the result scales with J."""
    matrix = sample(method, torch.float64)
    expected = aggregate(method, matrix)
    scaled = (matrix * scale).to(dtype)
    result = aggregate(method, scaled)
    assert result.dtype == dtype
    assert torch.isfinite(result).all()
    tolerance = 1e-4 if dtype == torch.float32 else 1e-6
    error = (result.double() / scale - expected).norm() / expected.norm()
    assert error < tolerance


@pytest.mark.parametrize(
    "method", [m for m in METHODS if m.permutation_invariant], ids=lambda m: m.name
)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_permutation_invariance(method: Method, data: st.DataObject) -> None:
    matrix = data.draw(jacobians(max_rows=7, min_rows=method.min_rows))
    permutation = torch.tensor(data.draw(st.permutations(range(matrix.shape[0]))))
    expected = aggregate(method, matrix)
    result = aggregate(method, matrix[permutation])
    scale = matrix.abs().max()
    assert torch.allclose(result, expected, atol=1e-6 * float(scale), rtol=1e-5)


@pytest.mark.parametrize("method", [m for m in METHODS if m.deterministic], ids=lambda m: m.name)
def test_repeated_calls_agree(method: Method) -> None:
    matrix = sample(method)
    aggregator = method.make(matrix.shape[0])
    assert torch.equal(aggregator(matrix), aggregator(matrix))


@methods
def test_forward_hooks_run(method: Method) -> None:
    matrix = sample(method)
    aggregator = method.make(matrix.shape[0])
    calls: list[Tensor] = []
    aggregator.register_forward_pre_hook(lambda module, args: calls.append(args[0]))
    aggregator.register_forward_hook(lambda module, args, output: output * 0 + 7)
    result = aggregator(matrix)
    assert len(calls) == 1 and calls[0] is matrix
    assert torch.equal(result, torch.full_like(result, 7.0))


@methods
def test_repr_and_str(method: Method) -> None:
    aggregator = method.make(5)
    assert repr(aggregator).startswith(f"{method.name}(") and repr(aggregator).endswith(")")
    assert str(aggregator) == method.name


@methods
@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.ones(5), ValueError, "2-dimensional"),
        (torch.ones(5, 3, 2), ValueError, "2-dimensional"),
        (torch.ones(0, 3), ValueError, "at least one row"),
        (torch.tensor([[1.0, float("nan")]] * 5), ValueError, "NaN or infinite"),
        (torch.tensor([[1.0, float("inf")]] * 5), ValueError, "NaN or infinite"),
        (torch.ones(5, 3, dtype=torch.int64), TypeError, "floating-point"),
        ([[1.0, 2.0]] * 5, TypeError, "torch.Tensor"),
    ],
    ids=["1d", "3d", "no-rows", "nan", "inf", "int", "list"],
)
def test_bad_jacobians_are_rejected(
    method: Method, bad: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        method.make(5)(bad)  # type: ignore[arg-type]
