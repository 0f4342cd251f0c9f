"""Turning terms into the Gramian of the losses (in their layout) and into ``.grad``."""

from __future__ import annotations

import pytest
import torch

from jdoptim.autogram import (
    grad_from_terms,
    gramian_from_terms,
    instance_major_order,
    jacobian_scale,
)
from jdoptim.autogram._terms import EmbeddingTerm, MaterializedTerm, OuterTerm
from jdoptim.linalg import reshape_gramian


def _losses_jacobian(shape: tuple[int, ...], batch_dim: int | None, n: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(*shape, n, dtype=torch.float64)  # row of each loss, in the losses' layout


@pytest.mark.parametrize(
    ("shape", "batch_dim"), [((4,), 0), ((4, 3), 0), ((3, 4), 1), ((3, 4), -1), ((2, 3), None)]
)
def test_gramian_in_the_losses_layout(shape: tuple[int, ...], batch_dim: int | None) -> None:
    jacobian = _losses_jacobian(shape, batch_dim, 5)
    flat = jacobian.reshape(-1, 5)
    order = instance_major_order(shape, batch_dim)
    halves = [MaterializedTerm(flat[order, :2], (2,)), MaterializedTerm(flat[order, 2:], (3,))]
    gramian = gramian_from_terms(halves, shape, batch_dim)
    expected = reshape_gramian(flat @ flat.T, shape)
    torch.testing.assert_close(gramian, expected, atol=1e-12, rtol=0.0)


def test_instance_major_order_puts_the_batch_dim_first() -> None:
    order = instance_major_order((2, 3), 1)  # losses [T=2, B=3]
    assert order.tolist() == [0, 3, 1, 4, 2, 5]
    assert instance_major_order((2, 3), None).tolist() == list(range(6))


def test_scalar_shape_gives_a_0d_gramian() -> None:
    term = MaterializedTerm(torch.tensor([[3.0, 4.0]]), (2,))
    gramian = gramian_from_terms([term], (), None)
    assert gramian.shape == () and float(gramian) == 25.0


def test_result_is_exactly_symmetric() -> None:
    torch.manual_seed(0)
    term = MaterializedTerm(torch.randn(7, 50), (50,))
    gramian = gramian_from_terms([term], (7,), 0)
    assert torch.equal(gramian, gramian.T)


def test_rows_that_do_not_match_the_shape_are_rejected() -> None:
    term = MaterializedTerm(torch.randn(4, 2), (2,))
    with pytest.raises(ValueError, match="4 rows"):
        gramian_from_terms([term], (5,), 0)
    with pytest.raises(ValueError, match="at least one term"):
        gramian_from_terms([], (5,), 0)


@pytest.mark.parametrize(("shape", "batch_dim"), [((4, 3), 0), ((3, 4), 1), ((2, 3), None)])
def test_grad_adds_the_weighted_rows(shape: tuple[int, ...], batch_dim: int | None) -> None:
    jacobian = _losses_jacobian(shape, batch_dim, 5)
    flat = jacobian.reshape(-1, 5)
    order = instance_major_order(shape, batch_dim)
    param = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    param.grad = torch.ones(5, dtype=torch.float64)
    weights = torch.randn(shape, dtype=torch.float64)
    grad_from_terms([(param, MaterializedTerm(flat[order], (5,)))], weights, batch_dim)
    torch.testing.assert_close(param.grad, 1 + weights.reshape(-1) @ flat)


def _terms(scale_a: float, scale_b: float) -> list:
    torch.manual_seed(0)
    return [
        OuterTerm(torch.randn(1, 4, 3, 5) * scale_a, torch.randn(4, 3, 6) * scale_b, (5, 6)),
        MaterializedTerm(torch.randn(4, 7) * scale_a * scale_b, (7,)),
        EmbeddingTerm(
            torch.randn(1, 4, 3, 5) * scale_a * scale_b, torch.randint(9, (4, 3)), (9, 5)
        ),
    ]


def _float64_gramian(terms: list) -> torch.Tensor:
    double = [
        t.with_factors([f.double() if f.is_floating_point() else f for f, _ in t.factors()])
        for t in terms
    ]
    return sum(t.gramian() for t in double)


def test_normal_ranges_are_bit_identical_to_the_direct_sum() -> None:
    terms = _terms(3.0, 0.01)
    direct = sum(t.gramian() for t in terms)
    assert torch.equal(gramian_from_terms(terms, (4,), 0), (direct + direct.T) / 2)
    assert float(jacobian_scale(terms)) == 1.0


@pytest.mark.parametrize(
    ("scale_a", "scale_b"),
    # 1e-40: subnormal float32 factors, whose normalising power of two is no float32
    [(1e-20, 1e-5), (1e20, 1.0), (1e25, 1e-30), (1e-40, 1.0), (1.0, 1e-41)],
)
def test_scaled_gramian_of_extreme_factors(scale_a: float, scale_b: float) -> None:
    terms = _terms(scale_a, scale_b)
    s = jacobian_scale(terms)
    gramian = gramian_from_terms(terms, (4,), 0, scale=s)
    expected = _float64_gramian(terms) / s**2
    assert torch.isfinite(gramian).all()
    torch.testing.assert_close(
        gramian.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max())
    )


def test_half_precision_factors_and_autocast() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(1, 4, 3, 5) * 300, torch.randn(4, 3, 6) * 300  # a b products beyond fp16
    half = OuterTerm(a.half(), b.half(), (5, 6))
    with torch.autocast("cpu", dtype=torch.float16):
        gramian = gramian_from_terms([half], (4,), 0)
    assert gramian.dtype == torch.float32 and torch.isfinite(gramian).all()
    expected = OuterTerm(a.half().double(), b.half().double(), (5, 6)).gramian()
    torch.testing.assert_close(gramian.double(), expected, rtol=1e-5, atol=0.0)
