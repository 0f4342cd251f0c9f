"""``mtl_backward``: Jacobian descent for multi-task learning with a shared trunk."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from jdoptim._grad_layout import in_param_layout
from jdoptim.autojac._graph import (
    as_tensor_list,
    check_chunk_size,
    check_dense_gradients,
    check_inputs,
    check_outputs,
    reachable_leaves,
    reached_by,
    unique,
)
from jdoptim.autojac._jac_field import accumulate_jac
from jdoptim.autojac._vjp import vjp_rows


def mtl_backward(
    losses: Tensor | Sequence[Tensor],
    features: Tensor | Sequence[Tensor],
    *,
    grad_tensors: Sequence[Tensor] | None = None,
    tasks_params: Sequence[Iterable[Tensor]] | None = None,
    shared_params: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    """Gradients for the task heads and the Jacobian for the shared trunk, in one call.

    The model is a trunk with parameters ``θ`` computing ``features`` ``f(θ)`` and one head per
    task computing the scalar loss ``ℓ_t(f, φ_t)``. Each task's parameters ``φ_t`` receive their own
    loss's gradient in ``.grad`` (accumulated), and each shared parameter receives the ``[T, ...]``
    Jacobian of the ``T`` losses in ``.jac``, row ``t`` being ``(∂ℓ_t/∂f)(∂f/∂θ)``: the heads are
    differentiated once each down to the features, then the trunk once for all tasks with batched
    backward passes (see :func:`jac`), not once per loss element. Aggregate with
    :func:`jac_to_grad` (``shared_params``, aggregator).

    Args:
        losses: one scalar loss per task (a sequence, or a 1-D tensor of ``T`` losses).
        features: the last shared representation (a tensor or several), that every loss depends on.
        grad_tensors: optional initial gradients, the analogue of ``grad_tensors`` in
            :func:`torch.autograd.backward`: one per task, shaped like that task's tensor. With
            them, ``losses`` may hold non-scalar task tensors, and task ``t``'s row is the gradient
            of ``(losses[t] * grad_tensors[t]).sum()``. ``None``: the losses must be scalars.
        tasks_params: for each task, its head's parameters. ``None``: the leaves requiring grad
            that each loss depends on without going through the features.
        shared_params: the trunk's parameters. ``None``: every leaf requiring grad the features
            depend on.
        retain_graph: keep the graph so that it can be differentiated again.
        parallel_chunk_size: tasks per batched backward pass through the trunk (see :func:`jac`).

    Raises:
        ValueError: a loss is not a scalar (without ``grad_tensors``) or does not require grad, a
            feature or param does not require grad, a param is both shared and
            task-specific, ``tasks_params`` does not have one entry per loss, or ``grad_tensors``
            does not have one tensor of the right shape per loss.
    """
    if grad_tensors is None:
        loss_list = _scalar_losses(losses)
        initial_grads: list[Tensor | None] = [None] * len(loss_list)
    else:
        loss_list = _task_tensors(losses)
        initial_grads = list(_initial_gradients(loss_list, grad_tensors))
    feature_list = as_tensor_list(features, "features")
    check_outputs(feature_list, "features")
    check_chunk_size(parallel_chunk_size)
    check_dense_gradients(feature_list)
    shared = _shared_params(shared_params, feature_list)
    heads = _tasks_params(tasks_params, loss_list, feature_list, shared)
    # A loss that reaches a shared param other than through the features (an L2 penalty on the
    # trunk inside a task's loss): its trunk rows are then its whole gradients, by one backward
    # pass per task through the trunk, before the heads' passes free the graph.
    whole_rows = (
        _whole_gradients(loss_list, shared, initial_grads)
        if _reaches_past_features(loss_list, feature_list, shared)
        else None
    )

    # A loss computed without the features is a task that does not use the trunk: its row of the
    # trunk's Jacobian is zero, and its head still gets its gradient (as in TorchJD).
    feature_grads: list[list[Tensor]] = [[] for _ in feature_list]
    head_grads = []
    for task, (loss, head) in enumerate(zip(loss_list, heads, strict=True)):
        # Heads may share nodes (a 1-D losses tensor shares its stacking node), so only the last
        # task's pass may free them; it does not reach the trunk, which the batched pass needs.
        grads = torch.autograd.grad(
            loss,
            [*feature_list, *head],
            grad_outputs=initial_grads[task],
            retain_graph=retain_graph or task < len(loss_list) - 1,
            allow_unused=True,
        )
        for index, feature in enumerate(feature_list):
            grad = grads[index]
            feature_grads[index].append(grad if grad is not None else torch.zeros_like(feature))
        head_grads.append(grads[len(feature_list) :])
    if whole_rows is not None:
        accumulate_jac(shared, whole_rows)
        _add_head_grads(heads, head_grads)
        return
    cotangents = [torch.stack(grads) for grads in feature_grads]
    # Shared params the features do not reach get .jac = None (no .grad later), not zero rows.
    reached = reached_by(feature_list, shared)
    used = [param for param, hit in zip(shared, reached, strict=True) if hit]
    used_jacobians = iter(
        vjp_rows(
            feature_list,
            used,
            len(loss_list),
            lambda start, stop: [cotangent[start:stop] for cotangent in cotangents],
            retain_graph=retain_graph,
            chunk_size=parallel_chunk_size,
        )
        if used
        else []
    )
    accumulate_jac(shared, [next(used_jacobians) if hit else None for hit in reached])
    _add_head_grads(heads, head_grads)


def _add_head_grads(
    heads: Sequence[Sequence[Tensor]], head_grads: Sequence[Sequence[Tensor | None]]
) -> None:
    for head, grads in zip(heads, head_grads, strict=True):
        for param, grad in zip(head, grads, strict=True):
            if grad is None:
                continue
            if param.grad is None:
                param.grad = in_param_layout(grad.contiguous(), param)
            else:
                param.grad += grad


def _reaches_past_features(
    losses: list[Tensor], features: list[Tensor], shared: list[Tensor]
) -> bool:
    """Whether some loss depends on a shared param through another path than the features."""
    shared_ids = {id(param) for param in shared}
    return any(id(leaf) in shared_ids for leaf in reachable_leaves(losses, stop_at=features))


def _whole_gradients(
    losses: list[Tensor], shared: list[Tensor], initial_grads: list[Tensor | None]
) -> list[Tensor | None]:
    """Each shared param's ``[T, ...]`` Jacobian of the losses by every path (``None`` for a
    param no loss reaches); the graph is kept for the heads' passes."""
    rows: list[list[Tensor | None]] = [
        list(
            torch.autograd.grad(
                loss, shared, grad_outputs=initial, retain_graph=True, allow_unused=True
            )
        )
        for loss, initial in zip(losses, initial_grads, strict=True)
    ]
    jacobians: list[Tensor | None] = []
    for index, param in enumerate(shared):
        column = [task_rows[index] for task_rows in rows]
        if all(grad is None for grad in column):
            jacobians.append(None)
        else:
            jacobians.append(
                torch.stack([torch.zeros_like(param) if g is None else g for g in column])
            )
    return jacobians


def _scalar_losses(losses: Tensor | Sequence[Tensor]) -> list[Tensor]:
    loss_list = _task_tensors(losses)
    for index, loss in enumerate(loss_list):
        if loss.ndim != 0:
            raise ValueError(
                f"losses[{index}] must be a scalar (one loss per task), got shape "
                f"{tuple(loss.shape)}. Reduce each task's loss to a scalar first."
            )
    return loss_list


def _task_tensors(losses: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(losses, Tensor) and losses.ndim == 1:
        loss_list = list(losses.unbind())
    else:
        loss_list = as_tensor_list(losses, "losses")
    check_outputs(loss_list, "losses")
    return loss_list


def _initial_gradients(losses: list[Tensor], grad_tensors: Sequence[Tensor]) -> list[Tensor]:
    grads = as_tensor_list(grad_tensors, "grad_tensors")
    if len(grads) != len(losses):
        raise ValueError(
            f"grad_tensors must hold one tensor per task ({len(losses)}), got {len(grads)}."
        )
    for index, (grad, loss) in enumerate(zip(grads, losses, strict=True)):
        if grad.shape != loss.shape:
            raise ValueError(
                f"grad_tensors[{index}] must have the shape of losses[{index}], "
                f"{tuple(loss.shape)}, got {tuple(grad.shape)}."
            )
    return grads


def _shared_params(params: Iterable[Tensor] | None, features: list[Tensor]) -> list[Tensor]:
    if params is None:
        return reachable_leaves(features)
    shared = unique(as_tensor_list(params, "shared_params"))
    check_inputs(shared, "shared_params")
    return shared


def _tasks_params(
    tasks_params: Sequence[Iterable[Tensor]] | None,
    losses: list[Tensor],
    features: list[Tensor],
    shared: list[Tensor],
) -> list[list[Tensor]]:
    shared_ids = {id(param) for param in shared}
    if tasks_params is None:
        # A shared param a loss also reaches past the features is still the trunk's.
        heads = [
            [
                leaf
                for leaf in reachable_leaves([loss], stop_at=features)
                if id(leaf) not in shared_ids
            ]
            for loss in losses
        ]
    else:
        if isinstance(tasks_params, Tensor) or len(tasks_params) != len(losses):
            raise ValueError(
                f"tasks_params must hold one iterable of params per loss ({len(losses)}), got "
                f"{len(tasks_params)} entries."
            )
        heads = [
            unique(as_tensor_list(params, f"tasks_params[{task}]"))
            for task, params in enumerate(tasks_params)
        ]
        for task, head in enumerate(heads):
            for index, param in enumerate(head):
                if not param.requires_grad:
                    raise ValueError(
                        f"tasks_params[{task}][{index}] (shape {tuple(param.shape)}) does not "
                        "require grad."
                    )
    for task, head in enumerate(heads):
        for param in head:
            if id(param) in shared_ids:
                raise ValueError(
                    f"A param of shape {tuple(param.shape)} is in both shared_params and "
                    f"tasks_params[{task}]: each param is either the trunk's or one task's. A "
                    "loss may use a trunk param directly too (a penalty on it): leave it shared."
                )
    return heads
