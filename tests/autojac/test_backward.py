"""``backward``: the Jacobian accumulated into ``.jac``, against ``torch.func.jacrev``."""

from __future__ import annotations

import pytest
import torch

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
    assert torch.equal(other.jac, torch.zeros(2, 3, dtype=torch.float64))  # type: ignore[attr-defined]
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


def test_jac_tensors_left_multiply_the_jacobian() -> None:
    model, x, y = make("mlp")
    losses = losses_of(model, x, y)
    initial = torch.randn(2, *losses.shape, dtype=losses.dtype)
    backward(losses, jac_tensors=initial)
    for param, expected in zip(model.parameters(), jacobian_rows(model, x, y), strict=True):
        want = torch.tensordot(initial, expected, dims=1)
        torch.testing.assert_close(param.jac, want)  # type: ignore[attr-defined]
