"""Turning terms into the Gramian of the losses (in their layout) and into ``.grad``."""

from __future__ import annotations

import pytest
import torch

from jdoptim.autogram import grad_from_terms, gramian_from_terms, instance_major_order
from jdoptim.autogram._terms import MaterializedTerm
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
