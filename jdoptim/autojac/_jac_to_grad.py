"""``jac_to_grad``: aggregate the Jacobians in ``.jac`` into ``.grad``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from jdoptim._grad_layout import in_param_layout
from jdoptim.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator
from jdoptim.autojac._graph import unique
from jdoptim.autojac._jac_field import clear_jac, get_jac, has_jac_field
from jdoptim.linalg import check_finite


def jac_to_grad(
    params: Iterable[Tensor], aggregator: Aggregator, *, retain_jac: bool = False
) -> Tensor | None:
    """Aggregates the Jacobian stored in the params' ``.jac`` into their ``.grad``.

    The aggregator sees the whole Jacobian ``J = [J₁ ⋯ J_k] ∈ R^{m×n}``, param ``p``'s ``.jac``
    flattened to ``J_p ∈ R^{m×n_p}``; the direction ``d`` it returns is split back per param and
    added to ``.grad`` (set when ``None``), as autograd accumulates. For a
    :class:`~jdoptim.aggregation.GramianWeightedAggregator`, ``J`` is never concatenated: the weights
    come from ``J Jᵀ = Σ_p J_p J_pᵀ`` and ``d_p = wᵀ J_p``, so memory stays at one Jacobian.

    A param whose ``.jac`` is ``None`` (the differentiated outputs did not reach it) is left out,
    and its ``.grad`` left as it is (``None`` for an unused param, as autograd leaves it), so that
    weight decay and momentum do not move it.

    Forward hooks and forward pre-hooks registered on the aggregator run as in a direct call
    ``aggregator(J)``; ``J`` is then concatenated, so register them only when needed.

    Returns:
        the weights ``w ∈ R^m`` for a weighted aggregator (``d = wᵀ J``), else ``None``.

    Raises:
        ValueError: no params, a param without a ``.jac`` field or with ``requires_grad=False``,
            Jacobians with different numbers of rows or a shape that does not match their param,
            or non-finite entries. Nothing is changed then.
    """
    _check_aggregator(aggregator)
    param_list = unique(params)
    used, jacobians = _collect_jacobians(param_list)
    weights = aggregate_into_grads(used, jacobians, aggregator) if used else None
    if not retain_jac:
        clear_jac(param_list)
    return weights


def aggregate_into_grads(
    params: Sequence[Tensor], jacobians: Sequence[Tensor], aggregator: Aggregator
) -> Tensor | None:
    """Adds the aggregation of the Jacobians ``[m, *p.shape]`` to ``p.grad``; returns the weights.

    Every check (and the aggregation itself) happens before the first ``.grad`` is touched.
    """
    _check_aggregator(aggregator)
    for index, jacobian in enumerate(jacobians):
        check_finite(jacobian, f"The Jacobian of params[{index}]")
    blocks = [jacobian.reshape(jacobian.shape[0], -1) for jacobian in jacobians]
    weights: Tensor | None = None
    if _has_forward_hooks(aggregator):
        matrix = torch.cat(blocks, dim=1)
        direction, weights = _call_with_hooks(aggregator, matrix)
        del matrix
        updates = list(torch.split(direction, [block.shape[1] for block in blocks]))
    elif _weights_from_gramian(aggregator):
        assert isinstance(aggregator, GramianWeightedAggregator)
        weights = aggregator.compute_weights_from_blocks(blocks)
        updates = [weights @ block for block in blocks]
    else:
        matrix = torch.cat(blocks, dim=1)
        if isinstance(aggregator, WeightedAggregator):
            weights = aggregator.compute_weights(matrix)
            direction = weights @ matrix
        else:
            direction = aggregator(matrix)
        del matrix
        updates = list(torch.split(direction, [block.shape[1] for block in blocks]))
    for index, update in enumerate(updates):
        check_finite(update, f"The aggregation of the Jacobian by {aggregator!r} (params[{index}])")
    for param, update in zip(params, updates, strict=True):
        grad = update.reshape(param.shape)
        if param.grad is None:
            param.grad = in_param_layout(grad.detach(), param)
        else:
            param.grad += grad.detach()
    return weights


def _check_aggregator(aggregator: object) -> None:
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            f"aggregator must be a jdoptim.aggregation.Aggregator (such as UPGrad()), got "
            f"{type(aggregator).__name__}."
        )


def _collect_jacobians(params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The params with a Jacobian, and their Jacobians, all checked."""
    if not params:
        raise ValueError("jac_to_grad needs at least one param, got none.")
    used, jacobians = [], []
    for index, param in enumerate(params):
        if not param.requires_grad:
            raise ValueError(
                f"params[{index}] (shape {tuple(param.shape)}) has requires_grad=False, so it "
                "takes no .grad; pass only params that require grad."
            )
        if not has_jac_field(param):
            raise ValueError(
                f"params[{index}] (shape {tuple(param.shape)}) has no .jac. Fill it first with "
                "jdoptim.autojac.backward or mtl_backward, and pass only the params those reach."
            )
        jacobian = get_jac(param)
        if jacobian is None:
            continue  # the outputs did not reach this param: no Jacobian, no .grad
        if tuple(jacobian.shape[1:]) != tuple(param.shape):
            raise ValueError(
                f"params[{index}].jac has shape {tuple(jacobian.shape)}, but a Jacobian for a param "
                f"of shape {tuple(param.shape)} must have shape {_jacobian_shape(param)}."
            )
        used.append(param)
        jacobians.append(jacobian)
    rows = {jacobian.shape[0] for jacobian in jacobians}
    if len(rows) > 1:
        counts = ", ".join(f"params[{i}]: {j.shape[0]}" for i, j in enumerate(jacobians))
        raise ValueError(
            f"The .jac fields have different numbers of rows ({counts}); they must come from the "
            "same outputs. Clear stale Jacobians with clear_jac before calling backward again."
        )
    return used, jacobians


def _jacobian_shape(param: Tensor) -> str:
    return "[" + ", ".join(["m", *map(str, param.shape)]) + "]"


def _weights_from_gramian(aggregator: Aggregator) -> bool:
    """Whether the weights only need ``J Jᵀ``: a Gramian-weighted aggregator that does not compute
    them from ``J`` itself (as ConFIG does, for precision, when ``J`` is at hand)."""
    return (
        isinstance(aggregator, GramianWeightedAggregator)
        and type(aggregator).compute_weights is GramianWeightedAggregator.compute_weights
    )


def _has_forward_hooks(aggregator: Aggregator) -> bool:
    """Whether a direct call of ``aggregator`` would run any forward (pre-)hook."""
    hooks = (
        aggregator._forward_hooks,
        aggregator._forward_pre_hooks,
        nn.modules.module._global_forward_hooks,
        nn.modules.module._global_forward_pre_hooks,
    )
    return any(len(registered) > 0 for registered in hooks)


def _call_with_hooks(aggregator: Aggregator, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
    """``aggregator(matrix)`` (hooks included), and the weights it combined the rows with."""
    if not isinstance(aggregator, WeightedAggregator):
        return aggregator(matrix), None
    captured: list[Tensor] = []
    compute_weights = aggregator.compute_weights

    def capturing(inner: Tensor, /) -> Tensor:
        weights = compute_weights(inner)
        captured.append(weights)
        return weights

    # Shadows the method on this instance for the duration of the call only.
    vars(aggregator)["compute_weights"] = capturing
    try:
        direction = aggregator(matrix)
    finally:
        del vars(aggregator)["compute_weights"]
    if captured:
        return direction, captured[-1]
    # A forward of its own (Mean averages the rows directly): the weights it stands for.
    return direction, compute_weights(matrix)
