"""Each path on its own: differentiate, combine, apply, against torch.func Jacobians."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from jdoptim.aggregation import MeanWeighting, UPGrad, UPGradWeighting
from jdoptim.autogram import Engine
from jdoptim.linalg import flatten_generalized_gramian
from jdoptim.paths import (
    GramianPath,
    JacobianPath,
    RowsPart,
    StepContext,
    concat_rows,
    make_path,
    resolve_method,
)


def _problem() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return model, torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)


def _losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x) - y) ** 2  # [B, 2]: instances along dim 0


def _rows(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    params = dict(model.named_parameters())
    jac = jacrev(lambda p: _losses_of(model, p, x, y))(params)
    return torch.cat([j.reshape(_losses(model, x, y).numel(), -1) for j in jac.values()], dim=1)


def _losses_of(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return (functional_call(model, params, (x,)) - y) ** 2


def _context(model: nn.Module, batch_dim: int | None) -> StepContext:
    engine = Engine(model, batch_dim=batch_dim)
    return StepContext(
        params=lambda: list(model.parameters()), engine=lambda: engine, batch_dim=batch_dim
    )


def _grad(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_the_gramian_path_writes_the_weighted_sum_of_gradients() -> None:
    model, x, y = _problem()
    path = make_path(resolve_method(UPGradWeighting(), None, None), _context(model, 0))
    assert isinstance(path, GramianPath)
    record = path.apply(path.differentiate(_losses(model, x, y)))
    rows = _rows(model, x, y).detach()
    gramian = flatten_generalized_gramian(record.gramian)
    torch.testing.assert_close(gramian, rows @ rows.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(_grad(model), record.weights.reshape(-1) @ rows, atol=1e-12, rtol=0)


@pytest.mark.parametrize("weighting", [UPGradWeighting(), MeanWeighting()])
def test_combined_micro_batches_equal_the_whole_batch(weighting: nn.Module) -> None:
    model, x, y = _problem()
    path = make_path(resolve_method(weighting, None, None), _context(model, 0))
    path.start_watching()
    parts = [path.differentiate(_losses(model, x[s], y[s])) for s in (slice(0, 2), slice(2, 5))]
    record = path.apply(path.combine(parts))
    combined = _grad(model)
    for p in model.parameters():
        p.grad = None
    whole = path.apply(path.differentiate(_losses(model, x, y)))
    torch.testing.assert_close(record.weights, whole.weights, atol=1e-12, rtol=0)
    torch.testing.assert_close(combined, _grad(model), atol=1e-12, rtol=0)


def test_rows_of_micro_batches_concatenate_along_the_instance_dim() -> None:
    model, x, y = _problem()
    pieces = (slice(0, 2), slice(2, 5))
    parts = [
        RowsPart(_losses(model, x[s], y[s]).T.detach(), _rows_t(model, x[s], y[s])) for s in pieces
    ]
    combined = concat_rows(parts, batch_dim=1)
    torch.testing.assert_close(combined.losses, _losses(model, x, y).T.detach())
    torch.testing.assert_close(combined.rows, _rows_t(model, x, y), atol=1e-12, rtol=0)


def _rows_t(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Rows of the transposed losses ``[2, B]`` in their flat order."""
    params = dict(model.named_parameters())
    jac = jacrev(lambda p: _losses_of(model, p, x, y).T)(params)
    return torch.cat([j.reshape(2 * x.shape[0], -1) for j in jac.values()], dim=1).detach()


def test_per_task_rows_add_up_over_micro_batches() -> None:
    model, x, y = _problem()
    path = make_path(resolve_method(None, UPGrad(), None), _context(model, None))
    assert isinstance(path, JacobianPath)
    first = path.differentiate(_losses(model, x[:2], y[:2]).mean(dim=0))
    second = path.differentiate(_losses(model, x[2:], y[2:]).mean(dim=0))
    combined = path.combine([first, second])
    assert isinstance(combined, RowsPart)
    torch.testing.assert_close(combined.rows, first.rows + second.rows)


def test_a_path_adds_to_what_grad_held() -> None:
    model, x, y = _problem()
    path = make_path(resolve_method(MeanWeighting(), None, None), _context(model, 0))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    path.apply(path.differentiate(_losses(model, x, y)))
    expected = _rows(model, x, y).detach().mean(dim=0) + 1
    torch.testing.assert_close(_grad(model), expected, atol=1e-12, rtol=0)
