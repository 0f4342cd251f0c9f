"""The multi-task path: per-task losses of a shared trunk and task heads.

The trunk's parameters get the combination of the tasks' gradients; each head's parameters get
their own task's gradient. :func:`jdoptim.autojac.mtl_backward` differentiates each head once
down to the shared features, then the trunk once for all tasks. Micro-batches add up (the
Jacobian of the summed task losses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator, Weighting
from jdoptim.autojac import clear_jac, jac_to_grad, mtl_backward
from jdoptim.paths._base import Part, Path, add_to_grad, check_same_kind
from jdoptim.paths._method import PathKind
from jdoptim.paths._record import StepRecord
from jdoptim.paths._weights import output_of


@dataclass
class TasksPart(Part):
    """The ``[T, *p.shape]`` Jacobians of the shared params and the heads' gradients."""

    shared: list[Tensor]
    jacobians: list[Tensor]
    heads: list[Tensor]
    head_grads: list[Tensor | None]


class MultiTaskPath(Path):
    """``shared_params=`` given: the closure returns ``(losses, features)``."""

    def differentiate(self, losses: Tensor, features: Any = None, scale: float = 1.0) -> Part:
        if losses.ndim != 1:
            raise ValueError(
                f"In multi-task mode (shared_params=) the losses are one scalar per task, shape "
                f"[T]; got shape {tuple(losses.shape)}. For per-instance losses of several tasks "
                "([B, T]), drop shared_params and pass batch_dim=0: the weighting then sees every "
                "(instance, task) loss."
            )
        if features is None:
            raise TypeError(
                "In multi-task mode (shared_params=), pass the shared features too: the closure "
                "returns (losses, features), and optimizer.backward(losses, features=features)."
            )
        shared = self.shared_params()
        shared_ids = {id(p) for p in shared}
        heads = [p for p in self.context.params() if id(p) not in shared_ids]
        saved = [(p, p.grad, getattr(p, "jac", None)) for p in (*shared, *heads)]
        for param, _, _ in saved:
            param.grad = None
        clear_jac(shared)
        try:
            mtl_backward(
                losses * scale if scale != 1.0 else losses,
                features,
                tasks_params=self.context.tasks_params,
                shared_params=shared,
                parallel_chunk_size=self.context.parallel_chunk_size,
            )
            jacobians = [_jac_or_zeros(p, losses.numel()) / scale for p in shared]
            head_grads = [p.grad for p in heads]
        finally:
            clear_jac(shared)
            for param, grad, jacobian in saved:
                param.grad = grad
                if jacobian is not None:
                    setattr(param, "jac", jacobian)  # noqa: B010
        return TasksPart(losses.detach(), shared, jacobians, heads, head_grads, scale=scale)

    def shared_params(self) -> list[Tensor]:
        return [p for p in self.context.shared_params or [] if p.requires_grad]

    def combine(self, parts: Sequence[Part]) -> Part:
        check_same_kind(parts)
        tasks = [p for p in parts if isinstance(p, TasksPart)]
        if len(tasks) == 1:
            return tasks[0]
        if len({tuple(p.losses.shape) for p in tasks}) != 1:
            raise ValueError(
                "Every backward() of a step must give the same number of task losses in "
                "multi-task mode."
            )
        first = tasks[0]
        return TasksPart(
            sum((p.losses for p in tasks[1:]), first.losses),
            first.shared,
            [sum(js[1:], js[0]) for js in zip(*(p.jacobians for p in tasks), strict=True)],
            first.heads,
            [_sum_optional(gs) for gs in zip(*(p.head_grads for p in tasks), strict=True)],
            scale=first.scale,
        )

    def apply(self, part: Part) -> StepRecord:
        assert isinstance(part, TasksPart)
        stash = [p.grad for p in part.shared]
        for param in part.shared:
            param.grad = None
        try:
            weights = self.aggregate(part.shared, part.jacobians)
            directions = [p.grad for p in part.shared]
        finally:
            for param, grad in zip(part.shared, stash, strict=True):
                param.grad = grad
        if part.scale != 1.0:
            directions = [None if d is None else d * part.scale for d in directions]
        add_to_grad(part.shared, directions)
        add_to_grad(part.heads, part.head_grads)
        jacobians = part.jacobians
        tasks = part.losses.numel()
        return StepRecord(
            part.losses,
            weights,
            _gramian=lambda: _gramian_of(jacobians, tasks),
        )

    def aggregate(self, shared: list[Tensor], jacobians: list[Tensor]) -> Tensor | None:
        """Adds the aggregation of the trunk's Jacobians to the shared params' ``.grad``."""
        for param, jacobian in zip(shared, jacobians, strict=True):
            setattr(param, "jac", jacobian)  # noqa: B010
        aggregator = self.aggregator()
        try:
            if isinstance(aggregator, WeightedAggregator):
                with output_of(aggregator.weighting) as seen:
                    weights = jac_to_grad(shared, aggregator)
                return weights if weights is not None else (seen[0] if seen else None)
            jac_to_grad(shared, aggregator)
            return None
        finally:
            clear_jac(shared)

    def aggregator(self) -> Aggregator:
        module = self.module
        if isinstance(module, Aggregator):
            return module
        if not isinstance(module, Weighting):
            raise TypeError(
                f"Multi-task mode needs a Weighting of [T, T] Gramians, got {module!r}; generalized "
                "weightings apply to instance-wise multi-task losses without shared_params."
            )
        if self.method.kind is PathKind.GRAMIAN:
            return GramianWeightedAggregator(module)
        return WeightedAggregator(module)


def _jac_or_zeros(param: Tensor, tasks: int) -> Tensor:
    jacobian = getattr(param, "jac", None)
    return jacobian if jacobian is not None else param.new_zeros((tasks, *param.shape))


def _sum_optional(grads: Sequence[Tensor | None]) -> Tensor | None:
    present = [g for g in grads if g is not None]
    return sum(present[1:], present[0]) if present else None


def _gramian_of(jacobians: Sequence[Tensor], tasks: int) -> Tensor:
    gramian = torch.zeros(tasks, tasks, dtype=torch.float64)
    for jacobian in jacobians:
        block = jacobian.reshape(tasks, -1).double().cpu()
        gramian += block @ block.T
    return gramian
