"""Jacobian rows as batched vector-Jacobian products, with a row-by-row fallback.

Row ``r`` of the Jacobian of ``outputs`` with respect to ``inputs`` is the VJP of the ``r``-th
cotangent (a row of the identity for a plain Jacobian). Rows are computed ``chunk_size`` at a time
with ``torch.autograd.grad(..., is_grads_batched=True)``, which vmaps one backward pass over the
chunk. When vmap cannot run the graph (an op without a batching rule, such as a custom function
calling ``.item()``), the rows are computed one backward pass each, after one
:class:`VmapFallbackWarning`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from jdoptim._warnings import warn
from jdoptim.autojac._graph import graph_signature

#: ``cotangents(start, stop)``: for each output, the cotangents of rows ``start..stop-1``, of shape
#: ``[stop - start, *output.shape]``.
Cotangents = Callable[[int, int], list[Tensor]]


#: Signatures (see :func:`graph_signature`) of graphs on which batched backward passes have run.
#: Only on those may a batched pass free the graph (``retain_graph=False``): elsewhere the graph is
#: kept, so that a failed batched pass can fall back to row-by-row passes on the intact graph.
_VMAPPABLE_GRAPHS: set[frozenset[str]] = set()
_MAX_REMEMBERED_GRAPHS = 256


class VmapFallbackWarning(UserWarning):
    """Batched backward passes failed on this graph; Jacobian rows are computed one at a time.

    The result is the same, only slower. Pass ``parallel_chunk_size=1`` to skip the batched attempt
    (and this warning), or silence it with ``warnings.filterwarnings("ignore",
    category=VmapFallbackWarning)``.
    """


def identity_cotangents(outputs: Sequence[Tensor]) -> Cotangents:
    """Cotangents of the plain Jacobian: rows of the identity over the flattened outputs."""
    offsets = []
    offset = 0
    for output in outputs:
        offsets.append(offset)
        offset += output.numel()

    def cotangents(start: int, stop: int) -> list[Tensor]:
        blocks = []
        for output, first in zip(outputs, offsets, strict=True):
            block = output.new_zeros(stop - start, output.numel())
            low, high = max(start, first), min(stop, first + output.numel())
            if low < high:
                rows = torch.arange(low - start, high - start, device=output.device)
                cols = torch.arange(low - first, high - first, device=output.device)
                block[rows, cols] = 1
            blocks.append(block.reshape(stop - start, *output.shape))
        return blocks

    return cotangents


def vjp_rows(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    num_rows: int,
    cotangents: Cotangents,
    *,
    retain_graph: bool,
    chunk_size: int | None,
) -> list[Tensor]:
    """For each input, the ``[num_rows, *input.shape]`` stack of the VJPs of the cotangent rows.

    Inputs the outputs do not reach get zero rows. With a single chunk the batched result is
    returned as is; with several, each chunk is copied into one preallocated tensor per input, so
    the Jacobian is never held twice.
    """
    size = num_rows if chunk_size is None else min(chunk_size, num_rows)
    bounds = [(start, min(start + size, num_rows)) for start in range(0, num_rows, size)]
    batched = size > 1
    signature = graph_signature(outputs) if batched else frozenset()
    trusted = signature in _VMAPPABLE_GRAPHS
    result: list[Tensor] | None = None
    for index, (start, stop) in enumerate(bounds):
        last = index == len(bounds) - 1
        chunk_cotangents = cotangents(start, stop)
        block = None
        if batched:
            # A failed batched pass may have freed part of the graph, which the fallback needs: a
            # batched pass only frees the graph where batched passes are known to run.
            retain = retain_graph or not last or not trusted
            try:
                block = _batched_vjp(outputs, inputs, chunk_cotangents, retain)
                trusted = True
                _remember_vmappable(signature)
            except (RuntimeError, NotImplementedError) as error:
                batched = False
                _VMAPPABLE_GRAPHS.discard(signature)
                block = _fall_back(outputs, inputs, chunk_cotangents, retain, error)
        if block is None:
            block = _row_by_row_vjp(outputs, inputs, chunk_cotangents, retain_graph or not last)
        if len(bounds) == 1:
            return block
        if result is None:
            result = [tensor.new_empty(num_rows, *tensor.shape) for tensor in inputs]
        for target, rows in zip(result, block, strict=True):
            target[start:stop] = rows
    assert result is not None
    return result


def _remember_vmappable(signature: frozenset[str]) -> None:
    if len(_VMAPPABLE_GRAPHS) >= _MAX_REMEMBERED_GRAPHS:
        _VMAPPABLE_GRAPHS.clear()
    _VMAPPABLE_GRAPHS.add(signature)


def _fall_back(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    cotangents: list[Tensor],
    retained: bool,
    error: BaseException,
) -> list[Tensor]:
    """The rows of a failed batched pass, one backward pass each, announced by one warning."""
    try:
        block = _row_by_row_vjp(outputs, inputs, cotangents, retained)
    except RuntimeError as row_error:
        if retained:
            # The graph was intact, so this is a genuine error: no misleading warning.
            raise
        raise RuntimeError(
            f"A batched backward pass (vmap) failed ({error}) on a graph like those it had run on "
            f"before, and computing the rows one at a time then failed too ({row_error}), likely "
            "because the failed pass had freed the graph. Pass parallel_chunk_size=1 for this "
            "graph."
        ) from error
    warn(
        "Batched backward passes (vmap) failed on this graph, so the Jacobian is computed one row "
        f"at a time instead (same result, slower). Cause: {error}",
        VmapFallbackWarning,
    )
    return block


def _zeros_for_none(
    grads: Sequence[Tensor | None], inputs: Sequence[Tensor], rows: int
) -> list[Tensor]:
    return [
        # Batched gradients can be expanded views (stride 0); callers reshape and add in place.
        grad.contiguous() if grad is not None else tensor.new_zeros(rows, *tensor.shape)
        for grad, tensor in zip(grads, inputs, strict=True)
    ]


def _batched_vjp(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: list[Tensor], retain: bool
) -> list[Tensor]:
    grads = torch.autograd.grad(
        outputs,
        inputs,
        grad_outputs=cotangents,
        retain_graph=retain,
        allow_unused=True,
        is_grads_batched=True,
    )
    return _zeros_for_none(grads, inputs, cotangents[0].shape[0])


def _row_by_row_vjp(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: list[Tensor], retain: bool
) -> list[Tensor]:
    rows = cotangents[0].shape[0]
    result = [tensor.new_empty(rows, *tensor.shape) for tensor in inputs]
    for row in range(rows):
        grads = torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=[cotangent[row] for cotangent in cotangents],
            retain_graph=retain or row < rows - 1,
            allow_unused=True,
        )
        for target, grad in zip(result, grads, strict=True):
            if grad is None:
                target[row] = 0
            else:
                target[row] = grad
    return result
