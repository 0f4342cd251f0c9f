"""Checks what a closure (or a backward-then-step call) gave as losses, before anything changes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jdoptim.linalg import check_finite


def check_losses(result: Any, multi_task: bool, finite: bool = True) -> tuple[Tensor, Any]:
    """``(losses, features)`` from a closure's result; raises a clear error on anything else.

    ``finite=False`` skips the NaN/infinity check (to report the values of a skipped step).
    """
    features: Any = None
    if multi_task:
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError(
                "In multi-task mode (shared_params=), the losses come with the shared features: "
                "return the pair (losses, features) from the closure, or call "
                f"optimizer.backward(losses, features=features); got {type(result).__name__} "
                "alone. (Lightning's automatic optimization hands backward only the loss: use "
                "manual optimization, self.manual_backward(losses, features=features).)"
            )
        result, features = result
    if isinstance(result, list | tuple) and result and all(isinstance(r, Tensor) for r in result):
        if not all(r.ndim == 0 for r in result):
            raise TypeError(_not_one_tensor(result, multi_task))
        result = torch.stack(list(result))  # one scalar loss per task
    if not isinstance(result, Tensor):
        raise TypeError(
            f"The losses must be a tensor, got {type(result).__name__}. Use "
            "reduction='none' in the loss function to get one loss per instance."
        )
    if not result.is_floating_point():
        raise TypeError(f"The losses must be floating-point, got dtype {result.dtype}.")
    if result.numel() == 0:
        raise ValueError(
            f"The losses are empty (shape {tuple(result.shape)}): there is nothing to "
            "differentiate. An empty batch (the last one of a dataset, say) needs no step: skip it."
        )
    if not result.requires_grad:
        raise ValueError(
            "The losses do not require grad: the closure must compute them from the "
            "parameters, with gradients enabled."
        )
    if not finite:
        return result, features
    try:
        check_finite(result.detach(), "The losses")
    except ValueError as error:
        raise NonFiniteLossesError(str(error)) from None
    return result, features


def _not_one_tensor(result: list[Tensor] | tuple[Tensor, ...], multi_task: bool) -> str:
    shapes = [tuple(r.shape) for r in result]
    if multi_task:
        return (
            f"In multi-task mode (shared_params=) each task's loss is one scalar, got a "
            f"{type(result).__name__} of losses with shapes {shapes}. Reduce each task's losses "
            "over the batch (.mean()); for per-instance and per-task losses, drop shared_params= "
            "and return them as one [B, T] tensor with batch_dim=0."
        )
    pair = isinstance(result, tuple) and len(result) == 2 and result[0].ndim <= 1
    hint = (
        " A pair (losses, features) is multi-task mode: give the optimizer shared_params= (the "
        "parameters of the shared trunk that computes the features)."
        if pair
        else ""
    )
    return (
        f"The losses must be one tensor, got a {type(result).__name__} of tensors with shapes "
        f"{shapes}: stack per-task scalars, or concatenate per-instance losses along batch_dim."
        + hint
    )


class NonFiniteLossesError(ValueError):
    """The losses hold NaN or infinity: under loss scaling, a step to skip; otherwise an error."""
