"""``backward``: the Jacobian accumulated into ``.jac``, against ``torch.func.jacrev``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim.autojac import backward, clear_jac
from tests.autojac._models import MODELS, jacobian_rows, losses_of, make


@pytest.mark.parametrize("name", MODELS)
def test_fills_jac_of_every_leaf(name: str) -> None:
    model, x, y = make(name)
    backward(losses_of(model, x, y))
    for param, expected in zip(model.parameters(), jacobian_rows(model, x, y), strict=True):
        torch.testing.assert_close(param.jac, expected)  # type: ignore[attr-defined]
        assert param.grad is None


@pytest.mark.parametrize("chunk", [1, 2, None])
def test_accumulates_over_calls(chunk: int | None) -> None:
    model, x, y = make("mlp")
    params = list(model.parameters())
    backward(losses_of(model, x, y), params, parallel_chunk_size=chunk)
    backward(2 * losses_of(model, x, y), params, parallel_chunk_size=chunk)
    for param, expected in zip(params, jacobian_rows(model, x, y), strict=True):
        torch.testing.assert_close(param.jac, 3 * expected)  # type: ignore[attr-defined]


def test_mismatched_rows_are_an_error_and_nothing_changes() -> None:
    model, x, y = make("mlp")
    params = list(model.parameters())
    backward(losses_of(model, x, y), params)
    before = [p.jac.clone() for p in params]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"inputs\[0\] already has a \.jac of shape \(6, 4, 5\)"):
        backward(losses_of(model, x[:3], y[:3]), params)
    for param, saved in zip(params, before, strict=True):
        assert torch.equal(param.jac, saved)  # type: ignore[attr-defined]


def test_repeated_inputs_accumulate_once() -> None:
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    backward(x**2, [x, x])
    torch.testing.assert_close(x.jac, torch.diag(2 * x.detach()))  # type: ignore[attr-defined]


def test_non_leaf_input_and_unreached_input() -> None:
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    hidden = x * 3
    other = torch.ones(3, dtype=torch.float64, requires_grad=True)
    backward(hidden.sin(), [hidden, other])
    torch.testing.assert_close(hidden.jac, torch.diag(hidden.detach().cos()))  # type: ignore[attr-defined]
    # Like .grad, an unreached input gets no Jacobian (None), not a zero one.
    assert other.jac is None  # type: ignore[attr-defined]
    assert x.grad is None and not hasattr(x, "jac")


def test_clear_jac() -> None:
    model, x, y = make("mlp")
    backward(losses_of(model, x, y))
    clear_jac(model.parameters())
    assert not any(hasattr(p, "jac") for p in model.parameters())
    single = torch.ones(2, requires_grad=True)
    backward(single * 2)
    clear_jac(single)
    clear_jac(single)  # clearing twice is harmless
    assert not hasattr(single, "jac")


def test_errors() -> None:
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"tensors\[0\].*does not require grad"):
        backward(torch.ones(3))
    with pytest.raises(ValueError, match=r"inputs\[0\].*does not require grad"):
        backward(w * 2, [torch.ones(3)])
    with pytest.raises(ValueError, match=r"tensors\[0\].*does not depend"):
        backward(w * 2, [torch.ones(3, requires_grad=True)])


@pytest.mark.parametrize(
    "module",
    [nn.Embedding(10, 3, sparse=True), nn.EmbeddingBag(10, 3, sparse=True)],
    ids=["Embedding", "EmbeddingBag"],
)
def test_sparse_gradient_modules_are_rejected_before_anything_changes(module: nn.Module) -> None:
    head = nn.Linear(3, 1)
    indices = torch.tensor([[1, 2], [3, 4], [5, 6]])
    embedded = module(indices) if isinstance(module, nn.EmbeddingBag) else module(indices).sum(1)
    losses = head(embedded).squeeze(-1)
    with pytest.raises(
        ValueError, match=r"sparse gradients \(its weight of shape \(10, 3\)\).*sparse=False"
    ):
        backward(losses)
    assert all(
        not hasattr(p, "jac") and p.grad is None for p in [*module.parameters(), *head.parameters()]
    )


def test_jac_tensors_left_multiply_the_jacobian() -> None:
    model, x, y = make("mlp")
    losses = losses_of(model, x, y)
    initial = torch.randn(2, *losses.shape, dtype=losses.dtype)
    backward(losses, jac_tensors=initial)
    for param, expected in zip(model.parameters(), jacobian_rows(model, x, y), strict=True):
        want = torch.tensordot(initial, expected, dims=1)
        torch.testing.assert_close(param.jac, want)  # type: ignore[attr-defined]
