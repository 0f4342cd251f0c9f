"""``jdoptim.backward``: the one-call form equals ``backward`` then ``jac_to_grad``."""

from __future__ import annotations

import pytest
import torch

import jdoptim
from jdoptim.aggregation import Mean, UPGrad, UPGradWeighting
from jdoptim.autojac import backward, jac_to_grad
from tests.autojac._models import MODELS, losses_of, make


@pytest.mark.parametrize("name", MODELS)
def test_equals_backward_then_jac_to_grad(name: str) -> None:
    model, x, y = make(name)
    backward(losses_of(model, x, y))
    expected_weights = jac_to_grad(model.parameters(), UPGrad())
    expected = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    weights = jdoptim.backward(losses_of(model, x, y), UPGrad())
    assert weights is not None and expected_weights is not None
    torch.testing.assert_close(weights, expected_weights)
    for param, grad in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, grad)
        assert not hasattr(param, "jac")


def test_mean_gives_the_gradient_of_the_mean_loss() -> None:
    model, x, y = make("cnn")
    expected = torch.autograd.grad(losses_of(model, x, y).mean(), list(model.parameters()))
    params = list(model.parameters())
    jdoptim.backward(losses_of(model, x, y), Mean(), params, parallel_chunk_size=3)
    for param, grad in zip(params, expected, strict=True):
        torch.testing.assert_close(param.grad, grad)


def test_errors_leave_grad_untouched() -> None:
    model, x, y = make("mlp")
    with pytest.raises(TypeError, match="Aggregator"):
        jdoptim.backward(losses_of(model, x, y), UPGradWeighting())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"inputs\[0\].*does not require grad"):
        jdoptim.backward(losses_of(model, x, y), UPGrad(), [torch.ones(2)])
    assert all(p.grad is None for p in model.parameters())
