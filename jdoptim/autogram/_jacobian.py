"""Exact per-row Jacobians through autograd: the fallback that works for any graph."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from jdoptim.autogram._terms import MaterializedTerm, Route, Term


@contextmanager
def without_vmap_fallback_warnings() -> Iterator[None]:
    """Silences functorch's note that an op runs its slow per-row vmap fallback (still exact)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        yield


# Rows of grad_outputs sent through one vmapped backward pass: bounds the memory of the batch.
_ROWS_PER_CHUNK = 64
# ... and their total number of elements: a backward pass keeps intermediates of about that size.
_ELEMENTS_PER_CHUNK = 2**20
# On the CPU, a vmapped backward pass of a few rows costs more than as many plain ones.
_PLAIN_ROWS_ON_CPU = 4


def batched_vjp(
    outputs: Sequence[Tensor | GradientEdge],
    inputs: Sequence[Tensor | GradientEdge],
    grad_outputs: Sequence[Tensor],
) -> list[Tensor | None]:
    """Vector-Jacobian products for a batch of cotangents, one per leading row of ``grad_outputs``.

    Returns, for each input, the ``[rows, *input.shape]`` stack of ``vᵀ ∂outputs/∂input`` (``None`` if
    the input does not influence the outputs). The graph is retained. Runs one vmapped backward pass
    (``is_grads_batched``) per chunk of rows and falls back to one pass per row for operations that
    have no batching rule.
    """
    rows = grad_outputs[0].shape[0]
    per_row = sum(g[0].numel() for g in grad_outputs) if rows > 0 else 1
    size = max(1, min(_ROWS_PER_CHUNK, _ELEMENTS_PER_CHUNK // max(per_row, 1)))
    chunks: list[list[Tensor | None]] = []
    chunk_grads: list[list[Tensor]] = []
    for start in range(0, rows, size):
        chunk = [g[start : start + size] for g in grad_outputs]
        chunk_grads.append(chunk)
        chunks.append(_vjp_chunk(outputs, inputs, chunk))
    if len(chunks) == 1:
        return chunks[0]
    merged: list[Tensor | None] = []
    for index in range(len(inputs)):
        parts = [chunk[index] for chunk in chunks]
        if all(part is None for part in parts):
            merged.append(None)
            continue
        template = next(p for p in parts if p is not None)
        merged.append(
            torch.cat(
                [
                    p if p is not None else template.new_zeros(len(c[0]), *template.shape[1:])
                    for p, c in zip(parts, chunk_grads, strict=True)
                ]
            )
        )
    return merged


def _vjp_chunk(
    outputs: Sequence[Tensor | GradientEdge],
    inputs: Sequence[Tensor | GradientEdge],
    grad_outputs: Sequence[Tensor],
) -> list[Tensor | None]:
    return [_dense(g) for g in _vjp_rows(outputs, inputs, grad_outputs)]


def _dense(grad: Tensor | None) -> Tensor | None:
    """Gradients of sparse parameters (``Embedding(sparse=True)``) as dense tensors."""
    return grad.to_dense() if grad is not None and grad.is_sparse else grad


def _vjp_rows(
    outputs: Sequence[Tensor | GradientEdge],
    inputs: Sequence[Tensor | GradientEdge],
    grad_outputs: Sequence[Tensor],
) -> list[Tensor | None]:
    rows = grad_outputs[0].shape[0]
    if not runs_per_row(rows, grad_outputs[0].device):
        try:
            with without_vmap_fallback_warnings():
                return list(
                    torch.autograd.grad(
                        list(outputs),  # type: ignore[arg-type]
                        list(inputs),  # type: ignore[arg-type]
                        list(grad_outputs),
                        retain_graph=True,
                        allow_unused=True,
                        is_grads_batched=True,
                    )
                )
        except RuntimeError as error:
            if "graph" in str(error) and "freed" in str(error):
                raise
            # Some backward formulas have no vmap rule; the per-row loop below is exact too.
    per_row = [
        torch.autograd.grad(
            list(outputs),  # type: ignore[arg-type]
            list(inputs),  # type: ignore[arg-type]
            [g[row] for g in grad_outputs],
            retain_graph=True,
            allow_unused=True,
        )
        for row in range(rows)
    ]
    result: list[Tensor | None] = []
    for index in range(len(inputs)):
        parts = [row_grads[index] for row_grads in per_row]
        if all(part is None for part in parts):
            result.append(None)
        elif rows == 1:
            part = _dense(parts[0])
            assert part is not None
            result.append(part.unsqueeze(0))
        else:
            dense = [_dense(p) for p in parts]
            result.append(torch.stack([_zeros_if_none(p, dense) for p in dense]))
    return result


def runs_per_row(rows: int, device: torch.device) -> bool:
    """Whether :func:`batched_vjp` runs ``rows`` cotangents as one plain backward pass each."""
    return rows == 1 or (rows <= _PLAIN_ROWS_ON_CPU and device.type == "cpu")


def _zeros_if_none(part: Tensor | None, parts: Sequence[Tensor | None]) -> Tensor:
    if part is not None:
        return part
    template = next(p for p in parts if p is not None)
    return torch.zeros_like(template)


def exact_terms(output: Tensor, params: list[Tensor], order: Tensor) -> list[tuple[Tensor, Term]]:
    """Per-row Jacobians of ``output`` w.r.t. ``params`` by batched autograd (any graph).

    Rows follow ``order``: row ``r`` differentiates ``output.flatten()[order[r]]``.
    """
    if not params:
        return []
    rows = order.numel()
    basis = torch.zeros(rows, rows, dtype=output.dtype, device=output.device)
    basis[torch.arange(rows, device=output.device), order.to(output.device)] = 1
    jacobians = batched_vjp([output], params, [basis.reshape(rows, *output.shape)])
    dtype = torch.promote_types(output.dtype, torch.float32)
    return [
        (p, MaterializedTerm(j.reshape(rows, -1).to(dtype), tuple(p.shape), Route.EXACT))
        for p, j in zip(params, jacobians, strict=True)
        if j is not None
    ]
