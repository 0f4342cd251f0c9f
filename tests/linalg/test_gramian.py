from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jdoptim.linalg import (
    flatten_generalized_gramian,
    gramian_from_jacobian,
    normalize_gramian,
    power_of_two_scale,
    regularize_gramian,
    reshape_gramian,
)


def test_gramian_is_exactly_symmetric_and_equals_j_jt() -> None:
    jacobian = torch.randn(5, 9)
    gramian = gramian_from_jacobian(jacobian)
    assert torch.equal(gramian, gramian.T)
    assert torch.allclose(gramian, jacobian @ jacobian.T, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 3), min_size=0, max_size=3), cols=st.integers(1, 4))
def test_flatten_is_the_gramian_of_the_flattened_jacobian(shape: list[int], cols: int) -> None:
    jacobian = torch.randn(*shape, cols, dtype=torch.float64)
    flat = jacobian.reshape(-1, cols)
    k = len(shape)
    # G[i1..ik, jk..j1] = <J[i1..ik], J[j1..jk]>
    left, right = "abc"[:k], "ABC"[:k]
    generalized = torch.einsum(f"{left}z,{right}z->{left}{right[::-1]}", jacobian, jacobian)
    assert torch.allclose(flatten_generalized_gramian(generalized), flat @ flat.T)
    assert torch.equal(
        reshape_gramian(flatten_generalized_gramian(generalized), tuple(shape)), generalized
    )


def test_power_of_two_scale() -> None:
    for value in (3.0, 1e20, 1e-20, 0.7):
        scale = float(power_of_two_scale(torch.tensor([value, -value / 2], dtype=torch.float64)))
        assert math.log2(scale).is_integer()
        assert value / math.sqrt(2) <= scale <= value * math.sqrt(2)
    assert float(power_of_two_scale(torch.zeros(3))) == 1.0
    assert float(power_of_two_scale(torch.zeros(0))) == 1.0


def test_normalize_gramian_divides_by_the_trace_at_any_scale() -> None:
    jacobian = torch.randn(3, 4, dtype=torch.float64)
    gramian = jacobian @ jacobian.T
    expected = gramian / gramian.trace()
    for scale, dtype in ((1.0, torch.float64), (1e-300, torch.float64), (1e30, torch.float32)):
        scaled = (gramian * scale).to(dtype)
        assert torch.allclose(normalize_gramian(scaled).double(), expected, atol=1e-6)
    assert torch.equal(normalize_gramian(torch.zeros(2, 2)), torch.zeros(2, 2))


def test_regularize_adds_to_the_diagonal() -> None:
    result = regularize_gramian(torch.ones(2, 2, dtype=torch.float64), 0.5)
    assert torch.equal(result, torch.tensor([[1.5, 1.0], [1.0, 1.5]], dtype=torch.float64))
