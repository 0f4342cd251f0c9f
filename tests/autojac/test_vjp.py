"""Batched VJPs: identity cotangents, chunking and the row-by-row fallback when vmap fails."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from jdoptim.autojac import VmapFallbackWarning, backward, jac
from jdoptim.autojac._graph import graph_signature
from jdoptim.autojac._vjp import _VMAPPABLE_GRAPHS, identity_cotangents


class DoubleWithItem(torch.autograd.Function):
    """``2 x``, whose backward calls ``.item()``: vmap has no batching rule for that."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        _ = grad.sum().item()
        return 2 * grad


def _unvmappable_losses(w: Tensor, x: Tensor) -> Tensor:
    return DoubleWithItem.apply(torch.tanh(x @ w)).pow(2).sum(dim=1)


def _hand_written_rows(losses: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    rows = [torch.autograd.grad(loss, inputs, retain_graph=True) for loss in losses]
    return [torch.stack(per_input) for per_input in zip(*rows, strict=True)]


def test_identity_cotangents_are_identity_rows() -> None:
    outputs = [torch.zeros(2, 3), torch.zeros(()), torch.zeros(4)]
    cotangents = identity_cotangents(outputs)
    eye = torch.eye(11)
    for start, stop in [(0, 11), (3, 8), (5, 7), (10, 11)]:
        blocks = cotangents(start, stop)
        assert [b.shape for b in blocks] == [
            (stop - start, 2, 3),
            (stop - start,),
            (stop - start, 4),
        ]
        flat = torch.cat([b.reshape(stop - start, -1) for b in blocks], dim=1)
        assert torch.equal(flat, eye[start:stop])


@pytest.mark.parametrize("chunk", [2, 4, None])
def test_fallback_warns_once_and_matches_hand_written_rows(chunk: int | None) -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    expected = _hand_written_rows(_unvmappable_losses(w, x), [w, x])
    with pytest.warns(VmapFallbackWarning, match="one row at a time") as record:
        result = jac(_unvmappable_losses(w, x), [w, x], parallel_chunk_size=chunk)
    assert len([r for r in record if r.category is VmapFallbackWarning]) == 1
    for got, want in zip(result, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_fallback_in_backward_fills_jac() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    (expected,) = _hand_written_rows(_unvmappable_losses(w, x), [w])
    with pytest.warns(VmapFallbackWarning):
        backward(_unvmappable_losses(w, x))
    torch.testing.assert_close(w.jac, expected)  # type: ignore[attr-defined]


def test_one_row_at_a_time_never_tries_vmap() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    expected = _hand_written_rows(_unvmappable_losses(w, x), [w])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = jac(_unvmappable_losses(w, x), [w], parallel_chunk_size=1)
    torch.testing.assert_close(result[0], expected[0])


def test_genuine_errors_propagate_without_fallback_warning() -> None:
    w = torch.randn(3, requires_grad=True)
    outputs = (w * w).exp()
    jac(outputs, w, parallel_chunk_size=2)  # the last chunk frees the graph
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="second time"):
            jac(outputs, w, parallel_chunk_size=2)


@pytest.fixture
def fresh_vmap_memory() -> Iterator[set[frozenset[str]]]:
    saved = set(_VMAPPABLE_GRAPHS)
    _VMAPPABLE_GRAPHS.clear()
    yield _VMAPPABLE_GRAPHS
    _VMAPPABLE_GRAPHS.clear()
    _VMAPPABLE_GRAPHS.update(saved)


def test_single_pass_frees_the_graph_once_vmap_is_known_to_work(
    fresh_vmap_memory: set[frozenset[str]],
) -> None:
    w = torch.randn(3, requires_grad=True)
    first = (w * w).exp()
    jac(first, w)  # unknown graph: kept whole in case the batched pass had failed
    jac(first, w)
    second = (w * w).exp()
    assert graph_signature([second]) in fresh_vmap_memory
    jac(second, w)
    with pytest.raises(RuntimeError, match="second time"):
        jac(second, w)


def test_failure_on_a_trusted_graph_falls_back_when_the_graph_survived(
    fresh_vmap_memory: set[frozenset[str]],
) -> None:
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    outputs = DoubleWithItem.apply(x @ w)  # fails at the first node, before anything is freed
    expected = _hand_written_rows(outputs.reshape(-1), [w])
    fresh_vmap_memory.add(graph_signature([outputs]))
    with pytest.warns(VmapFallbackWarning):
        (result,) = jac(outputs, w)
    torch.testing.assert_close(result, expected[0])
    assert not fresh_vmap_memory


def test_failure_on_a_trusted_graph_that_was_freed_is_a_clear_error(
    fresh_vmap_memory: set[frozenset[str]],
) -> None:
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    losses = _unvmappable_losses(w, x)  # pow's saved input is freed before the failing node
    fresh_vmap_memory.add(graph_signature([losses]))
    with pytest.raises(RuntimeError, match="parallel_chunk_size=1"):
        jac(losses, w)
