"""``jac``: the Jacobian of some outputs with respect to some inputs, like ``torch.autograd.grad``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

from jdoptim.autojac._graph import (
    as_tensor_list,
    check_chunk_size,
    check_dense_gradients,
    check_inputs,
    check_outputs,
    check_outputs_depend_on_inputs,
    reachable_leaves,
    reached_by,
    unique,
)
from jdoptim.autojac._vjp import identity_cotangents, vjp_rows


def resolve_arguments(
    outputs: Tensor | Sequence[Tensor],
    inputs: Tensor | Iterable[Tensor] | None,
    parallel_chunk_size: int | None,
    outputs_name: str = "outputs",
) -> tuple[list[Tensor], list[Tensor]]:
    """Validated outputs and inputs (``None``: the leaves requiring grad the outputs depend on)."""
    output_list = as_tensor_list(outputs, outputs_name)
    check_outputs(output_list, outputs_name)
    check_chunk_size(parallel_chunk_size)
    check_dense_gradients(output_list)
    if inputs is None:
        return output_list, reachable_leaves(output_list)
    input_list = as_tensor_list(inputs, "inputs")
    check_inputs(input_list, "inputs")
    check_outputs_depend_on_inputs(output_list, input_list, outputs_name)
    return output_list, input_list


def jacobians(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    *,
    retain_graph: bool,
    parallel_chunk_size: int | None,
) -> list[Tensor]:
    """The Jacobian ``[m, *input.shape]`` of the ``m`` flattened output elements, per input."""
    num_rows = sum(output.numel() for output in outputs)
    return vjp_rows(
        outputs,
        inputs,
        num_rows,
        identity_cotangents(outputs),
        retain_graph=retain_graph,
        chunk_size=parallel_chunk_size,
    )


def jacobians_of_inputs(
    tensors: Tensor | Sequence[Tensor],
    inputs: Tensor | Iterable[Tensor] | None,
    *,
    retain_graph: bool,
    parallel_chunk_size: int | None,
) -> tuple[list[Tensor], list[Tensor | None]]:
    """The distinct inputs and their Jacobians, for the ``backward``-style functions.

    An input the tensors do not reach gets ``None`` rather than zero rows, as autograd leaves the
    ``.grad`` of an unused tensor ``None`` (so that weight decay and momentum leave it alone).
    """
    output_list, input_list = resolve_arguments(
        tensors, inputs, parallel_chunk_size, outputs_name="tensors"
    )
    input_list = unique(input_list)
    reached = reached_by(output_list, input_list)
    used = [tensor for tensor, hit in zip(input_list, reached, strict=True) if hit]
    used_results = iter(
        jacobians(
            output_list, used, retain_graph=retain_graph, parallel_chunk_size=parallel_chunk_size
        )
    )
    results = [next(used_results) if hit else None for hit in reached]
    return input_list, results


def jac(
    outputs: Tensor | Sequence[Tensor],
    inputs: Tensor | Iterable[Tensor] | None = None,
    *,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> tuple[Tensor, ...]:
    """The Jacobian of the elements of ``outputs`` with respect to each of ``inputs``.

    The ``m`` elements of ``outputs`` (one tensor or several, of any shapes) are flattened and
    concatenated in order; the result has one tensor of shape ``[m, *input.shape]`` per input, in
    the order of ``inputs``, so ``torch.cat([j.flatten(1) for j in jac(losses, params)], dim=1)``
    is the ``[m, n]`` Jacobian matrix. Inputs the outputs do not reach get zero rows.

    Args:
        outputs: the tensor or tensors to differentiate; each must require grad.
        inputs: tensors requiring grad (leaves or not), or ``None`` for every leaf requiring grad
            that the outputs depend on (in graph order; pass them explicitly when order matters).
        retain_graph: keep the graph so that it can be differentiated again.
        parallel_chunk_size: Jacobian rows per batched backward pass (``None``: all rows in one
            pass; ``1``: one plain backward pass per row, which needs no vmap support).

    Raises:
        ValueError: an output does not require grad or depends on none of the inputs, an input
            does not require grad, or ``parallel_chunk_size`` is not a positive int.
    """
    output_list, input_list = resolve_arguments(outputs, inputs, parallel_chunk_size)
    return tuple(
        jacobians(
            output_list,
            input_list,
            retain_graph=retain_graph,
            parallel_chunk_size=parallel_chunk_size,
        )
    )
