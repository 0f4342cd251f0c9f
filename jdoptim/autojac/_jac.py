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
from jdoptim.autojac._vjp import Cotangents, identity_cotangents, vjp_rows


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


def initial_jacobian_rows(
    outputs: Sequence[Tensor], initial: Tensor | Sequence[Tensor], name: str
) -> tuple[int, Cotangents]:
    """The number of rows and the cotangents of user-given initial Jacobians.

    ``initial`` holds one tensor per output, of shape ``[k, *output.shape]`` with the same ``k``
    for all: row ``r`` of the result is the vector-Jacobian product of their slices ``r``.
    """
    rows = as_tensor_list(initial, name)
    if len(rows) != len(outputs):
        raise ValueError(
            f"{name} must hold one tensor per output tensor ({len(outputs)}), got {len(rows)}."
        )
    for index, (row, output) in enumerate(zip(rows, outputs, strict=True)):
        if row.ndim == 0 or row.shape[1:] != output.shape:
            raise ValueError(
                f"{name}[{index}] must have shape [k, *{tuple(output.shape)}] (k Jacobian rows of "
                f"that output's shape), got {tuple(row.shape)}."
            )
    num_rows = {row.shape[0] for row in rows}
    if len(num_rows) != 1:
        raise ValueError(
            f"Every tensor of {name} must have the same number of rows (first dim), got "
            f"{sorted(num_rows)}."
        )
    return num_rows.pop(), lambda start, stop: [row[start:stop] for row in rows]


def jacobians(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    *,
    retain_graph: bool,
    parallel_chunk_size: int | None,
    initial: Tensor | Sequence[Tensor] | None = None,
    initial_name: str = "jac_outputs",
) -> list[Tensor]:
    """The Jacobian ``[m, *input.shape]`` of the ``m`` flattened output elements, per input.

    With ``initial`` (one ``[k, *output.shape]`` tensor per output), the ``k`` rows are instead
    the products of those rows with the Jacobian, as ``grad_outputs`` does for one row in
    ``torch.autograd.grad``.
    """
    if initial is None:
        num_rows = sum(output.numel() for output in outputs)
        cotangents = identity_cotangents(outputs)
    else:
        num_rows, cotangents = initial_jacobian_rows(outputs, initial, initial_name)
    return vjp_rows(
        outputs,
        inputs,
        num_rows,
        cotangents,
        retain_graph=retain_graph,
        chunk_size=parallel_chunk_size,
    )


def jacobians_of_inputs(
    tensors: Tensor | Sequence[Tensor],
    inputs: Tensor | Iterable[Tensor] | None,
    *,
    retain_graph: bool,
    parallel_chunk_size: int | None,
    jac_tensors: Tensor | Sequence[Tensor] | None = None,
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
            output_list,
            used,
            retain_graph=retain_graph,
            parallel_chunk_size=parallel_chunk_size,
            initial=jac_tensors,
            initial_name="jac_tensors",
        )
    )
    results = [next(used_results) if hit else None for hit in reached]
    return input_list, results


def jac(
    outputs: Tensor | Sequence[Tensor],
    inputs: Tensor | Iterable[Tensor] | None = None,
    *,
    jac_outputs: Tensor | Sequence[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> tuple[Tensor, ...]:
    """The Jacobian of the elements of ``outputs`` with respect to each of ``inputs``.

    The ``m`` elements of ``outputs`` (one tensor or several, of any shapes) are flattened and
    concatenated in order; the result has one tensor of shape ``[m, *input.shape]`` per input, in
    the order of ``inputs``, so ``torch.cat([j.reshape(len(j), -1) for j in jac(losses, params)], dim=1)``
    is the ``[m, n]`` Jacobian matrix. Inputs the outputs do not reach get zero rows.

    Args:
        outputs: the tensor or tensors to differentiate; each must require grad.
        inputs: tensors requiring grad (leaves or not), or ``None`` for every leaf requiring grad
            that the outputs depend on (in graph order; pass them explicitly when order matters).
        jac_outputs: optional initial Jacobians, the analogue of ``grad_outputs`` in
            :func:`torch.autograd.grad`: one tensor of shape ``[k, *output.shape]`` per output, the
            same ``k`` for all. The result then has ``k`` rows, row ``r`` being the
            vector-Jacobian product of the slices ``r`` (chain rule through a known Jacobian).
            ``None``: the identity, so one row per output element.
        retain_graph: keep the graph so that it can be differentiated again.
        parallel_chunk_size: Jacobian rows per batched backward pass (``None``: all rows in one
            pass; ``1``: one plain backward pass per row, which needs no vmap support).

    Raises:
        ValueError: an output does not require grad or depends on none of the inputs, an input
            does not require grad, ``parallel_chunk_size`` is not a positive int, or
            ``jac_outputs`` does not match the outputs' number and shapes.
    """
    output_list, input_list = resolve_arguments(outputs, inputs, parallel_chunk_size)
    return tuple(
        jacobians(
            output_list,
            input_list,
            retain_graph=retain_graph,
            parallel_chunk_size=parallel_chunk_size,
            initial=jac_outputs,
        )
    )
