"""``jac`` against ``torch.func.jacrev`` on several architectures and graph shapes."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.func import jacrev

from jdoptim.autojac import jac
from tests.autojac._models import MODELS, jacobian_matrix, jacobian_rows, losses_of, make


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("chunk", [1, 2, None])
def test_matches_jacrev(name: str, chunk: int | None) -> None:
    model, x, y = make(name)
    params = list(model.parameters())
    result = jac(losses_of(model, x, y), params, parallel_chunk_size=chunk)
    expected = jacobian_rows(model, x, y)
    assert len(result) == len(params)
    for got, want in zip(result, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_inputs_none_are_the_leaves_in_parameter_order() -> None:
    model, x, y = make("mlp")
    losses = losses_of(model, x, y)
    result = jac(losses)
    for got, want in zip(result, jacobian_rows(model, x, y), strict=True):
        torch.testing.assert_close(got, want)


def test_concatenated_jacobians_give_the_jacobian_matrix() -> None:
    model, x, y = make("mlp")
    params = list(model.parameters())
    jacs = jac(losses_of(model, x, y), params)
    matrix = torch.cat([j.flatten(1) for j in jacs], dim=1)
    torch.testing.assert_close(matrix, jacobian_matrix(jacobian_rows(model, x, y)))


def test_several_outputs_of_different_shapes() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def outputs(w: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return (w @ b).sin(), (w**2).sum() + b.prod(), torch.outer(b, w[0])

    def flat(w: Tensor, b: Tensor) -> Tensor:
        return torch.cat([out.reshape(-1) for out in outputs(w, b)])

    expected = jacrev(flat, argnums=(0, 1))(w.detach(), b.detach())
    for chunk in (1, 2, None):
        result = jac(list(outputs(w, b)), [w, b], parallel_chunk_size=chunk)
        assert result[0].shape == (3 + 1 + 4, 3, 2)
        for got, want in zip(result, expected, strict=True):
            torch.testing.assert_close(got, want)


def test_unused_input_gets_zero_rows() -> None:
    model, x, y = make("mlp")
    unused = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    first, zeros = jac(losses_of(model, x, y), [next(model.parameters()), unused])
    torch.testing.assert_close(first, jacobian_rows(model, x, y)[0])
    assert zeros.shape == (x.shape[0], 2, 3)
    assert torch.equal(zeros, torch.zeros_like(zeros))


def test_repeated_inputs_and_reused_tensor() -> None:
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    outputs = x * x + x.sin() + x  # x appears three times in the graph
    first, second = jac(outputs, [x, x])
    expected = torch.diag(2 * x.detach() + x.detach().cos() + 1)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


def test_non_leaf_input() -> None:
    model, x, y = make("mlp")
    hidden = model[1](model[0](x))
    losses = (model[2:](hidden).squeeze(-1) - y) ** 2
    (result,) = jac(losses, hidden)
    expected = jacrev(lambda h: (model[2:](h).squeeze(-1) - y) ** 2)(hidden.detach())
    torch.testing.assert_close(result, expected)


def test_single_tensor_input_and_scalar_output() -> None:
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    (result,) = jac((x**3).sum(), x)
    torch.testing.assert_close(result, 3 * x.detach().unsqueeze(0) ** 2)
    assert result.is_contiguous()


def test_retain_graph_allows_a_second_call() -> None:
    model, x, y = make("mlp")
    losses = losses_of(model, x, y)
    first = jac(losses, retain_graph=True)
    second = jac(losses)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("chunk", [1, 2])
def test_graph_is_freed_without_retain_graph(chunk: int) -> None:
    model, x, y = make("mlp")
    losses = losses_of(model, x, y)
    jac(losses, parallel_chunk_size=chunk)
    with pytest.raises(RuntimeError, match="second time"):
        jac(losses, parallel_chunk_size=chunk)


def test_output_without_grad_is_an_error() -> None:
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"outputs\[1\].*does not require grad"):
        jac([w.sum(), torch.ones(2)], w)


def test_output_unrelated_to_inputs_is_named() -> None:
    w = torch.randn(3, requires_grad=True)
    v = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"outputs\[1\].*does not depend on any of the 1 inputs"):
        jac([w.sum(), v * 2], [w])


def test_input_without_grad_is_an_error() -> None:
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"inputs\[1\].*does not require grad"):
        jac(w * 2, [w, torch.randn(3)])


@pytest.mark.parametrize("chunk", [0, -2, 1.5, True])
def test_invalid_chunk_size(chunk: object) -> None:
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="parallel_chunk_size"):
        jac(w * 2, w, parallel_chunk_size=chunk)  # type: ignore[arg-type]


def test_empty_and_invalid_arguments() -> None:
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="at least one tensor"):
        jac([], w)
    with pytest.raises(ValueError, match="at least one tensor"):
        jac(w * 2, [])
    with pytest.raises(ValueError, match="no elements"):
        jac(w[:0] * 2, w)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        jac([w.sum(), 3.0], w)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="floating-point"):
        jac(w * 2, torch.ones(3, dtype=torch.long))


@pytest.mark.parametrize("chunk", [1, None])
def test_jac_outputs_left_multiply_the_jacobian(chunk: int | None) -> None:
    model, x, y = make("mlp")
    params = list(model.parameters())
    losses = losses_of(model, x, y)
    initial = torch.randn(3, *losses.shape, dtype=losses.dtype)
    result = jac(losses, params, jac_outputs=initial, parallel_chunk_size=chunk)
    matrix = jacobian_matrix(jacobian_rows(model, x, y))
    got = torch.cat([j.flatten(1) for j in result], dim=1)
    torch.testing.assert_close(got, initial @ matrix)


def test_jac_outputs_over_several_outputs_and_their_errors() -> None:
    w = torch.randn(3, requires_grad=True)
    a, b = w * 2, (w**2).sum()
    initial = [torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([0.0, 1.0])]
    (rows,) = jac([a, b], w, jac_outputs=initial, retain_graph=True)
    torch.testing.assert_close(rows, torch.stack([torch.tensor([2.0, 0.0, 0.0]), 2 * w.detach()]))
    with pytest.raises(ValueError, match="one tensor per output"):
        jac([a, b], w, jac_outputs=initial[:1], retain_graph=True)
    with pytest.raises(ValueError, match=r"must have shape \[k, \*\(3,\)\]"):
        jac([a, b], w, jac_outputs=[torch.ones(2, 4), torch.ones(2)], retain_graph=True)
    with pytest.raises(ValueError, match="same number of rows"):
        jac([a, b], w, jac_outputs=[torch.ones(2, 3), torch.ones(3)], retain_graph=True)
