"""Each closed-form rule gives the per-instance gradients of its layer (hand-written loop).

A rule gets the saved input ``x`` and task gradients ``dY`` of one or several calls; its terms
must equal the rows ``gᵢₜ = ∂(dY[t, i] · yᵢ)/∂θ`` (summed over calls), computed one instance and
task at a time with autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from jdoptim.autogram._rules import CLOSED_FORMS, closed_form_rule

Build = Callable[[], tuple[nn.Module, Tensor, int]]


def _layers() -> dict[str, Build]:
    def x(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=torch.float64)

    return {
        "linear": lambda: (nn.Linear(4, 3), x(5, 4), 0),
        "linear_positions": lambda: (nn.Linear(4, 3), x(5, 2, 4), 0),
        "linear_batch_dim_1": lambda: (nn.Linear(4, 3), x(2, 5, 4), 1),
        "conv1d": lambda: (nn.Conv1d(2, 3, 3, padding=1, stride=2), x(5, 2, 7), 0),
        "conv2d": lambda: (nn.Conv2d(2, 3, 3, padding=1, dilation=2), x(5, 2, 6, 6), 0),
        "conv3d": lambda: (nn.Conv3d(2, 2, 2, padding=1), x(3, 2, 3, 3, 3), 0),
        "embedding": lambda: (nn.Embedding(6, 3, padding_idx=2), torch.randint(6, (5, 4)), 0),
        "layer_norm": lambda: (nn.LayerNorm((2, 3)), x(5, 4, 2, 3), 0),
        "layer_norm_bias_only": lambda: (nn.LayerNorm(3, elementwise_affine=True), x(5, 3), 0),
        "group_norm": lambda: (nn.GroupNorm(2, 4), x(5, 4, 3), 0),
    }


def _loop_rows(
    module: nn.Module, calls: list[tuple[Tensor, Tensor]], batch_dim: int
) -> dict[str, Tensor]:
    """``[B * T, n]`` per parameter: row ``(i, t)`` is ``Σ_calls ∂(dY[t, i] · y_i)/∂θ``."""
    names = [name for name, _ in module.named_parameters(recurse=False)]
    params = [p for _, p in module.named_parameters(recurse=False)]
    outputs = [(module(x), dy) for x, dy in calls]
    tasks, batch = calls[0][1].shape[0], calls[0][1].shape[1 + batch_dim]
    rows: dict[str, list[Tensor]] = {name: [] for name in names}
    for i in range(batch):
        for t in range(tasks):
            value = sum(
                (y.select(batch_dim, i) * dy[t].select(batch_dim, i)).sum() for y, dy in outputs
            )
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            for name, p, g in zip(names, params, grads, strict=True):
                rows[name].append((g if g is not None else torch.zeros_like(p)).reshape(-1))
    return {name: torch.stack(r) for name, r in rows.items()}


@pytest.mark.parametrize("layer", list(_layers()))
@pytest.mark.parametrize("tasks", [1, 2])
@pytest.mark.parametrize("n_calls", [1, 2])
def test_rule_terms_equal_per_instance_gradients(layer: str, tasks: int, n_calls: int) -> None:
    torch.manual_seed(0)
    module, x, batch_dim = _layers()[layer]()
    module = module.double()
    if layer == "layer_norm_bias_only":
        assert isinstance(module, nn.LayerNorm)
        module.weight = None  # type: ignore[assignment]
    rule = closed_form_rule(module)
    assert rule is not None
    inputs = [x] + [x.flip(batch_dim) for _ in range(n_calls - 1)]
    with torch.no_grad():
        shapes = [module(xi).shape for xi in inputs]
    calls = [
        (xi, torch.randn(tasks, *shape, dtype=torch.float64))
        for xi, shape in zip(inputs, shapes, strict=True)
    ]
    terms = rule.terms(module, [(xi, dy, batch_dim) for xi, dy in calls], torch.float64)
    expected = _loop_rows(module, calls, batch_dim)
    assert terms.keys() == {name for name, p in expected.items()}
    weights = torch.randn(x.shape[batch_dim], tasks, dtype=torch.float64)
    for name, rows in expected.items():
        term = terms[name]
        torch.testing.assert_close(term.gramian(), rows @ rows.T, atol=1e-10, rtol=1e-10)
        grad = term.weighted_grad(weights)
        torch.testing.assert_close(grad.reshape(-1), weights.reshape(-1) @ rows)
    assert batch_dim in rule.batch_dims(module, tuple(shapes[0]))


class OwnForward(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x * 2)


class SameForward(nn.Linear):
    pass


def test_sparse_embedding_has_the_closed_form_with_a_sparse_grad() -> None:
    module = nn.Embedding(6, 3, sparse=True).double()
    rule = closed_form_rule(module)
    assert rule is not None
    x = torch.randint(6, (4, 2))
    dy = torch.randn(1, 4, 2, 3, dtype=torch.float64)
    term = rule.terms(module, [(x, dy, 0)], torch.float64)["weight"]
    weights = torch.randn(4, 1, dtype=torch.float64)
    grad = term.weighted_grad(weights)
    assert grad.is_sparse
    module.weight.grad = None
    (module(x) * (dy[0] * weights.view(4, 1, 1))).sum().backward()
    torch.testing.assert_close(grad.to_dense(), module.weight.grad.to_dense())  # type: ignore[union-attr]


def test_table_covers_stock_forwards_only() -> None:
    assert closed_form_rule(SameForward(2, 2)) is CLOSED_FORMS[nn.Linear]
    assert closed_form_rule(OwnForward(2, 2)) is None
    assert closed_form_rule(nn.ReLU()) is None


@pytest.mark.parametrize(
    "module",
    [
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(2, 2, 3, padding="same"),
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
        nn.Conv3d(2, 2, 2, dilation=2),
        nn.Embedding(5, 2, max_norm=1.0),
        nn.Embedding(5, 2, scale_grad_by_freq=True),
    ],
    ids=repr,
)
def test_configurations_outside_the_closed_forms(module: nn.Module) -> None:
    assert closed_form_rule(module) is None
